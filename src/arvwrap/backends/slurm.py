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
ARV_WRAP_SLURM_MAX_JOBS in flight); one monitor thread makes at most one batched
``squeue`` per ARV_WRAP_SLURM_POLL seconds for all jobs of the backend, and only
while there are jobs: it cancels (one ``scancel`` for all) jobs whose srun died,
and ends an srun whose job Slurm no longer knows.
"""
import logging
import math
import os
import re
import resource
import secrets
import select
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time

from arvwrap import paths
from arvwrap.backends import BackendError
from arvwrap.redact import StreamRedactor
from arvwrap.jobspec import Outcome, on_oversize

log = logging.getLogger("arvwrap.dispatcher")
MIB = 1 << 20
KILL_GRACE = 10.0        # s between SIGTERM and SIGKILL of an srun that must end
STREAM_GRACE = 5.0       # s to wait for a stream's end after srun exited
HANDSHAKE_TIMEOUT = 30.0  # s a relay connection may take to send its token
SPOOL_CAP = 64 * MIB     # unread spool bytes at which the pump pauses (job running)
LOG_KEEP = 1 * MIB       # a job's kept stderr: its last LOG_KEEP bytes, once ...
LOG_TRIM_AT = 2 * MIB    # ... the file would pass LOG_TRIM_AT
HOLD_RECHECK = 0.2       # s between checks of a held pipe reader
GONE_POLLS = 3           # polls without its job in squeue before an srun is ended
ENV_DROP = (b"SLURM_", b"SBATCH_", b"SALLOC_", b"SRUN_")
DESCRIPTOR_ARG = re.compile(rb"/dev/fd/\d|/proc/self/fd/\d|/proc/\d+/fd/\d")

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


def _float_env(name, default):
    value = os.environ.get(name)
    try:
        return float(value) if value else default
    except ValueError:
        raise BackendError(f"{name}={value!r} is not a number") from None


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


class Throttle:
    """At most `rate` submissions per second and `limit` jobs in flight, first come first served."""

    def __init__(self, rate, limit):
        self.rate = rate
        self.limit = limit
        self.in_flight = 0
        self.tokens = max(1.0, rate)
        self.stamp = time.monotonic()
        self.queue = []
        self.cond = threading.Condition()

    def acquire(self, job):
        """Wait for a slot; False if the job was cancelled meanwhile."""
        with self.cond:
            job.on_wake = self.wake
            self.queue.append(job)
            try:
                while True:
                    if job.cancel_reason:
                        return False
                    self._refill()
                    if (self.queue[0] is job and self.in_flight < self.limit
                            and self.tokens >= 1):
                        self.tokens -= 1
                        self.in_flight += 1
                        return True
                    wait = None
                    if self.tokens < 1 and self.rate > 0:
                        wait = (1 - self.tokens) / self.rate
                    self.cond.wait(wait)
            finally:
                self.queue.remove(job)
                job.on_wake = None
                self.cond.notify_all()

    def release(self):
        with self.cond:
            self.in_flight -= 1
            self.cond.notify_all()

    def wake(self):
        with self.cond:
            self.cond.notify_all()

    def _refill(self):
        now = time.monotonic()
        if self.rate > 0:
            self.tokens = min(max(1.0, self.rate), self.tokens + (now - self.stamp) * self.rate)
        else:
            self.tokens = 1.0
        self.stamp = now


class Relay:
    """The TCP listener the relays on the nodes connect back to.

    A job registers a one-time token; the first connection that sends "o<token>\\n"
    (stdout) or "e<token>\\n" (stderr) is handed to it. Anything else is dropped.
    """

    def __init__(self, bind_host, advertise_host):
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((bind_host, 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.host = advertise_host
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.waiting = {}          # b"o" + token -> callback(sock, leftover)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        threading.Thread(target=self._serve, name="slurm-relay", daemon=True).start()

    def expect(self, token, on_stdout, on_stderr):
        with self.lock:
            self.waiting[b"o" + token] = on_stdout
            self.waiting[b"e" + token] = on_stderr

    def forget(self, token):
        with self.lock:
            self.waiting.pop(b"o" + token, None)
            self.waiting.pop(b"e" + token, None)

    def _serve(self):
        pending = {}     # sock -> deadline
        while True:
            for key, _ in self.selector.select(timeout=1.0):
                if key.fileobj is self.sock:
                    self._accept(pending)
                else:
                    self._handshake(key.fileobj, pending)
            now = time.monotonic()
            for conn in [c for c, deadline in pending.items() if deadline < now]:
                self._drop(conn, pending, f"no token within {HANDSHAKE_TIMEOUT:g}s")

    def _accept(self, pending):
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(False)
            pending[conn] = time.monotonic() + HANDSHAKE_TIMEOUT
            self.selector.register(conn, selectors.EVENT_READ, None)

    def _handshake(self, conn, pending):
        try:
            head = conn.recv(128, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            head = b""
        end = head.find(b"\n")
        if not head or (end < 0 and len(head) >= 128):
            self._drop(conn, pending, "it sent no token line" if head
                       else "it closed before sending a token")
            return
        if end < 0:
            return
        conn.recv(end + 1)
        with self.lock:
            handler = self.waiting.pop(head[:end], None)
        if handler is None:
            # never the bytes it sent in the log: they may be a real token, mistyped
            self._drop(conn, pending, "its token is no running job's (or was used already)")
            return
        self.selector.unregister(conn)
        del pending[conn]
        conn.setblocking(True)
        handler(conn)

    def _drop(self, conn, pending, why=None):
        if why:
            try:
                peer = "%s:%s" % conn.getpeername()[:2]
            except OSError:
                peer = "a peer gone"
            log.warning("slurm relay: refused a connection from %s: %s", peer, why)
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        pending.pop(conn, None)
        conn.close()


class Log:
    """A job's stderr kept as it arrives (`arv-wrap logs JOB --follow` reads it live),
    capped: the file never passes LOG_TRIM_AT; when it would, it is cut to its last
    bytes, in place, so a reader that holds it open keeps reading the same file."""

    def __init__(self, path):
        self.fd = Log.create(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size

    @staticmethod
    def create(path, mode=os.O_WRONLY):
        """Open the job's log, made 0600 in a 0700 dir if missing (never truncated: the
        job's start and its stream may both come first)."""
        paths.private_dir(os.path.dirname(path))
        return os.open(path, mode | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

    def write(self, data):
        if self.size + len(data) > LOG_TRIM_AT:
            keep = max(0, LOG_KEEP - len(data))
            tail = os.pread(self.fd, keep, self.size - keep) if keep else b""
            os.pwrite(self.fd, tail, 0)
            os.ftruncate(self.fd, len(tail))
            self.size = len(tail)
            data = data[-LOG_KEEP:]
        os.pwrite(self.fd, data, self.size)
        self.size += len(data)

    def close(self):
        _close(self.fd)


class Stream:
    """Copies one relay connection to one of the caller's descriptors, in a thread,
    and to a Log if given one (its path)."""

    def __init__(self, target_fd, log_path=None, secrets=()):
        self.target = target_fd
        self.log_path = log_path
        self.redactor = StreamRedactor(secrets)     # the kept copy never holds a secret
        self.done = threading.Event()
        self.connected = threading.Event()
        self.sock = None

    def attach(self, sock):
        self.sock = sock
        self.connected.set()
        threading.Thread(target=self._copy, daemon=True).start()

    def _copy(self):
        sock, target = self.sock, self.target
        log = None
        try:
            if self.log_path:
                try:
                    log = Log(self.log_path)
                except OSError:
                    pass       # no copy kept; the stream itself is what matters
            while True:
                try:
                    data = sock.recv(1 << 16)
                except OSError:
                    break
                if not data:
                    break
                if log is not None:
                    try:
                        log.write(self.redactor.feed(data))
                    except OSError:
                        log.close()
                        log = None
                if target is None:
                    break       # the caller has no such descriptor: the tool gets EPIPE
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(target, view):]
                except OSError:
                    break       # the caller's reader is gone: close, the tool gets EPIPE
        finally:
            if log is not None:
                try:
                    log.write(self.redactor.flush())
                except OSError:
                    pass
                log.close()
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            self.done.set()

    def finish(self, timeout):
        """Wait for the end of the stream (after srun exited); cut it after timeout."""
        if not self.connected.is_set():
            return
        if not self.done.wait(timeout) and self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.done.wait(1.0)


