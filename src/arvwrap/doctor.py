"""`arv-wrap doctor`: check each link of the chain and say which one is broken."""
import os
import subprocess
import sys
import tempfile

from arvwrap import paths, whitelist

PROBE_RULES = "1;n:true"


def run(options):
    checks = [check_files, check_interception, lambda: check_rules(options),
              lambda: check_backend(options)]
    failed = 0
    for check in checks:
        ok, text = check()
        print(f"{'ok  ' if ok else 'FAIL'}  {text}")
        failed += not ok
    return 1 if failed else 0


def check_files():
    missing = [p for p in (paths.SHIM, paths.CLIENT) if not os.path.exists(p)]
    if missing:
        return False, f"missing native files: {', '.join(missing)} (reinstall arv-wrap)"
    return True, f"shim {paths.SHIM}"


def check_interception():
    """Exec `true` through the shim with a rule for it; the client's probe mode reports it."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "probe")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LD_PRELOAD": paths.SHIM,
               "ARV_WRAP_SHIM": paths.SHIM, "ARV_WRAP_RULES": PROBE_RULES,
               "ARV_WRAP_PROBE": probe}
        try:
            subprocess.run(["/bin/sh", "-c", "exec /bin/true"], env=env, timeout=10, check=False,
                           stderr=subprocess.PIPE)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"could not run /bin/sh with the shim: {e}"
        if not os.path.exists(probe):
            return False, "the shim loaded but did not intercept `true` from /bin/sh"
    return True, "the shim intercepts an exec from /bin/sh"


def check_rules(options):
    files = whitelist.find_whitelists(options["whitelists"], os.environ)
    if not files:
        return True, "no whitelist named (needed to run a command: -w FILE)"
    try:
        rules = whitelist.load(files)
    except (OSError, whitelist.WhitelistError) as e:
        return False, str(e)
    return True, f"whitelist {':'.join(files)}: {len(rules.rules)} rules"


def check_backend(options):
    from arvwrap import backends
    name = options["backend"] or os.environ.get("ARV_WRAP_BACKEND") or "local"
    try:
        backend = backends.load(name, {})
        return True, backend.check()
    except backends.BackendError as e:
        return False, f"backend {name}: {e}"
    except Exception as e:  # a backend's own failure is what the doctor must report
        return False, f"backend {name}: {e}"


if __name__ == "__main__":
    sys.exit(run({"whitelists": [], "backend": None}))
