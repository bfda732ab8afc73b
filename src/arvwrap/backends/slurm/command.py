"""The command line and environment of one srun: the launcher in front of it (the
caller's umask and limits, death with the dispatcher), srun's options from the
rule, and the relay in front of the tool."""
import math
import os
import resource

from arvwrap.backends.slurm.settings import ENV_DROP, MIB

RLIMIT_NAMES = {getattr(resource, f"RLIMIT_{n.upper()}"): n for n in (
    "as", "core", "cpu", "data", "fsize", "memlock", "msgqueue", "nice", "nofile", "nproc",
    "rss", "rtprio", "rttime", "sigpending", "stack") if hasattr(resource, f"RLIMIT_{n.upper()}")}


def srun_argv(backend, job, name):
    args = [backend.cluster.tools["srun"], "-v", "-N1", "-n1", f"--job-name={name}",
            f"--cpus-per-task={max(1, math.ceil(job.cpus - 1e-9))}"]
    if job.memory:
        args.append(f"--mem={max(1, -(-job.memory // MIB))}M")
    if job.time_limit:
        args.append(f"--time={max(1, -(-job.time_limit // 60))}")
    options = backend.options(job)
    for key in ("partition", "account", "qos"):
        if getattr(options, key):
            args.append(f"--{key}={getattr(options, key)}")
    args += list(options.extra)
    if job.stdin == "none" or 0 not in job.fds:
        args.append("--input=none")
    # srun reads a bare ":" anywhere in its command line as the start of another
    # (heterogeneous) job's command: such a word, and one that starts with "+",
    # goes with a "+" in front, which the relay takes off
    tool_argv = [os.fsencode(a) for a in (job.argv or [job.path])]
    args += [backend.helper, "--relay", job.path,
             *(b"+" + a if a == b":" or a.startswith(b"+") else a for a in tool_argv)]
    return [os.fsencode(a) for a in args]

def srun_env(backend, job, token):
    env = {k: v for k, v in job.env.items() if not k.startswith(ENV_DROP)}
    # the job goes to the backend's cluster, the one its sinfo, squeue and scancel
    # ask (the dispatcher's SLURM_CONF), whatever the caller's says
    conf = os.environ.get("SLURM_CONF")
    if conf:
        env[b"SLURM_CONF"] = os.fsencode(conf)
    relay = backend.relay_for()
    env[b"ARV_WRAP_SLURM_HOST"] = os.fsencode(relay.host)
    env[b"ARV_WRAP_SLURM_PORT"] = str(relay.port).encode()
    env[b"ARV_WRAP_SLURM_TOKEN"] = token
    if backend.settings.connect_timeout:
        env[b"ARV_WRAP_SLURM_CONNECT_TIMEOUT"] = os.fsencode(backend.settings.connect_timeout)
    for name in (b"PWD", b"SHLVL"):
        if name in job.env:
            env[b"ARV_WRAP_SLURM_" + name] = b"=" + job.env[name]
    # a nested job's environment preloads the shim: srun and the relay must not
    # redirect the job's own command again (the shim reads this when it loads;
    # the relay gives the tool the caller's value back)
    if b"BASH_ENV" in env:       # no shell Slurm starts first (a task prolog) sources it
        env[b"ARV_WRAP_SLURM_BASH_ENV"] = b"=" + env.pop(b"BASH_ENV")
    if b"ARV_WRAP_DISABLE" in job.env:
        env[b"ARV_WRAP_SLURM_DISABLE"] = b"=" + job.env[b"ARV_WRAP_DISABLE"]
    env[b"ARV_WRAP_DISABLE"] = b"1"
    # slurmstepd gives the task neither the caller's nice (PropagatePrioProcess=0)
    # nor its ignored signals and mask: the relay gives them to the tool
    if job.nice is not None:
        env[b"ARV_WRAP_SLURM_NICE"] = b"%d" % job.nice
    if job.ignored_signals is not None:
        env[b"ARV_WRAP_SLURM_SIGIGN"] = b"%x" % job.ignored_signals
    if job.blocked_signals is not None:
        env[b"ARV_WRAP_SLURM_SIGBLK"] = b"%x" % job.blocked_signals
    env[b"ARV_WRAP_SLURM_USAGE"] = b"1"     # the relay reports what the tool used
    return env

def launcher(backend, rlimits, umask):
    """The client's --launch in front of srun: it dies with the dispatcher
    (PR_SET_PDEATHSIG), and gets the caller's umask and limits where they differ
    from ours (srun carries both to the task)."""
    out = [backend.helper, "--launch", str(os.getpid()), "-u", format(umask & 0o777, "o")]
    root = os.geteuid() == 0
    for res, soft, hard in rlimits:
        if res not in RLIMIT_NAMES:
            continue
        try:
            ours = resource.getrlimit(res)
        except (ValueError, OSError):
            continue
        if (soft, hard) == ours:
            continue
        if not root and _above(hard, ours[1]):
            hard = ours[1]          # an unprivileged process cannot raise its hard limit
        if _above(soft, hard):
            soft = hard
        out += ["-l", f"{res}:{_limit(soft)}:{_limit(hard)}"]
    return out + ["--"]


def _above(a, b):
    """a > b for rlimit values (RLIM_INFINITY is the largest)."""
    inf = resource.RLIM_INFINITY
    return b != inf and (a == inf or a > b)

def _limit(value):
    return "u" if value == resource.RLIM_INFINITY else str(value)