class Spool:
    """Drains the caller's stdin pipe into an unlinked 0600 file and feeds srun from it.

    While the job waits in Slurm's queue the pump reads without limit, so a writer
    upstream never blocks on it; once the job runs, the pump pauses when SPOOL_CAP
    bytes are unread, as a pipe would make the writer wait for a slow reader.
    """

    def __init__(self, source_fd, spool_dir):
        fd, path = tempfile.mkstemp(prefix="stdin-", suffix=".spool", dir=spool_dir)
        os.unlink(path)
        self.file = fd
        self.source = source_fd
        self.written = 0
        self.fed = 0
        self.eof = False
        self.running = False
        self.stopped = False
        self.cond = threading.Condition()
        self.stop_r, self.stop_w = os.pipe2(os.O_CLOEXEC)
        self.feed_r, self.feed_w = os.pipe2(os.O_CLOEXEC)   # srun's stdin
        self.threads = [threading.Thread(target=self._pump, daemon=True),
                        threading.Thread(target=self._feed, daemon=True)]
        for t in self.threads:
            t.start()

    def srun_started(self):
        """srun holds the read end of its stdin now; ours must go so the feeder sees EPIPE."""
        _close(self.feed_r)
        self.feed_r = None

    def job_running(self):
        with self.cond:
            self.running = True
            self.cond.notify_all()

    def _pump(self):
        try:
            while True:
                with self.cond:
                    while (self.running and not self.stopped
                           and self.written - self.fed >= SPOOL_CAP):
                        self.cond.wait()
                    if self.stopped:
                        return
                ready, _, _ = _select([self.source, self.stop_r])
                if self.stop_r in ready:
                    return
                try:
                    data = os.read(self.source, 1 << 20)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    os.pwrite(self.file, data, self.written)
                with self.cond:
                    if data:
                        self.written += len(data)
                    else:
                        self.eof = True
                    self.cond.notify_all()
                if not data:
                    return
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def _feed(self):
        try:
            while True:
                with self.cond:
                    while self.fed >= self.written and not self.eof and not self.stopped:
                        self.cond.wait()
                    if self.stopped or (self.fed >= self.written and self.eof):
                        return
                    start, end = self.fed, min(self.written, self.fed + (1 << 20))
                data = os.pread(self.file, end - start, start)
                view = memoryview(data)
                while view:
                    view = view[os.write(self.feed_w, view):]
                with self.cond:
                    self.fed += len(data)
                    self.cond.notify_all()
        except OSError:
            pass     # srun stopped reading (the tool ended)
        finally:
            _close(self.feed_w)

    def close(self):
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        os.write(self.stop_w, b"x")
        for t in self.threads:
            t.join(5)
        for fd in (self.file, self.stop_r, self.stop_w, self.feed_r):
            _close(fd)


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


