"""The Slurm backend: every redirected call becomes one Slurm job, run by one srun.

Shape of one job
----------------
The dispatcher starts ``arv-wrap-helper --launch ... -- srun -v -N1 -n1 ...
arv-wrap-helper --relay argv0 path args...`` as its own child, in a session of its
own; the launcher (csrc/helper/launch.c) makes srun die with the dispatcher
(PR_SET_PDEATHSIG), gives it the caller's umask and resource limits (srun carries
both to the task) and execs it. srun gets the job's environment minus every
``SLURM_*``/``SBATCH_*``/``SALLOC_*``/``SRUN_*`` variable (so a job started from
inside another job is a new job, not a step of that allocation).

Slurm 22.05 line-buffers a task's output unless ``srun -u``, which runs the task on
a pseudo-terminal (the tool would see a tty, and its stderr is lost). So the
task's stdout and stderr do not go through srun at all: the relay (the helper
binary's --relay mode, csrc/helper/relay.c, at paths.HELPER, which the shared filesystem makes visible on
the nodes like the tools themselves) connects its fd 1 and fd 2 to a TCP listener of
this backend (each connection opened with a one-time secret token passed in the
environment, never in argv), restores PWD, SHLVL, ARV_WRAP_DISABLE and BASH_ENV as
the caller had them, and starts the tool as its child with its own argv[0] by a raw
execve syscall, giving it the caller's nice, ignored signals and signal mask (which
slurmstepd does not pass on); srun and the relay run with ARV_WRAP_DISABLE=1, so in a
nested job, whose environment preloads the shim, the job's own command is not
redirected again. The dispatcher copies each connection to the caller's own fd 1 and
fd 2: live to the byte, binary exact, separate, and nothing of Slurm's in them; a
capped copy of stderr is kept in <state dir>/logs/<job id>.stderr as it arrives.
srun's own stderr then carries only Slurm's messages and the relay's, which are read
(never shown) to learn the job id, when it was allocated, the task's exact wait
status (``status=0x....``: the relay ends as the tool did), what the tool used
(the relay's ``usage`` line from wait4: there is no accounting database to ask) and
why Slurm ended it (time limit, memory, cancel) or refused it.

stdin goes through srun (which reads its input eagerly), chosen per the rule's
``stdin``: ``none`` -> ``--input=none``; ``pass`` -> the caller's fd 0 as is;
``auto`` -> a regular file is reopened at the caller's offset (the caller's own
offset never moves, so ``while read f; do tool "$f"; done < list`` sees every
line), /dev/null and terminals are passed, and a pipe or socket is pumped by the
dispatcher into a spool file (0600, unlinked at once) that feeds srun, so the
writer never blocks on a reader that waits in Slurm's queue. A job whose stdin is
such a pipe is submitted only once data or EOF is there (unless only its own
ancestors hold the pipe's write end, as a driver that never writes does), so a
reader never holds the node while its writer waits for it.

Many jobs: submissions go through a throttle (ARV_WRAP_SLURM_SUBMIT_RATE jobs/s,
ARV_WRAP_SLURM_MAX_JOBS in flight); one status poller makes at most one batched
``squeue`` per ARV_WRAP_SLURM_POLL seconds for all jobs of the backend, and only
while there are jobs: it cancels (one ``scancel`` for all) jobs whose srun died,
and ends an srun whose job Slurm no longer knows.

The relay, the streams, the stdin spool, the throttle and the poller are the shared
remote machinery of arvwrap.backends.remote; this module is what is Slurm's: srun,
its messages, sinfo, squeue and scancel. A background thread that crashes fails
the jobs it concerns (arvwrap.backends.remote.guard); one that keeps crashing
stops the backend: its later jobs fail at once (or run locally, as
on_backend_error says).
"""
import logging
import math
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional

from arvwrap import paths
from arvwrap.backends import BackendError, base
from arvwrap.backends.remote import fds, guard
from arvwrap.backends.remote.poller import StatusPoller
from arvwrap.backends.remote.relay import Relay
from arvwrap.backends.remote.spool import Spool, hold_until_input, plan_stdin
from arvwrap.backends.remote.streams import Log, Stream
from arvwrap.backends.remote.throttle import Throttle
from arvwrap.jobspec import Outcome, on_oversize

log = logging.getLogger("arvwrap.dispatcher")
MIB = 1 << 20
KILL_GRACE = 10.0        # s between SIGTERM and SIGKILL of an srun that must end
STREAM_GRACE = 5.0       # s to wait for a stream's end after srun exited
GONE_POLLS = 3           # polls without its job in squeue before an srun is ended
ENV_DROP = (b"SLURM_", b"SBATCH_", b"SALLOC_", b"SRUN_")


