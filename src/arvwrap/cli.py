"""The arv-wrap command."""
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys

from arvwrap import __version__, paths, protocol, store, whitelist

SUBCOMMANDS = ("env", "check", "jobs", "doctor", "preload-path", "cancel")

USAGE = """\
usage: arv-wrap [-w FILE]... [-b BACKEND] [--] COMMAND [ARGS...]
       arv-wrap env [-w FILE]... [-b BACKEND]
       arv-wrap check [-w FILE]... [-b BACKEND] -- COMMAND [ARGS...]
       arv-wrap jobs [--json] [--run ID]
       arv-wrap cancel JOB
       arv-wrap doctor [-w FILE]... [-b BACKEND]
       arv-wrap preload-path
       arv-wrap --version

Run COMMAND with its whitelisted tools redirected as jobs; COMMAND's exit status
is arv-wrap's. The first word after the options names a subcommand if it is one;
put `--` before a program called like a subcommand.

options:
  -w, --whitelist FILE  a whitelist YAML (repeatable; default $ARV_WRAP_WHITELIST,
                        else ./arv-wrap.yaml)
  -b, --backend NAME    run the jobs there (default $ARV_WRAP_BACKEND, else the
                        whitelist's backend, else local)
  -h, --help            show this help
  --version             show the version
"""


class UsageError(Exception):
    pass


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        options, rest, forced = parse_options(argv, allow_command=True)
        if not forced and rest and rest[0] in SUBCOMMANDS:
            return SUBCOMMAND_FUNCS[rest[0]](options, rest[1:])
        if options.get("help"):
            print(USAGE, end="")
            return 0
        if options.get("version"):
            print(f"arv-wrap {__version__}")
            return 0
        if not rest:
            raise UsageError("no COMMAND given (see arv-wrap --help)")
        return run(options, rest)
    except UsageError as e:
        print(f"arv-wrap: {e}", file=sys.stderr)
        return 2
    except whitelist.WhitelistError as e:
        print(f"arv-wrap: {e}", file=sys.stderr)
        return 2
    except (OSError, store.sqlite3.Error) as e:   # the state dir: full, read-only, not ours
        print(f"arv-wrap: cannot use the state dir {paths.state_dir()}: "
              f"{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 125


def parse_options(argv, allow_command, flags=()):
    """Options up to the first other word; (options, rest, forced_by_dashdash)."""
    options = {"whitelists": [], "backend": None}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return options, argv[i + 1:], True
        name, eq, value = word.partition("=")
        if name in ("-w", "--whitelist", "-b", "--backend", "--run"):
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"{word} needs a value")
                value, i = argv[i + 1], i + 1
            key = {"-w": "whitelists", "--whitelist": "whitelists",
                   "-b": "backend", "--backend": "backend", "--run": "run"}[name]
            if key == "run" and "--run" not in flags:
                raise UsageError(f"unknown option {word}")
            if key == "whitelists":
                options["whitelists"].append(value)
            else:
                options[key] = value
        elif word in ("-h", "--help"):
            options["help"] = True
        elif word == "--version":
            options["version"] = True
        elif word in flags:
            options[word.lstrip("-")] = True
        elif word.startswith("-") and word != "-":
            raise UsageError(f"unknown option {word} (see arv-wrap --help)")
        elif allow_command:
            return options, argv[i:], False
        else:
            raise UsageError(f"unexpected argument {word!r}")
        i += 1
    return options, [], False


def sub_options(options, argv, flags=(), allow_command=False):
    more, rest, forced = parse_options(argv, allow_command or False, flags)
    more["whitelists"] = options["whitelists"] + more["whitelists"]
    more["backend"] = more["backend"] or options["backend"]
    return more, rest, forced


# -- activation --

def load_rules(options, env):
    files = whitelist.find_whitelists(options["whitelists"], env)
    if not files:
        raise UsageError(whitelist.NO_WHITELIST_MESSAGE)
    return files, whitelist.load(files)