class Backend:
    name = "slurm"

    def __init__(self, config):
        self.rate = _float_env("ARV_WRAP_SLURM_SUBMIT_RATE", 10.0)
        self.max_jobs = int(_float_env("ARV_WRAP_SLURM_MAX_JOBS", 500))
        self.poll = max(0.2, _float_env("ARV_WRAP_SLURM_POLL", 2.0))
        self.timeout = _float_env("ARV_WRAP_SLURM_TIMEOUT", 20.0)
        self.tools = {}
        for tool in ("srun", "scancel", "squeue", "sinfo", "scontrol"):
            path = shutil.which(tool)
            if path is None:
                raise BackendError(f"slurm: {tool} is not installed (not on PATH)")
            self.tools[tool] = path
        # the relay on the nodes and the launcher in front of srun (the shared
        # filesystem makes this path valid on the nodes too)
        self.helper = paths.HELPER
        self.bind_host = os.environ.get("ARV_WRAP_SLURM_LISTEN") or "0.0.0.0"
        self.advertise = os.environ.get("ARV_WRAP_SLURM_HOST")   # else found with the relay
        self._relay_lock = threading.Lock()
        # the dispatcher's state dir, as the client computed it from the same environment
        state = config.get("state_dir") or paths.state_dir()
        self.spool_dir = os.path.join(state, "spool")
        self.log_dir = os.path.join(state, "logs")     # read by `arv-wrap logs`
        self.counters = Counters()
        self.throttle = Throttle(self.rate, max(1, self.max_jobs))
        self.lock = threading.Lock()
        self.relay = None
        self.live = {}             # slurm id -> Live, while its srun runs
        self.orphans = {}          # slurm id -> job name, to cancel (their srun is gone)
        self.orphan_names = set()  # job names to cancel (submissions we gave up on)
        self.trouble_at = None     # when a Slurm command last found no controller
        self.cancelling = set()    # names the monitor is cancelling in this round
        self.monitor_wake = threading.Condition(self.lock)
        self.monitor = None
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
                self._nodes_failed_until = time.monotonic() + max(self.poll, 5.0)
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
        partition = job.slurm.get("partition")
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
        if any(DESCRIPTOR_ARG.search(a) for a in job.argv[1:]) or any(n > 2 for n in job.fds):
            return Outcome("failed", use_local_backend=True,
                           reason="an argument names one of the caller's descriptors "
                                  "(/dev/fd/N), which a Slurm job cannot reach")
        refused = self.fit(job)
        if refused:
            return refused
        stdin, spool_source = self.plan_stdin(job)
        try:
            if spool_source is not None and not hold_until_input(job, spool_source):
                return self.cancelled_before_start(job)
            if not self.throttle.acquire(job):
                return self.cancelled_before_start(job)
            spool = None
            try:
                if spool_source is not None:
                    paths.private_dir(self.spool_dir)
                    spool = Spool(spool_source, self.spool_dir)
                return Live(self, job, started, stdin, spool).run()
            finally:
                self.throttle.release()
                if spool is not None:
                    spool.close()
        finally:
            _close(stdin)

    @staticmethod
    def cancelled_before_start(job):
        reason = job.cancel_reason or "cancelled before it was submitted"
        return Outcome("cancelled", reason=reason,
                       message=f"job {job.id} ({job.tool}) cancelled: {reason}")

    def plan_stdin(self, job):
        """(descriptor for srun's stdin or None for /dev/null, caller pipe to spool or None)."""
        fd = job.fds.get(0)
        if job.stdin == "none" or fd is None:
            return None, None
        if job.stdin == "pass":
            return os.dup(fd), None
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            try:
                again = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return os.dup(fd), None
            os.lseek(again, os.lseek(fd, 0, os.SEEK_CUR), os.SEEK_SET)
            return again, None
        if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            return None, fd
        return os.dup(fd), None

    def relay_for(self):
        with self._relay_lock:
            if self.relay is None:
                self.relay = Relay(self.bind_host, self.advertise or self.own_address())
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
        for key in ("partition", "account", "qos"):
            if job.slurm.get(key):
                args.append(f"--{key}={job.slurm[key]}")
        args += list(job.slurm.get("extra") or ())
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
        if os.environ.get("ARV_WRAP_SLURM_CONNECT_TIMEOUT"):    # the relay's (default 20 s)
            env[b"ARV_WRAP_SLURM_CONNECT_TIMEOUT"] = os.fsencode(
                os.environ["ARV_WRAP_SLURM_CONNECT_TIMEOUT"])
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

    # -- the monitor: one batched squeue per interval, only while jobs run --
    def register(self, live):
        with self.lock:
            self.live[live.attempt.slurm_id] = live
            self.counters.max_in_flight = max(self.counters.max_in_flight, len(self.live))
            if self.monitor is None:
                self.monitor = threading.Thread(target=self._monitor, name="slurm-monitor",
                                                daemon=True)
                self.monitor.start()
            self.monitor_wake.notify_all()

    def forget_by_name(self, name):
        """Cancel, in the background, any job of that name (an answer srun never gave us)."""
        with self.lock:
            self.orphan_names.add(name)
            if self.monitor is None:
                self.monitor = threading.Thread(target=self._monitor, name="slurm-monitor",
                                                daemon=True)
                self.monitor.start()
            self.monitor_wake.notify_all()

    def cleaning(self):
        """Jobs still to cancel (the controller was away when they had to be): the
        dispatcher stays until they are, rather than forget them."""
        with self.lock:
            return bool(self.orphans or self.orphan_names or self.cancelling)

    def abandoned(self, records):
        """Jobs a killed dispatcher held (their srun died with it, the job may not
        have): cancel them by their names, retrying while the controller is away."""
        for record in records:
            argv0 = (record.get("argv") or ["?"])[0]
            self.forget_by_name(job_name(os.path.basename(argv0), record["id"]))

    def unregister(self, live, orphan):
        with self.lock:
            if self.live.get(live.attempt.slurm_id) is live:
                del self.live[live.attempt.slurm_id]
            if orphan:
                self.orphans[live.attempt.slurm_id] = live.name
                self.monitor_wake.notify_all()

    def _monitor(self):
        last = time.monotonic()
        while True:
            with self.lock:
                while not self.live and not self.orphans and not self.orphan_names:
                    self.monitor_wake.wait()
                # at most one round per interval, whatever wakes us
                while time.monotonic() < last + self.poll:
                    self.monitor_wake.wait(last + self.poll - time.monotonic())
                orphans = dict(self.orphans)
                names, self.orphan_names = self.orphan_names, set()
                self.cancelling = set(names)
            last = time.monotonic()
            for name in names:
                done = self.scancel(name=name)
                with self.lock:
                    if done is None or done.returncode != 0:
                        self.orphan_names.add(name)     # the controller is still away
                    self.cancelling.discard(name)
            try:
                out = self._run("squeue", ["-h", "-u", str(os.getuid()), "-o", "%i %T %j"],
                                timeout=self.timeout, counter="status_queries")
            except (subprocess.TimeoutExpired, OSError):
                out = None
            if out is None or out.returncode != 0:
                self.trouble_at = time.monotonic()
                continue
            known, names_of = {}, {}
            for line in out.stdout.splitlines():
                fields = line.split(None, 2)
                if len(fields) == 3:
                    known[fields[0]], names_of[fields[0]] = fields[1], fields[2]
            # an orphan is cancelled only while squeue lists it under its own name: a
            # controller that lost its state may have given its id to another job
            ours = sorted((i for i, name in orphans.items() if names_of.get(i) == name), key=int)
            if ours:
                self.scancel(ours)
            with self.lock:
                # cancelled ones stay until squeue no longer lists them
                self.orphans = {i: n for i, n in self.orphans.items()
                                if i not in orphans or names_of.get(i) == n}
                for slurm_id, live in list(self.live.items()):
                    live.seen(known.get(slurm_id))


