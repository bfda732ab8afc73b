"""Starting runs: `arv-wrap COMMAND`, `arv-wrap --as-job -- COMMAND`, `arv-wrap env`."""
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys

from arvwrap import paths, runs
from arvwrap.activation import activation_env, end_run, new_run, rules_for_run
from arvwrap.errors import UsageError


def run(options, command):
    """Run COMMAND with interception; exit with its status (or die of its signal)."""
    env = dict(os.environ)
    files, rules = rules_for_run(options, env)
    db, run_id = new_run(command, options, env, redact_globs=rules.redact,
                         **runs.shell_fields(os.getpid()))   # ended for us if we are killed
    env.update(activation_env(files, rules, options, run_id, env))
    env.pop("ARV_WRAP_JOB", None)
    if options.get("as_job"):
        argv = as_job(command, options, env)
    elif options.get("cpus"):
        raise UsageError("--cpus goes with --as-job")
    else:
        # The helper's --exec goes through libc's execvp, which the shim hooks: the
        # top-level command is matched exactly like every exec below it.
        argv = [paths.HELPER, "--exec", *command]
    follower = None
    if options.get("verbose"):
        from arvwrap import progress
        follower = progress.Follower(paths.state_dir(env), run_id, sys.stderr).start()
    child = subprocess.Popen(argv, env=env, pass_fds=inherited_fds())
    forward = lambda signum, _frame: child.send_signal(signum)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, forward)
    for signum in (signal.SIGINT, signal.SIGQUIT):   # the terminal signals the child too
        signal.signal(signum, signal.SIG_IGN)
    status = child.wait()
    if follower:
        follower.stop()
    end_run(db, run_id, status)
    if status >= 0:
        exit_now(status)
    die_of(-status)


def as_job(command, options, env):
    """The client's argv that hands COMMAND itself to the dispatcher as a job, a
    pipeline whose tools stay intercepted (the dispatcher's driver_job)."""
    cpus = options.get("cpus") or ""
    try:
        if cpus and float(cpus) <= 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"--cpus: expected a number > 0, got {cpus!r}") from None
    program = command[0] if "/" in command[0] else shutil.which(command[0], path=env.get("PATH"))
    if not program or not os.access(program, os.X_OK):
        print(f"arv-wrap: {command[0]}: No such file or directory", file=sys.stderr)
        sys.exit(127)
    env["ARV_WRAP_AS_JOB"] = cpus
    return [paths.CLIENT, "--shim", "0", os.path.abspath(program), *command]


def inherited_fds():
    """The descriptors above 2 that arv-wrap was given: they go on to the command, as
    a direct run would have them (a make jobserver, a caller's fd 3). Named one by
    one: with close_fds=False, subprocess takes glibc's posix_spawn, which leaves
    glibc's internal signals 32 and 33 ignored in the child."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd > 2 and os.get_inheritable(fd):   # arv-wrap's own are close-on-exec
                fds.append(fd)
        except OSError:                 # the listing's own descriptor, closed by now
            pass
    return fds


def exit_now(status):
    """Leave with status, without Python's teardown of every module (7 ms or more of
    each run here): the run's end is committed, and nothing else is left to do."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:      # None: arv-wrap was started without it
                stream.flush()
        except (OSError, ValueError):   # a closed or broken stdout: the status still counts
            pass
    os._exit(status)


def die_of(signum):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if signum not in (signal.SIGKILL, signal.SIGSTOP):   # those cannot be caught anyway
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    sys.exit(128 + signum)


def env(options, _words):
    environ = dict(os.environ)
    files, rules = rules_for_run(options, environ)
    _, run_id = new_run(["arv-wrap", "env", *_words], options, environ,
                        redact_globs=rules.redact, **watched_shell())
    for name, value in activation_env(files, rules, options, run_id, environ).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def watched_shell():
    """The shell that evals our output (our parent): its run ends when it is gone."""
    return runs.shell_fields(os.getppid())
