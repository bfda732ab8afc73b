"""Looking at runs: `arv-wrap top` (live) and `arv-wrap report` (an HTML file)."""
import sys

from arvwrap import paths, report as html_report, store, top as live
from arvwrap.errors import UsageError


def top(_options, words):
    if len(words) > 1:
        raise UsageError("top takes at most one RUN")
    return live.main(paths.state_dir(), words[0] if words else None)


def report(options, words):
    if not options.get("output"):
        raise UsageError("report needs -o FILE.html")
    if len(words) > 1:
        raise UsageError("report takes at most one RUN")
    records = store.Store(paths.state_dir()).list()
    try:
        about = html_report.write(records, options["output"], words[0] if words else None)
    except html_report.NoRun as e:
        raise UsageError(str(e)) from None
    print(f"wrote {options['output']} (run {about})", file=sys.stderr)
    return 0