@dataclass
class Settings:
    """ARV_WRAP_SLURM_SUBMIT_RATE, _MAX_JOBS, _POLL, _TIMEOUT, _LISTEN, _HOST (README)."""
    submit_rate: float = 10.0      # submissions per second
    max_jobs: int = field(default=500, metadata={"parse": lambda text: int(float(text)),
                                                 "expected": "a number"})
    poll: float = 2.0              # s between batched squeue rounds (0.2 at least)
    timeout: float = 20.0          # s to wait for a controller that does not answer
    listen: str = "0.0.0.0"        # where the stream relay listens
    host: Optional[str] = None     # the address the nodes connect to (else found)
    connect_timeout: Optional[str] = None   # the relay's, on the node (default 20 s)


@dataclass
class Options:
    """The whitelist's `slurm:` block (a file's, then its tools')."""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    extra: List[str] = field(default_factory=list, metadata={"merge": "append"})

# What of the caller's process state reaches the tool on the node, for `arv-wrap check`
# (srun carries the environment, the cwd path, umask and soft limits; the relay the rest).
PROCESS_STATE = (
    "crosses to the node: argv, environment (minus SLURM_*, SBATCH_*, SALLOC_*, SRUN_*; "
    "Slurm adds its SLURM_*, SRUN_DEBUG and, if unset, TMPDIR), cwd path, umask, soft "
    "rlimits (as PropagateResourceLimits says), nice (if the node lets the user set it), "
    "ignored signals, signal mask",
    "does not cross: descriptors other than 0-2 (a /dev/fd argument runs the call on the "
    "local backend), credentials beyond the user (the job has the gid and groups Slurm "
    "looks up for the user), hard rlimits and the msgqueue, nice, rtprio, rttime and "
    "sigpending limits, CPU affinity, cgroup, namespaces, oom_score_adj, no_new_privs",
    "stdout and stderr are sockets; stdin goes through srun as the rule's stdin says",
)

# srun -v lines (its own, on its stderr)
RE_QUEUED = re.compile(r"^srun: job (\d+) queued and waiting for resources")
RE_ALLOCATED = re.compile(r"^srun: (?:jobid (\d+): nodes|job (\d+) has been allocated resources)")
RE_STATUS = re.compile(r"Received task exit notification for \d+ task of StepId=(\d+)\.\d+ "
                       r"\(status=0x([0-9a-fA-F]+)\)")
RE_CANCELLED = re.compile(r"\*\*\* (?:STEP|JOB) (\d+)(?:\.\d+)? ON \S+ CANCELLED AT \S+"
                          r"(?: DUE TO (.*?))?(?: \*\*\*|$)")
RE_MEMORY = re.compile(r"exceeded (?:job )?memory limit|oom-kill|out of memory", re.I)
RE_REFUSED = re.compile(r"Unable to allocate resources: (.*)")
RE_CONTROLLER = re.compile(r"Unable to contact slurm controller|Slurm controller not responding|"
                           r"Socket timed out on send/recv|Communication connection failure|"
                           r"Unable to establish Slurm connection", re.I)
RE_ERROR = re.compile(r"^(?:srun|slurmstepd[-\w]*): error: (.*)")
RE_USAGE = re.compile(r"^arv-wrap-relay: usage (\d+) (\d+) (\d+)$")
RE_RELAY = re.compile(r"^arv-wrap-relay: (.*)")
RE_EXEC_FAILED = re.compile(r"execve\(\): (.*)")

RLIMIT_NAMES = {getattr(resource, f"RLIMIT_{n.upper()}"): n for n in (
    "as", "core", "cpu", "data", "fsize", "memlock", "msgqueue", "nice", "nofile", "nproc",
    "rss", "rtprio", "rttime", "sigpending", "stack") if hasattr(resource, f"RLIMIT_{n.upper()}")}


class Counters:
    """What the backend asked of Slurm, for `arv-wrap doctor` and the bench."""

    def __init__(self):
        self.lock = threading.Lock()
        self.submissions = 0       # srun started
        self.status_queries = 0    # squeue calls
        self.cancels = 0           # scancel calls
        self.other_queries = 0     # sinfo / scontrol ping
        self.max_in_flight = 0

    def add(self, name, n=1):
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self):
        with self.lock:
            return {k: v for k, v in vars(self).items() if k != "lock"}