def activation_env(files, rules, options, run_id, env):
    """The variables that switch interception on (docs/internals.md, section 1)."""
    preload = env.get("LD_PRELOAD", "")
    entries = [e for e in preload.replace(" ", ":").split(":")
               if e and os.path.basename(e) != "libarvwrap.so"]
    out = {
        "LD_PRELOAD": ":".join([paths.SHIM, *entries]),
        "ARV_WRAP_SHIM": paths.SHIM,
        "ARV_WRAP_RULES": rules.compiled,
        "ARV_WRAP_WHITELIST": ":".join(files),
        "ARV_WRAP_STATE_DIR": paths.state_dir(env),
        "ARV_WRAP_PYTHON": sys.executable,
        "ARV_WRAP_RUN": run_id,
    }
    backend = options["backend"] or env.get("ARV_WRAP_BACKEND")
    if backend:
        out["ARV_WRAP_BACKEND"] = backend
    return out


def new_run(argv, options, env):
    db = store.Store(paths.state_dir(env))
    run_id = store.new_id()
    db.insert({"id": run_id, "run": run_id, "parent": None, "kind": "run",
               "argv": [os.fsencode(a) for a in argv], "cwd": os.getcwd(),
               "backend": options["backend"] or env.get("ARV_WRAP_BACKEND") or "local",
               "state": "running", "started": store.now(), "cpus": 0, "memory": 0})
    return db, run_id


def run(options, command):
    """Run COMMAND with interception; exit with its status (or die of its signal)."""
    env = dict(os.environ)
    files, rules = load_rules(options, env)
    db, run_id = new_run(command, options, env)
    env.update(activation_env(files, rules, options, run_id, env))
    env.pop("ARV_WRAP_JOB", None)
    # The client's --exec goes through libc's execvp, which the shim hooks: the
    # top-level command is matched exactly like every exec below it.
    child = subprocess.Popen([paths.CLIENT, "--exec", *command], env=env)
    forward = lambda signum, _frame: child.send_signal(signum)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)
    for signum in (signal.SIGINT, signal.SIGQUIT):   # the terminal signals the child too
        signal.signal(signum, signal.SIG_IGN)
    status = child.wait()
    end_run(db, run_id, status)
    if status >= 0:
        return status
    die_of(-status)


def end_run(db, run_id, status):
    """Record how the command ended; a state dir that filled up meanwhile costs the
    record, not the command's status."""
    fields = ({"state": "exited", "exit_status": status} if status >= 0
              else {"state": "signaled", "signal": -status})
    try:
        db.update(run_id, ended=store.now(), **fields)
    except (OSError, store.sqlite3.Error) as e:
        print(f"arv-wrap: could not record the end of run {run_id}: {e}", file=sys.stderr)


def die_of(signum):
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if signum not in (signal.SIGKILL, signal.SIGSTOP):   # those cannot be caught anyway
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    sys.exit(128 + signum)


def cmd_env(options, argv):
    options, _, _ = sub_options(options, argv)
    if options.get("help"):
        print("usage: arv-wrap env [-w FILE]... [-b BACKEND]\n\n"
              "Print export lines that activate interception for the programs started\n"
              "after them:  eval \"$(arv-wrap env -w whitelist.yaml)\"")
        return 0
    env = dict(os.environ)
    files, rules = load_rules(options, env)
    _, run_id = new_run(["arv-wrap", "env", *argv], options, env)
    for name, value in activation_env(files, rules, options, run_id, env).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def cmd_check(options, argv):
    options, command, _ = sub_options(options, argv, allow_command=True)
    if options.get("help") or not command:
        print("usage: arv-wrap check [-w FILE]... [-b BACKEND] -- COMMAND [ARGS...]\n\n"
              "Say, without running anything, whether that exec would be redirected.")
        return 0 if options.get("help") else 2
    env = dict(os.environ)
    files, rules = load_rules(options, env)
    argv_b = [os.fsencode(a) for a in command]
    resolved = shutil.which(command[0]) if "/" not in command[0] else command[0]
    path = os.fsencode(os.path.abspath(resolved)) if resolved else None
    name = os.path.basename(os.fsencode(command[0]))
    backend = options["backend"] or env.get("ARV_WRAP_BACKEND")
    print(whitelist.describe(rules, argv_b, name, path, backend=backend))
    rule = rules.match(argv_b, name, path)
    if rule:
        note = oversize_note(rule, argv_b, backend, env)
        if note:
            print(f"note: {note}")
    return 0


