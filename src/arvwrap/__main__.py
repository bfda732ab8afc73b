from arvwrap.cli import main

raise SystemExit(main())