class Attempt:
    """What srun has said so far about one job."""

    def __init__(self):
        self.slurm_id = None
        self.allocated = False
        self.wait_status = None
        self.cancelled = None        # None, or Slurm's reason ("" for a plain cancel)
        self.memory = False
        self.refused = None
        self.controller = None
        self.relay_error = None
        self.no_relay = None         # the node could not run the relay (not on a shared fs?)
        self.usage = {}              # what the tool used, as the relay measured it
        self.errors = []
        self.in_options = False      # inside srun -v's echo of its options

    def read(self, line):
        # srun -v first echoes its options, the job's cwd and name among them: never
        # read those as messages (a directory named like one must not fake a status)
        if self.in_options or line == "srun: defined options":
            self.in_options = line != "srun: end of defined options"
            return
        m = RE_QUEUED.match(line)
        if m:
            self.slurm_id = self.slurm_id or m.group(1)
            return
        m = RE_ALLOCATED.match(line)
        if m:
            self.slurm_id = self.slurm_id or m.group(1) or m.group(2)
            self.allocated = True
            return
        m = RE_STATUS.search(line)
        if m:
            self.wait_status = int(m.group(2), 16)
            return
        m = RE_CANCELLED.search(line)
        if m:
            self.cancelled = (m.group(2) or "").strip()
            return
        if RE_MEMORY.search(line):
            self.memory = True
        m = RE_USAGE.match(line)
        if m:
            utime, stime, maxrss = (int(g) for g in m.groups())
            self.usage = {"cpu_seconds": round((utime + stime) / 1e6, 3),
                          "max_rss": maxrss * 1024}
            return
        m = RE_RELAY.match(line)
        if m:
            self.relay_error = m.group(1)
            return
        if RE_CONTROLLER.search(line):
            self.controller = line.split("error: ", 1)[-1].strip()
        m = RE_REFUSED.search(line)
        if m and not RE_CONTROLLER.search(m.group(1)):
            self.refused = m.group(1).strip()
        m = RE_ERROR.match(line)
        if m:
            self.errors.append(m.group(1).strip())
            failed = RE_EXEC_FAILED.match(m.group(1))
            if failed and failed.group(1).startswith(paths.HELPER + ":"):
                self.no_relay = failed.group(1).strip()


