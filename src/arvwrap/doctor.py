"""`arv-wrap doctor`: check each link of the chain and say which one is broken."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from arvwrap import elf, paths, runs, whitelist

PROBE_RULES = "1;n:true"


def run(options, command=()):
    checks = [check_files, check_interception, lambda: check_rules(options),
              lambda: check_backend(options), lambda: backend_checks(options),
              lambda: check_round_trip(options)]
    if command:
        checks.insert(2, lambda: check_caller(command[0]))
    failed = 0
    for check in checks:
        results = check()
        for ok, text in results if isinstance(results, list) else [results]:
            print(f"{'ok  ' if ok else 'FAIL'}  {text}")
            failed += not ok
    return 1 if failed else 0


def check_caller(program):
    """Can the execs COMMAND makes be intercepted?  One FAIL line per reason not."""
    path = shutil.which(program) if "/" not in program else program
    if not path or not os.path.exists(path):
        return False, f"{program}: not found"
    path = os.path.abspath(path)
    reasons = elf.not_intercepted(path)
    if not reasons:
        return True, f"{path}: the programs it execs can be intercepted"
    return [(False, line) for line in reasons]


def backend_name(options):
    return options["backend"] or os.environ.get("ARV_WRAP_BACKEND") or "local"


def backend_checks(options):
    """What the chosen backend itself checks beyond answering (docker: the images)."""
    from arvwrap import backends
    name = backend_name(options)
    cls = backends.find_quietly(name)
    if cls is None:
        return []
    checks = [shared_filesystem(name)] if cls.shared_filesystem else []
    return checks + cls.doctor_checks(lambda: backends.load(name), named_rules(options))


NODE_LOCAL = ("tmpfs", "ramfs", "overlay", "devtmpfs")


def shared_filesystem(name):
    """A backend that needs a shared filesystem: is the cwd on one that is not local?"""
    cwd = os.getcwd()
    kind = filesystem_type(cwd)
    if kind in NODE_LOCAL:
        return True, (f"files: the cwd {cwd} is on {kind}, which only this host sees: "
                      f"{name} jobs elsewhere would not find it (fine on a one-node "
                      f"cluster on this host)")
    return True, (f"files: the cwd {cwd} is on {kind or 'an unknown filesystem'}; {name} "
                  f"needs it, the tools and their paths at the same paths on the nodes "
                  f"(arv-wrap cannot check that)")


def filesystem_type(path):
    """The type of the filesystem path is on, from /proc/self/mounts (longest mount)."""
    best, kind = "", None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                point = fields[1].replace("\\040", " ")
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if len(fields) > 2 and inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        pass
    return kind


def check_files():
    missing = [p for p in (paths.SHIM, paths.CLIENT, paths.HELPER) if not os.path.exists(p)]
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
    files = paths.find_whitelists(options["whitelists"], os.environ)
    if not files:
        return True, "no whitelist named (needed to run a command: -w FILE)"
    try:
        rules = whitelist.load(files)
    except (OSError, whitelist.WhitelistError) as e:
        return False, str(e)
    return True, f"whitelist {':'.join(files)}: {len(rules.rules)} rules"


def check_backend(options):
    from arvwrap import backends
    name = backend_name(options)
    try:
        backend = backends.load(name)
        return True, backend.check()
    except backends.BackendError as e:
        return False, f"backend {name}: {e}"
    except Exception as e:  # a backend's own failure is what the doctor must report
        return False, f"backend {name}: {e}"


def named_rules(options):
    """The whitelist's rules, or None (none named, or unreadable: check_rules says so)."""
    files = paths.find_whitelists(options["whitelists"], os.environ)
    try:
        return whitelist.load(files) if files else None
    except (OSError, whitelist.WhitelistError):
        return None


def check_round_trip(options):
    """Redirect a real `true` through the dispatcher to the chosen backend (or what its
    doctor_probe says: docker runs `sh -c true` in an image the whitelist names)."""
    from arvwrap import activation, backends, store
    from arvwrap.backends.base import Backend
    name = backend_name(options)
    cls = backends.find_quietly(name) or Backend
    probe = cls.doctor_probe(lambda: backends.load(name), named_rules(options))
    if isinstance(probe, str):
        return True, probe
    tool, argv, image = probe
    with tempfile.TemporaryDirectory() as tmp:
        rules_file = os.path.join(tmp, "doctor.yaml")
        with open(rules_file, "w") as f:
            f.write(f"tools:\n  - name: {tool}\n    cpus: 0.01\n    time: 5m{image}\n")
        env = dict(os.environ)
        db, run_id = activation.new_run(["arv-wrap", "doctor"], options, env,
                                        **runs.shell_fields(os.getpid()))
        env.update(activation.activation_env([rules_file], whitelist.load([rules_file]),
                                      {"backend": name}, run_id, env))
        start = time.monotonic()
        try:
            done = subprocess.run([paths.HELPER, "--exec", *argv], env=env, timeout=120,
                                  stderr=subprocess.PIPE)
        except subprocess.TimeoutExpired:
            activation.end_run(db, run_id, -signal.SIGKILL)     # run() killed it
            return False, f"a redirected `true` did not finish within 120 s on {name}"
        took = (time.monotonic() - start) * 1000
        activation.end_run(db, run_id, done.returncode)
    jobs = [r for r in store.Store(paths.state_dir()).list(run=run_id) if r["kind"] == "job"]
    if done.returncode != 0 or not jobs:
        why = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        return False, f"a redirected `true` failed on {name}: {why}"
    return True, (f"a redirected `true` ran as job {jobs[0]['id']} on {jobs[0]['backend']} "
                  f"in {took:.0f} ms (dispatcher {paths.socket_path()})")


if __name__ == "__main__":
    sys.exit(run({"whitelists": [], "backend": None}, sys.argv[1:]))