class Live:
    """One srun from start to end."""

    def __init__(self, backend, job, started, stdin_fd, spool):
        self.backend = backend
        self.job = job
        self.started = started
        self.stdin_fd = stdin_fd
        self.spool = spool
        self.attempt = Attempt()
        self.name = job_name(job.tool, job.id)
        self.began = time.monotonic()
        self.token = secrets.token_hex(16).encode()
        self.streams = {1: Stream(job.fds.get(1)),
                        2: Stream(job.fds.get(2), os.path.join(backend.log_dir,
                                                               f"{job.id}.stderr"),
                                  getattr(getattr(job, "redactor", None), "values", ()))}
        self.gone_polls = 0
        self.lost = False            # the monitor found the job gone while srun lingers
        self.registered = False

    def seen(self, state):
        """Called by the monitor with the job's squeue state (None: not listed)."""
        if state is None and self.attempt.allocated:
            self.gone_polls += 1
            if self.gone_polls >= GONE_POLLS:
                self.lost = True
                self.job._wake()
        else:
            self.gone_polls = 0

    def run(self):
        b, job, attempt = self.backend, self.job, self.attempt
        relay = b.relay_for()
        relay.expect(self.token, self.streams[1].attach, self.streams[2].attach)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = self.spawn(b.srun_argv(job, self.name), b.srun_env(job, self.token), err_w)
        except OSError as e:
            relay.forget(self.token)
            _close(err_r)
            return Outcome("failed", run_locally=True, reason=f"cannot start srun: {e.strerror}",
                           message=f"cannot start srun: {e.strerror}")
        finally:
            _close(err_w)
        b.counters.add("submissions")
        if self.spool is not None:
            self.spool.srun_started()
        pidfd = os.pidfd_open(pid)
        submitted_at = time.monotonic()
        buffered = b""
        reported = None            # "queued" or "running", what started() was told
        signalled_pending = []     # signals that arrived before the job was allocated
        cancel_sent = False
        term_at = kill_at = None
        grace = KILL_GRACE         # between SIGTERM and SIGKILL of srun
        why = None                 # arv-wrap's reason for ending the job
        steered = False
        watch = Poller([err_r, job.wake_fd, pidfd])
        try:
            while True:
                ready = watch.poll(1.0)
                if err_r in ready:
                    try:
                        chunk = os.read(err_r, 1 << 16)
                    except OSError:
                        chunk = b""
                    if chunk:
                        buffered += chunk
                        *lines, buffered = buffered.split(b"\n")
                        for line in lines:
                            attempt.read(line.decode("utf-8", "replace"))
                    else:
                        watch.forget(err_r)   # srun closed its stderr: it is ending
                        ready.append(pidfd)
                if attempt.slurm_id and not self.registered:
                    self.registered = True
                    b.register(self)
                if attempt.slurm_id and attempt.allocated and reported != "running":
                    reported = "running"
                    try:                # `arv-wrap logs` of a running job finds its log
                        os.close(Log.create(self.streams[2].log_path))
                    except OSError:
                        pass
                    if self.spool:
                        self.spool.job_running()
                    self.started(attempt.slurm_id)
                elif attempt.slurm_id and reported is None:
                    reported = "queued"
                    self.started(attempt.slurm_id, state="queued")
                now = time.monotonic()
                for signum in job.take_signals():
                    steered = True
                    signalled_pending.append(signum)
                if signalled_pending and attempt.slurm_id:
                    if attempt.allocated:
                        for signum in signalled_pending:
                            b.scancel([attempt.slurm_id], signum=signum)
                    elif why is None:
                        why = ("signal", signalled_pending[0])   # not started: cancel it
                    signalled_pending = []
                if job.cancel_reason and why is None:
                    why = ("cancel", job.cancel_reason)
                if (why is None and not attempt.slurm_id and b.timeout
                        and now - submitted_at > b.timeout):
                    why = ("timeout", None)
                if self.lost and why is None:
                    why = ("lost", None)
                if why is not None and not cancel_sent:
                    if attempt.slurm_id:
                        cancel_sent = True
                        done = b.scancel([attempt.slurm_id])
                        if done is None or RE_CONTROLLER.search(done.stderr):
                            # no controller to take it, and srun forwards signals through
                            # it: end srun now; the job is cancelled once it answers
                            term_at, grace = now, 1.0
                        term_at = term_at or now + KILL_GRACE
                    elif term_at is None:
                        _kill(pid, signal.SIGTERM)   # srun withdraws its request
                        term_at = now
                if term_at is not None and now >= term_at and kill_at is None:
                    _kill(pid, signal.SIGTERM)
                    kill_at = now + grace
                if kill_at is not None and now >= kill_at:
                    _kill(pid, signal.SIGKILL)
                    kill_at = float("inf")
                if pidfd in ready:
                    status = _reap(pid, pidfd)
                    if status is not None:
                        break
            for line in (buffered + _drain(err_r)).split(b"\n"):
                attempt.read(line.decode("utf-8", "replace"))
        finally:
            os.close(pidfd)
            _close(err_r)
            relay.forget(self.token)
        clean = attempt.wait_status is not None
        if attempt.slurm_id and (not clean or why is not None):
            b.scancel([attempt.slurm_id])       # never leave a job whose srun is gone
        # srun ended while the controller was away: it may never have heard of the
        # end (the job would stay RUNNING there), so it is cancelled once it answers
        doubtful = attempt.controller or (b.trouble_at or 0) >= self.began
        if self.registered:
            b.unregister(self, orphan=attempt.slurm_id is not None and (not clean or doubtful))
        elif not attempt.slurm_id and why is not None:
            b.forget_by_name(self.name)         # a request srun may have left behind
        for stream in self.streams.values():
            stream.finish(STREAM_GRACE if clean else 1.0)
        outcome = self.outcome(status, why, steered)
        outcome.usage = dict(attempt.usage)
        return outcome

    def outcome(self, srun_status, why, steered):
        job, a = self.job, self.attempt
        label = f"job {a.slurm_id} ({job.tool})" if a.slurm_id else f"{job.tool}"
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