class Backend(base.RemoteBackend):
    name = "slurm"
    Settings = Settings
    Options = Options
    carries_descriptors = False
    fractional_cpus = False
    relays_streams = True
    shared_filesystem = True
    process_state = PROCESS_STATE
    job_noun = "a Slurm job"

    def __init__(self, config=None, state_dir=None):
        super().__init__(config, state_dir)
        self.rate = self.settings.submit_rate
        self.max_jobs = int(self.settings.max_jobs)
        self.poll_interval = max(0.2, self.settings.poll)
        self.timeout = self.settings.timeout
        self.tools = {}
        for tool in ("srun", "scancel", "squeue", "sinfo", "scontrol"):
            path = shutil.which(tool)
            if path is None:
                raise BackendError(f"slurm: {tool} is not installed (not on PATH)")
            self.tools[tool] = path
        # the relay on the nodes and the launcher in front of srun (the shared
        # filesystem makes this path valid on the nodes too)
        self.helper = paths.HELPER
        self.bind_host = self.settings.listen
        self.advertise = self.settings.host     # else found with the relay
        self._relay_lock = threading.Lock()
        # the dispatcher's state dir, as the client computed it from the same environment
        state = state_dir or paths.state_dir()
        self.spool_dir = os.path.join(state, "spool")
        self.log_dir = os.path.join(state, "logs")     # read by `arv-wrap logs`
        self.counters = Counters()
        self.throttle = Throttle(self.rate, max(1, self.max_jobs))
        self.relay = None
        self.stopped = None        # why it takes no more jobs (a machinery thread died)
        self.trouble_at = None     # when a Slurm command last found no controller
        self.poller = StatusPoller("the slurm status poller", self.poll, self.cancel,
                                   self.poll_interval, on_give_up=self.stop)
        self._nodes = None
        self._nodes_at = 0.0
        self._nodes_lock = threading.Lock()
        self._nodes_failed_until = 0.0
        self._config = None
        self._config_lock = threading.Lock()

    # -- answers --
    def check(self):
        try:
            out = self._run("scontrol", ["ping"], timeout=self.timeout, counter="other_queries")
        except subprocess.TimeoutExpired:
            raise BackendError(f"slurm: the controller did not answer within {self.timeout:g}s")
        text = (out.stdout + out.stderr).strip()
        if "is UP" not in text:
            raise BackendError(f"slurm: the controller does not answer: {text or out.returncode}")
        cpus, memory = self.largest()
        stats = self.counters.snapshot()
        host = self.relay.host if self.relay else self.advertise or self.own_address()
        return (f"slurm: {text}; largest node: {cpus} CPUs, {memory // MIB} MiB; "
                f"nodes send the streams to {host}; "
                f"{stats['submissions']} submitted, {stats['status_queries']} status queries")

    def stats(self):
        return self.counters.snapshot()

    # -- sizing --
    def nodes(self):
        """[(partition, cpus, memory bytes, max time s or None, default?, node)], cached 60 s;
        one sinfo at a time, whatever the number of jobs asking."""
        with self._nodes_lock:
            now = time.monotonic()
            if self._nodes is not None and now - self._nodes_at < 60:
                return self._nodes
            if now < self._nodes_failed_until:     # the controller just did not answer
                raise subprocess.TimeoutExpired("sinfo", self.timeout)
            try:
                return self._read_nodes()
            except subprocess.TimeoutExpired:
                self._nodes_failed_until = time.monotonic() + max(self.poll_interval, 5.0)
                raise

    def _read_nodes(self):
        out = self._run("sinfo", ["-h", "-N", "-o", "%P %c %m %l %N"], timeout=self.timeout,
                        counter="other_queries")
        rows = []
        for line in out.stdout.splitlines():
            fields = line.split()
            if len(fields) != 5:
                continue
            part, cpus, mem, limit, node = fields
            try:
                rows.append((part.rstrip("*"), int(cpus), int(mem.rstrip("+")) * MIB,
                             parse_slurm_time(limit), part.endswith("*"), node))
            except ValueError:
                continue
        if not rows:
            raise BackendError(f"slurm: sinfo lists no nodes ({out.stderr.strip()})")
        self._nodes, self._nodes_at = rows, time.monotonic()
        return rows

    def largest(self, partition=None):
        """(cpus, memory bytes) of the largest node (of partition, else the default one)."""
        big = self.largest_node(partition)
        return big["cpus"], big["memory"]

    def largest_node(self, partition):
        rows = self.nodes()
        mine = [r for r in rows if (r[0] == partition if partition else r[4])] or rows
        limits = [r[3] for r in mine]
        return {"cpus": max(r[1] for r in mine), "memory": max(r[2] for r in mine),
                "time": None if None in limits else max(limits),
                "nodes": sorted({r[5] for r in mine})}

    def held_by_caller(self, job, big):
        """(Slurm job id, cpus, memory bytes) that the Slurm job this call was made in
        holds on the only node of the call's partition, or None. A driver run as a
        job (--as-job, nested, an sbatch script) waits for its tools: there a tool can
        only ever get what the driver leaves, and asking more would wait for ever."""
        env = job.env
        try:
            cpus = int(env[b"SLURM_JOB_CPUS_PER_NODE"])     # "2(x3)" for several nodes
            slurm_id = env[b"SLURM_JOB_ID"].decode()
        except (KeyError, ValueError):
            return None
        if big["nodes"] != [env.get(b"SLURM_JOB_NODELIST", b"").decode()]:
            return None
        # MiB: what it asked for, else the cluster's default per CPU, else none known
        per_cpu = env.get(b"SLURM_MEM_PER_CPU") or self.config_value("DefMemPerCPU")
        memory = _mib(env.get(b"SLURM_MEM_PER_NODE")) or cpus * _mib(per_cpu)
        return slurm_id, cpus, memory * MIB

    def fit(self, job):
        """Apply on_oversize against the largest node of the job's partition; None if it fits."""
        partition = self.options(job).partition
        where = f"partition {partition}" if partition else "the cluster"
        offerer = f"the largest node of {where}"
        try:
            big = self.largest_node(partition)
            held = self.held_by_caller(job, big)
        except subprocess.TimeoutExpired:
            text = f"the slurm controller did not answer within {self.timeout:g}s (sinfo)"
            return Outcome("failed", run_locally=True, reason=text, message=text)
        except (BackendError, OSError):
            return None       # let Slurm itself judge the request
        if held:
            slurm_id, cpus, memory = held
            offerer = (f"the only node of {where} beside Slurm job {slurm_id}, which made "
                       f"this call and waits for it,")
            big = dict(big, cpus=big["cpus"] - cpus, memory=big["memory"] - memory)
            if big["cpus"] < 1 or big["memory"] <= 0:
                text = (f"{job.tool} would wait for ever: Slurm job {slurm_id}, which made "
                        f"this call and waits for it, holds all the CPUs or memory of the "
                        f"only node of {where}")
                return Outcome("failed", reason=text, message=text)
        too_big = []
        if math.ceil(job.cpus) > big["cpus"]:
            too_big.append(("cpus", f"{job.cpus:g} CPUs", f"{big['cpus']} CPUs"))
        if job.memory and job.memory > big["memory"]:
            too_big.append(("memory", f"{job.memory // MIB} MiB of memory",
                            f"{big['memory'] // MIB} MiB"))
        if job.time_limit and big["time"] and job.time_limit > big["time"]:
            too_big.append(("time", f"a time limit of {job.time_limit}s", f"{big['time']}s"))
        refused = on_oversize(job, too_big, offerer)
        if refused or not too_big:
            return refused
        job.cpus = min(job.cpus, big["cpus"])
        if job.memory:
            job.memory = min(job.memory, big["memory"])
        if job.time_limit and big["time"]:
            job.time_limit = min(job.time_limit, big["time"])
        return None

    # -- one job --
    def run(self, job, started):
        if self.stopped:
            text = f"the slurm backend stopped: {self.stopped}"
            return Outcome("failed", run_locally=True, reason=text, message=text)
        refused = self.fit(job)
        if refused:
            return refused
        stdin, spool_source = plan_stdin(job)
        try:
            if spool_source is not None and not hold_until_input(job, spool_source):
                return self.cancelled_before_start(job)
            if not self.throttle.acquire(job):
                return self.cancelled_before_start(job)
            try:
                return self.run_admitted(job, started, stdin, spool_source)
            finally:
                self.throttle.release()
        finally:
            fds.close(stdin)

    def run_admitted(self, job, started, stdin, spool_source):
        """The job, once the throttle let it go: its stdin spooled if need be, and srun."""
        failure = guard.JobFailure(job)
        spool = None
        try:
            if spool_source is not None:
                paths.private_dir(self.spool_dir)
                spool = Spool(spool_source, self.spool_dir, f"the stdin of job {job.id}",
                              on_fail=failure)
            return Live(self, job, started, stdin, spool, failure).run()
        finally:
            if spool is not None:
                spool.close()

    @staticmethod
    def cancelled_before_start(job):
        reason = job.cancel_reason or "cancelled before it was submitted"
        return Outcome("cancelled", reason=reason,
                       message=f"job {job.id} ({job.tool}) cancelled: {reason}")

    def stop(self, reason):
        """A thread of its machinery gave up: take no more jobs (each fails at once)."""
        log.error("the slurm backend stops taking jobs: %s", reason)
        self.stopped = reason

    def relay_for(self):
        with self._relay_lock:
            if self.relay is None:
                self.relay = Relay(self.bind_host, self.advertise or self.own_address(),
                                   "the slurm stream relay", on_give_up=self.stop,
                                   label="slurm relay")
            return self.relay

    def own_address(self):
        """Where the nodes reach this host: its address on the route to the controller.
        Its name is only the fallback: Debian maps a host's own name to 127.0.1.1,
        which would send every node to itself."""
        controller = controller_address(self.config())
        return (controller and route_address(*controller)) or _name_address()

    def config(self):
        """`scontrol show config`, read once ("" while the controller does not answer)."""
        with self._config_lock:
            if self._config is None:
                try:
                    out = self._run("scontrol", ["show", "config"],
                                    timeout=min(self.timeout, 5), counter="other_queries")
                except (subprocess.TimeoutExpired, OSError):
                    return ""
                self._config = out.stdout if out.returncode == 0 else None
            return self._config or ""

    def config_value(self, key):
        m = re.search(rf"^{key}\s*=\s*(\S+)", self.config(), re.M)
        return m and m.group(1)

    def srun_argv(self, job, name):
        args = [self.tools["srun"], "-v", "-N1", "-n1", f"--job-name={name}",
                f"--cpus-per-task={max(1, math.ceil(job.cpus - 1e-9))}"]
        if job.memory:
            args.append(f"--mem={max(1, -(-job.memory // MIB))}M")
        if job.time_limit:
            args.append(f"--time={max(1, -(-job.time_limit // 60))}")
        options = self.options(job)
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
        args += [self.helper, "--relay", job.path,
                 *(b"+" + a if a == b":" or a.startswith(b"+") else a for a in tool_argv)]
        return [os.fsencode(a) for a in args]

    def srun_env(self, job, token):
        env = {k: v for k, v in job.env.items() if not k.startswith(ENV_DROP)}
        relay = self.relay_for()
        env[b"ARV_WRAP_SLURM_HOST"] = os.fsencode(relay.host)
        env[b"ARV_WRAP_SLURM_PORT"] = str(relay.port).encode()
        env[b"ARV_WRAP_SLURM_TOKEN"] = token
        if self.settings.connect_timeout:
            env[b"ARV_WRAP_SLURM_CONNECT_TIMEOUT"] = os.fsencode(self.settings.connect_timeout)
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

    def launcher(self, rlimits, umask):
        """The client's --launch in front of srun: it dies with the dispatcher
        (PR_SET_PDEATHSIG), and gets the caller's umask and limits where they differ
        from ours (srun carries both to the task)."""
        out = [self.helper, "--launch", str(os.getpid()), "-u", format(umask & 0o777, "o")]
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

    # -- Slurm commands --
    def _run(self, tool, args, timeout, counter):
        self.counters.add(counter)
        return subprocess.run([self.tools[tool], *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def scancel(self, ids=(), name=None, signum=None):
        args = []
        if signum:
            args.append(f"--signal={signum}")
        if name:
            args.append(f"--name={name}")
        args += [str(i) for i in ids]
        try:
            done = self._run("scancel", args, timeout=self.timeout, counter="cancels")
        except (subprocess.TimeoutExpired, OSError):
            done = None
        if done is None or RE_CONTROLLER.search(done.stderr):
            self.trouble_at = time.monotonic()
        return done

    # -- asked by the status poller: one batched squeue per round --
    def poll(self, ids):
        """{slurm id: (state, job name)} of every job of ours that squeue lists; None
        if it failed."""
        try:
            out = self._run("squeue", ["-h", "-u", str(os.getuid()), "-o", "%i %T %j"],
                            timeout=self.timeout, counter="status_queries")
        except (subprocess.TimeoutExpired, OSError):
            out = None
        if out is None or out.returncode != 0:
            self.trouble_at = time.monotonic()
            return None
        known = {}
        for line in out.stdout.splitlines():
            fields = line.split(None, 2)
            if len(fields) == 3:
                known[fields[0]] = (fields[1], fields[2])
        return known

    def cancel(self, ids, signum=None):
        done = self.scancel(sorted(ids, key=int), signum=signum)
        return done is not None and done.returncode == 0

    def register(self, live):
        count = self.poller.watch(live.attempt.slurm_id, live)
        self.counters.max_in_flight = max(self.counters.max_in_flight, count)

    def forget_by_name(self, name):
        """Cancel, in the background, any job of that name (an answer srun never gave us)."""
        def cancelled():
            done = self.scancel(name=name)
            return done is not None and done.returncode == 0
        self.poller.retry(cancelled)

    def unregister(self, live, orphan):
        self.poller.unwatch(live.attempt.slurm_id, live, orphan=orphan, name=live.name)

    def cleaning(self):
        """Jobs still to cancel (the controller was away when they had to be): the
        dispatcher stays until they are, rather than forget them."""
        return self.poller.cleaning()

    def abandoned(self, records):
        """Jobs a killed dispatcher held (their srun died with it, the job may not
        have): cancel them by their names, retrying while the controller is away."""
        for record in records:
            argv0 = (record.get("argv") or ["?"])[0]
            self.forget_by_name(job_name(os.path.basename(argv0), record["id"]))


class Live:
    """One srun from start to end: submit, follow what srun says while steering the
    job (signals, cancel, timeouts, failures), conclude."""

    def __init__(self, backend, job, started, stdin_fd, spool, failure=None):
        self.backend = backend
        self.job = job
        self.started = started
        self.stdin_fd = stdin_fd
        self.spool = spool
        self.failure = failure or guard.JobFailure(job)
        self.attempt = Attempt()
        self.name = job_name(job.tool, job.id)
        self.began = time.monotonic()
        self.token = secrets.token_hex(16).encode()
        self.streams = {
            1: Stream(job.fds.get(1), what=f"the stdout of job {job.id}", on_fail=self.failure),
            2: Stream(job.fds.get(2), os.path.join(backend.log_dir, f"{job.id}.stderr"),
                      what=f"the stderr of job {job.id}", on_fail=self.failure,
                      secrets=getattr(getattr(job, "redactor", None), "values", ()))}
        self.gone_polls = 0
        self.lost = False            # the poller found the job gone while srun lingers
        self.registered = False
        self.pid = self.pidfd = self.err_r = None
        self.submitted_at = None
        self.buffered = b""          # srun's last partial line
        self.reported = None         # "queued" or "running", what started() was told
        self.signalled_pending = []  # signals that arrived before the job was allocated
        self.cancel_sent = False
        self.term_at = self.kill_at = None
        self.grace = KILL_GRACE      # between SIGTERM and SIGKILL of srun
        self.why = None              # arv-wrap's reason for ending the job
        self.steered = False

    def seen(self, state):
        """Called by the poller with the job's squeue state (None: not listed)."""
        if state is None and self.attempt.allocated:
            self.gone_polls += 1
            if self.gone_polls >= GONE_POLLS:
                self.lost = True
                self.job._wake()
        else:
            self.gone_polls = 0

    def fail(self, reason):
        """arv-wrap's own machinery failed the job (the poller, for one)."""
        self.failure(reason)

    def run(self):
        relay = self.backend.relay_for()
        relay.expect(self.token, self.streams[1].attach, self.streams[2].attach, self.failure)
        try:
            refused = self.submit()
            if refused:
                return refused
            try:
                status = self.follow()
            finally:
                os.close(self.pidfd)
                fds.close(self.err_r)
        finally:
            relay.forget(self.token)
        return self.conclude(status)

    def submit(self):
        """Start srun; the Outcome if it cannot start."""
        b, job = self.backend, self.job
        self.err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.pid = self.spawn(b.srun_argv(job, self.name), b.srun_env(job, self.token), err_w)
        except OSError as e:
            fds.close(self.err_r)
            text = f"cannot start srun: {e.strerror}"
            return Outcome("failed", run_locally=True, reason=text, message=text)
        finally:
            fds.close(err_w)
        b.counters.add("submissions")
        if self.spool is not None:
            self.spool.reader_started()
        self.pidfd = os.pidfd_open(self.pid)
        self.submitted_at = time.monotonic()
        return None

    def follow(self):
        """Read srun's messages and steer the job until srun ended; srun's status."""
        watch = fds.Readable([self.err_r, self.job.wake_fd, self.pidfd])
        while True:
            ready = watch.poll(1.0)
            if self.err_r in ready and not self.read_srun():
                watch.forget(self.err_r)   # srun closed its stderr: it is ending
                ready.append(self.pidfd)
            self.report()
            now = time.monotonic()
            self.steer(now)
            self.escalate(now)
            if self.pidfd in ready:
                status = _reap(self.pid)
                if status is not None:
                    break
        for line in (self.buffered + fds.drain(self.err_r)).split(b"\n"):
            self.attempt.read(line.decode("utf-8", "replace"))
        return status

    def read_srun(self):
        """Read what srun said; False at its end."""
        try:
            chunk = os.read(self.err_r, 1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            return False
        self.buffered += chunk
        *lines, self.buffered = self.buffered.split(b"\n")
        for line in lines:
            self.attempt.read(line.decode("utf-8", "replace"))
        return True

    def report(self):
        """Tell the poller and the dispatcher what srun said of the job."""
        a = self.attempt
        if a.slurm_id and not self.registered:
            self.registered = True
            self.backend.register(self)
        if a.slurm_id and a.allocated and self.reported != "running":
            self.reported = "running"
            try:                # `arv-wrap logs` of a running job finds its log
                os.close(Log.create(self.streams[2].log_path))
            except OSError:
                pass
            if self.spool:
                self.spool.job_running()
            self.started(a.slurm_id)
        elif a.slurm_id and self.reported is None:
            self.reported = "queued"
            self.started(a.slurm_id, state="queued")

    def steer(self, now):
        """Forward the caller's signals; decide whether arv-wrap ends the job (why)."""
        a = self.attempt
        for signum in self.job.take_signals():
            self.steered = True
            self.signalled_pending.append(signum)
        if self.signalled_pending and a.slurm_id:
            if a.allocated:
                for signum in self.signalled_pending:
                    self.backend.scancel([a.slurm_id], signum=signum)
            elif self.why is None:
                self.why = ("signal", self.signalled_pending[0])   # not started: cancel it
            self.signalled_pending = []
        if self.why is None:
            self.why = self.reason_to_end(now)

    def reason_to_end(self, now):
        b = self.backend
        if self.job.cancel_reason:
            return ("cancel", self.job.cancel_reason)
        if not self.attempt.slurm_id and b.timeout and now - self.submitted_at > b.timeout:
            return ("timeout", None)
        if self.lost:
            return ("lost", None)
        if self.failure.reason:
            return ("failure", self.failure.reason)
        return None

    def escalate(self, now):
        """End a job arv-wrap decided to end: scancel, then SIGTERM and SIGKILL srun."""
        if self.why is not None and not self.cancel_sent:
            if self.attempt.slurm_id:
                self.cancel_sent = True
                done = self.backend.scancel([self.attempt.slurm_id])
                if done is None or RE_CONTROLLER.search(done.stderr):
                    # no controller to take it, and srun forwards signals through
                    # it: end srun now; the job is cancelled once it answers
                    self.term_at, self.grace = now, 1.0
                self.term_at = self.term_at or now + KILL_GRACE
            elif self.term_at is None:
                _kill(self.pid, signal.SIGTERM)   # srun withdraws its request
                self.term_at = now
        if self.term_at is not None and now >= self.term_at and self.kill_at is None:
            _kill(self.pid, signal.SIGTERM)
            self.kill_at = now + self.grace
        if self.kill_at is not None and now >= self.kill_at:
            _kill(self.pid, signal.SIGKILL)
            self.kill_at = float("inf")

    def conclude(self, status):
        """Leave nothing behind, wait for the streams' ends; the Outcome."""
        b, a = self.backend, self.attempt
        clean = a.wait_status is not None
        if a.slurm_id and (not clean or self.why is not None):
            b.scancel([a.slurm_id])       # never leave a job whose srun is gone
        # srun ended while the controller was away: it may never have heard of the
        # end (the job would stay RUNNING there), so it is cancelled once it answers
        doubtful = a.controller or (b.trouble_at or 0) >= self.began
        if self.registered:
            b.unregister(self, orphan=a.slurm_id is not None and (not clean or doubtful))
        elif not a.slurm_id and self.why is not None:
            b.forget_by_name(self.name)   # a request srun may have left behind
        for stream in self.streams.values():
            stream.finish(STREAM_GRACE if clean else 1.0)
        if self.why is None and self.failure.reason:    # a stream failed at its end
            self.why = ("failure", self.failure.reason)
        outcome = self.outcome(status, self.why, self.steered)
        outcome.usage = dict(a.usage)
        return outcome

    def outcome(self, srun_status, why, steered):
        job, a = self.job, self.attempt
        label = f"job {a.slurm_id} ({job.tool})" if a.slurm_id else f"{job.tool}"
        if why and why[0] == "failure":
            text = f"{label}: {why[1]}"
            return Outcome("failed", reason=text, message=text)
        if why and why[0] == "timeout":
            text = (f"the slurm controller did not answer within {self.backend.timeout:g}s"
                    + (f" ({a.controller})" if a.controller else ""))
            return Outcome("failed", run_locally=True, reason=text, message=text)
        if a.controller and not a.slurm_id:
            text = f"the slurm controller does not answer: {a.controller}"
            return Outcome("failed", run_locally=True, reason=text, message=text)
        if why and why[0] == "cancel":
            died = _signal_of(a.wait_status)
            return Outcome("cancelled", reason=why[1], caller_signal=died or signal.SIGTERM,
                           message=f"{label} cancelled: {why[1]}")
        if why and why[0] == "signal":
            text = f"signal {why[1]} before the job started"
            return Outcome("cancelled", reason=text, caller_signal=why[1],
                           message=f"{label} cancelled: {text}")
        if a.no_relay:
            text = (f"{label}: the node cannot run arv-wrap's relay ({a.no_relay}); "
                    f"it must be at the same path on the nodes (a shared filesystem)")
            return Outcome("failed", reason=text, message=text)
        if (a.relay_error and a.wait_status is not None and os.WIFEXITED(a.wait_status)
                and os.WEXITSTATUS(a.wait_status) == 125):
            # the relay could not start the tool (its streams cannot reach us): its 125
            # is arv-wrap's failure, not the tool's status
            text = f"{label}: {a.relay_error}"
            return Outcome("failed", reason=text, message=text)
        if a.wait_status is None:
            if a.refused or (not a.slurm_id and a.errors):
                reasons = [e.split("Unable to allocate resources: ", 1)[-1] for e in a.errors]
                reasons = list(dict.fromkeys(reasons or [a.refused]))
                text = "slurm refused the job: " + "; ".join(reasons)
                return Outcome("failed", reason=text, message=text)
            if a.relay_error:
                text = f"{label}: {a.relay_error}"
                return Outcome("failed", reason=text, message=text)
            if why and why[0] == "lost":
                text = f"{label}: Slurm no longer knows the job and srun did not end"
                return Outcome("failed", reason=text, message=text)
            if a.cancelled is not None:
                return self._killed(signal.SIGKILL)
            if srun_status is not None and srun_status < 0:
                text = f"{label}: srun died of signal {-srun_status}"
            else:
                text = (f"{label}: srun ended (status {srun_status}) without the task's status"
                        + (f": {a.errors[-1]}" if a.errors else ""))
            return Outcome("failed", reason=text, message=text)
        if os.WIFSIGNALED(a.wait_status):
            return self._killed(os.WTERMSIG(a.wait_status), steered)
        code = os.WEXITSTATUS(a.wait_status)
        return Outcome("exited", exit_status=code)

    def _killed(self, signum, steered=False):
        a, job = self.attempt, self.job
        label = f"job {a.slurm_id} ({job.tool})"
        if a.memory:
            text = f"{label} killed by Slurm: it exceeded its memory limit"
        elif a.cancelled:
            text = f"{label} cancelled by Slurm: DUE TO {a.cancelled}"
        elif a.cancelled is not None and not steered:
            text = f"{label} cancelled by Slurm (scancel)"
        else:
            text = None
        return Outcome("signaled", signal=signum, reason=text, message=text)

    def spawn(self, argv, env, err_w):
        """Start srun in a session of its own with the caller's umask and rlimits, killed
        if the dispatcher dies: the client's --launch sets all three and execs srun (one
        small exec, instead of setpriv and prlimit). posix_spawn/vfork through
        subprocess: a fork of the dispatcher costs ~3 ms, this ~0.2 ms."""
        stdin = self.spool.feed_r if self.spool is not None else self.stdin_fd
        launcher = self.backend.launcher(self.job.rlimits, self.job.umask)
        # srun's own cwd is the task's: no --chdir, which `srun -v` would echo raw
        # among the messages it is read for (a cwd's name could fake them)
        proc = subprocess.Popen(launcher + argv, env=env, cwd=self.job.cwd,
                                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err_w,
                                start_new_session=True)
        proc.returncode = 0      # we reap it ourselves; keep Popen's __del__ quiet
        return proc.pid


def job_name(tool, job_id):
    return "arv-wrap:" + re.sub(r"[^A-Za-z0-9._+-]", "_", tool)[:64] + ":" + job_id


def controller_address(config):
    """(host, port) of the primary controller in `scontrol show config`, or None."""
    host = re.search(r"^SlurmctldHost\[0\]\s*=\s*([^\s(]+)(?:\(([^)\s]+)\))?", config, re.M)
    port = re.search(r"^SlurmctldPort\s*=\s*(\d+)", config, re.M)
    if not host:
        return None
    return host.group(2) or host.group(1), int(port.group(1)) if port else 6817


def route_address(host, port):
    """This host's IPv4 address on the route to host (a UDP connect sends nothing)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, socket.AF_INET,
                                                          socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(addr)
            return probe.getsockname()[0]
    except OSError:
        return None


def _name_address():
    """This host's address as its name resolves (the nodes resolve nothing per job)."""
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def _mib(value):
    """A whole number of MiB from Slurm's environment or config; 0 if it is not one."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _above(a, b):
    """a > b for rlimit values (RLIM_INFINITY is the largest)."""
    inf = resource.RLIM_INFINITY
    return b != inf and (a == inf or a > b)


def _limit(value):
    return "u" if value == resource.RLIM_INFINITY else str(value)


def parse_slurm_time(text):
    """Seconds from sinfo's %l ([days-]hours:minutes:seconds, or 'infinite')."""
    if text in ("infinite", "UNLIMITED", "n/a"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return ((days * 24 + h) * 60 + m) * 60 + s


def _signal_of(wait_status):
    if wait_status is not None and os.WIFSIGNALED(wait_status):
        return os.WTERMSIG(wait_status)
    return None


def _reap(pid):
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 255
    if got == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _kill(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