def oversize_note(rule, argv, backend, env):
    """What on_oversize will do with a request larger than the backend offers."""
    from arvwrap import backends
    name = whitelist.choose_backend(rule, backend, env)
    try:
        most_cpus, most_memory = backends.load(name, backends.config_from_env(env).get(name, {})
                                               ).largest()
    except Exception as e:   # check must still answer when the backend cannot
        return f"could not ask the {name} backend what it offers: {e}"
    cpus, memory, _, _ = whitelist.resources(rule, argv)
    over = [f"{cpus:g} CPUs > {most_cpus:g}"] if cpus > most_cpus else []
    if memory and memory > most_memory:
        over.append(f"{memory} bytes of memory > {most_memory}")
    if not over:
        return None
    action = ("refused with exit 125" if rule.on_oversize == "refuse"
              else "clamped to what it offers")
    return f"larger than the {name} backend offers ({', '.join(over)}): {action} (on_oversize)"


def cmd_jobs(options, argv):
    options, _, _ = sub_options(options, argv, flags=("--json", "--run"))
    if options.get("help"):
        print("usage: arv-wrap jobs [--json] [--run ID]\n\nThe job records, newest first.")
        return 0
    records = store.Store(paths.state_dir()).list(run=options.get("run"))
    if options.get("json"):
        json.dump(records, sys.stdout, indent=1)
        print()
        return 0
    print(format_table(records))
    return 0


def format_table(records):
    header = ("ID", "PARENT", "STATE", "EXIT", "BACKEND", "BACKEND_ID", "CPUS", "STARTED", "COMMAND")
    rows = [header]
    for r in records:
        result = r["exit_status"] if r["state"] == "exited" else (
            f"sig{r['signal']}" if r["signal"] else "")
        command = shlex.join(r["argv"])
        rows.append((r["id"], r["parent"] or "-", r["state"], str(result), r["backend"] or "",
                     r["backend_id"] or "", f"{r['cpus'] or 0:g}", (r["started"] or "")[:19],
                     command if len(command) < 60 else command[:57] + "..."))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
                     for row in rows)


def cmd_cancel(options, argv):
    options, rest, _ = sub_options(options, argv, allow_command=True)
    if options.get("help") or len(rest) != 1:
        print("usage: arv-wrap cancel JOB\n\nCancel a queued or running job on its backend.")
        return 0 if options.get("help") else 2
    job_id = rest[0]
    record = store.Store(paths.state_dir()).get(job_id)
    if record is None:
        print(f"arv-wrap: no job {job_id}", file=sys.stderr)
        return 1
    if record["state"] not in ("queued", "running"):
        print(f"arv-wrap: job {job_id} is already {record['state']}", file=sys.stderr)
        return 1
    answer = ask_dispatcher(protocol.cancel_message(job_id))
    if answer != "ok":
        print(f"arv-wrap: the dispatcher does not know job {job_id} ({answer})", file=sys.stderr)
        return 1
    print(f"cancelled {job_id}")
    return 0


def ask_dispatcher(message, timeout=10):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(paths.socket_path())
            sock.sendall(message)
            return sock.makefile().readline().strip()
    except OSError as e:
        return f"no dispatcher: {e.strerror or e}"


def cmd_doctor(options, argv):
    options, _, _ = sub_options(options, argv)
    if options.get("help"):
        print("usage: arv-wrap doctor [-w FILE]... [-b BACKEND]\n\n"
              "Check that the shim loads and intercepts, and that the backend answers.")
        return 0
    from arvwrap import doctor
    return doctor.run(options)


def cmd_preload_path(options, argv):
    options, _, _ = sub_options(options, argv)
    if options.get("help"):
        print("usage: arv-wrap preload-path\n\nPrint the absolute path of the shim library.")
        return 0
    print(paths.SHIM)
    return 0


SUBCOMMAND_FUNCS = {"env": cmd_env, "check": cmd_check, "jobs": cmd_jobs, "doctor": cmd_doctor,
                    "preload-path": cmd_preload_path, "cancel": cmd_cancel}


if __name__ == "__main__":
    sys.exit(main())