def hold_until_input(job, fd):
    """Wait until the caller's stdin pipe has data or EOF, or only the call's own
    ancestors could write into it. False if the job was cancelled meanwhile."""
    checked_at = 0.0
    while True:
        if job.cancel_reason:
            return False
        ready, _, _ = _select([fd, job.wake_fd], HOLD_RECHECK)
        if fd in ready:
            return True
        if job.wake_fd in ready:
            pending = job.take_signals()
            if pending:
                for signum in pending:
                    job.signal(signum)   # keep them for the job; a signal before start cancels
                return True
        now = time.monotonic()
        if now - checked_at >= 1.0:
            checked_at = now
            if writers_are_ancestors(fd):
                return True


def writers_are_ancestors(fd):
    """True if every process that holds the write end of the pipe at fd is an ancestor of
    a process reading it at its fd 0 (a driver that made the pipe and may never write)."""
    try:
        ino = os.fstat(fd).st_ino
    except OSError:
        return True
    target = f"pipe:[{ino}]" if stat.S_ISFIFO(os.fstat(fd).st_mode) else f"socket:[{ino}]"
    me = os.getpid()
    readers, writers, parents = set(), set(), {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                parents[pid] = int(f.read().rsplit(b")", 1)[1].split()[1])
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for n in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{n}") != target:
                    continue
                with open(f"/proc/{pid}/fdinfo/{n}") as f:
                    flags = next((int(line.split()[1], 8) for line in f
                                  if line.startswith("flags:")), 0)
            except (OSError, StopIteration, ValueError):
                continue
            if n == "0":
                readers.add(pid)
            if flags & 3 in (1, 2):
                writers.add(pid)
    ancestors = set()
    for pid in readers:
        seen = 0
        while pid in parents and pid > 1 and seen < 512:
            pid = parents[pid]
            ancestors.add(pid)
            seen += 1
    return not (writers - ancestors)


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


class Poller:
    """The descriptors of fds that are readable or hung up, by poll (no 1024 limit)."""

    def __init__(self, fds):
        self.poller = select.poll()
        for fd in fds:
            self.poller.register(fd, select.POLLIN | select.POLLPRI)

    def forget(self, fd):
        self.poller.unregister(fd)

    def poll(self, timeout=None):
        ms = None if timeout is None else max(0, int(timeout * 1000))
        while True:
            try:
                return [fd for fd, _ in self.poller.poll(ms)]
            except InterruptedError:
                continue


def _select(fds, timeout=None):
    """([readable or hung-up fds], [], []) like select.select."""
    return Poller(fds).poll(timeout), [], []


def _reap(pid, pidfd):
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 255
    if got == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _drain(fd):
    out = b""
    try:
        while True:
            ready, _, _ = _select([fd], 0)
            if not ready:
                break
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            out += chunk
    except OSError:
        pass
    return out


def _kill(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _close(fd):
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
