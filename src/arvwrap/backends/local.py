"""The local backend: an embedded scheduler for this machine.

One dispatcher serves every pipeline of a user on the machine, so its budget of
CPUs and memory is shared by all of them. Jobs are admitted first come, first
served while they fit; a fraction of a CPU is a fraction (four 0.25-CPU jobs share
one core). A job runs as a child of the dispatcher in a session of its own, with
the caller's own descriptors, cwd, umask, rlimits and environment, so its output
reaches the caller's pipes directly and an unread stdin stays unread.

Pipes between jobs never deadlock: a job joined by pipes to a running job is
admitted at once, even over budget, because the running job may be blocked
writing into it (or waiting to read from it). Joined means directly (one's
stdout is the other's stdin) or through local processes in between, as in
`gzip -dc | tr | sort`, which the dispatcher finds by following stdin/stdout
pipes through /proc.
"""
import fcntl
import os
import resource
import select
import signal
import stat
import threading
import time

from arvwrap.jobspec import Outcome, on_oversize

KILL_GRACE = 5.0   # seconds between SIGTERM and SIGKILL when arv-wrap ends a job
MILLI = 1000       # CPUs are counted in thousandths
RECHECK = 0.2      # seconds between pipe checks of a queued job


def parse_budget(config):
    cpus = config.get("cpus") or len(os.sched_getaffinity(0))
    memory = config.get("memory") or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return float(cpus), int(memory)


class Claim:
    """What one job holds or waits for."""

    def __init__(self, job, cpus, memory):
        self.job = job
        self.cpus = round(cpus * MILLI)
        self.memory = memory or 0
        self.pipes = pipe_ends(job.fds)


def pipe_ends(fds):
    """{(dev, ino): 'r' or 'w'} for the job's standard descriptors that are pipes."""
    ends = {}
    for number, mode in ((0, "r"), (1, "w"), (2, "w")):
        fd = fds.get(number)
        if fd is None:
            continue
        st = os.fstat(fd)
        if stat.S_ISFIFO(st.st_mode):
            ends[(st.st_dev, st.st_ino)] = mode
    return ends


def joined(a, b):
    """True if a pipe connects a reader in one claim to a writer in the other."""
    return any(key in b.pipes and b.pipes[key] != mode for key, mode in a.pipes.items())


def process_pipes():
    """{pid: (stdin pipe inode, stdout pipe inode)} of the processes we can see
    (None where that descriptor is not a pipe); the dispatcher itself left out."""
    found = {}
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        ends = []
        for fd in (0, 1):
            try:
                link = os.readlink(f"/proc/{name}/fd/{fd}")
            except OSError:
                link = ""
            ends.append(int(link[6:-1]) if link.startswith("pipe:[") else None)
        if ends != [None, None]:
            found[int(name)] = tuple(ends)
    return found


def joined_through_processes(claim, running, processes):
    """True if data flows between claim and a running job through local processes."""
    upstream = {ino for (_, ino), mode in claim.pipes.items() if mode == "r"}
    downstream = {ino for (_, ino), mode in claim.pipes.items() if mode == "w"}
    outputs = {ino for c in running for (_, ino), mode in c.pipes.items() if mode == "w"}
    inputs = {ino for c in running for (_, ino), mode in c.pipes.items() if mode == "r"}
    # pipe -> the pipes one process hop away, against and along the flow of data
    feeds_into = {}
    fed_by = {}
    for stdin, stdout in processes.values():
        if stdin is not None and stdout is not None:
            feeds_into.setdefault(stdout, set()).add(stdin)
            fed_by.setdefault(stdin, set()).add(stdout)
    return (reaches(upstream, feeds_into, outputs)
            or reaches(downstream, fed_by, inputs))


def reaches(start, hops, targets):
    seen, frontier = set(start), list(start)
    while frontier:
        pipe = frontier.pop()
        if pipe in targets:
            return True
        for nxt in hops.get(pipe, ()):
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return False


class Scheduler:
    def __init__(self, cpus, memory):
        self.total_cpus = round(cpus * MILLI)
        self.total_memory = memory
        self.used_cpus = 0
        self.used_memory = 0
        self.queue = []
        self.running = []
        self.cond = threading.Condition()

    def acquire(self, claim):
        """Wait until claim may run; False if its job was cancelled meanwhile."""
        with self.cond:
            claim.job.on_wake = self.wake
            self.queue.append(claim)
            try:
                while not self._admissible(claim):
                    if claim.job.cancel_reason or claim.job.first_signal():
                        return False
                    # a job with pipes re-checks now and then: a process joining it
                    # to a running job may appear without anything else happening
                    self.cond.wait(RECHECK if claim.pipes else None)
                if claim.job.cancel_reason:
                    return False
                self.used_cpus += claim.cpus
                self.used_memory += claim.memory
                self.running.append(claim)
                return True
            finally:
                self.queue.remove(claim)
                claim.job.on_wake = None
                self.cond.notify_all()

    def release(self, claim):
        with self.cond:
            self.running.remove(claim)
            self.used_cpus -= claim.cpus
            self.used_memory -= claim.memory
            self.cond.notify_all()

    def wake(self):
        with self.cond:
            self.cond.notify_all()

    def _admissible(self, claim):
        if any(joined(claim, other) for other in self.running):
            return True
        fits = (self.used_cpus + claim.cpus <= self.total_cpus
                and self.used_memory + claim.memory <= self.total_memory)
        if fits and self.queue[0] is claim:
            return True
        return bool(claim.pipes and self.running
                    and joined_through_processes(claim, self.running, process_pipes()))


class Backend:
    name = "local"

    def __init__(self, config):
        cpus, memory = parse_budget(config)
        self.scheduler = Scheduler(cpus, memory)

    def check(self):
        s = self.scheduler
        return (f"local: a budget of {s.total_cpus / MILLI:g} CPUs and "
                f"{s.total_memory // 2**20} MiB (unless ARV_WRAP_LOCAL_* said otherwise when "
                f"the dispatcher started)")

    def largest(self):
        return self.scheduler.total_cpus / MILLI, self.scheduler.total_memory

    def fit(self, job):
        """Apply on_oversize to a request larger than the budget; None if it fits."""
        s = self.scheduler
        too_big = []
        if round(job.cpus * MILLI) > s.total_cpus:
            too_big.append(("cpus", f"{job.cpus:g} CPUs", f"{s.total_cpus / MILLI:g} CPUs"))
        if (job.memory or 0) > s.total_memory:
            too_big.append(("memory", f"{job.memory} bytes of memory", f"{s.total_memory} bytes"))
        refused = on_oversize(job, too_big, "the local backend")
        if refused or not too_big:
            return refused
        job.cpus = min(job.cpus, s.total_cpus / MILLI)
        job.memory = min(job.memory or 0, s.total_memory) or None
        return None

    def run(self, job, started):
        refused = self.fit(job)
        if refused:
            return refused
        if job.stdin == "none":   # the rule says the tool never needs its stdin
            old, job.fds[0] = job.fds.get(0), os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            if old is not None:
                os.close(old)
        claim = Claim(job, job.cpus, job.memory)
        if not self.scheduler.acquire(claim):
            return cancelled_while_queued(job)
        try:
            try:
                pid = spawn(job)
            except OSError as e:
                return Outcome("failed", reason=f"cannot start: {e.strerror}", run_locally=True)
            started(str(pid))
            return supervise(job, pid)
        finally:
            self.scheduler.release(claim)


def cancelled_while_queued(job):
    """A job that never started: a caller's Ctrl-C (or other forwarded signal) ends
    it as that signal would have ended the tool, silently; arv-wrap's own cancels
    end the caller with SIGTERM and say why."""
    signum = job.first_signal()
    if signum and not job.cancel_reason:
        return Outcome("cancelled", reason=f"signal {signum} from the caller while queued",
                       caller_signal=signum)
    return Outcome("cancelled", reason=job.cancel_reason, caller_signal=signal.SIGTERM,
                   message=f"job {job.id} ({job.tool}) cancelled while queued: "
                           f"{job.cancel_reason}")


def spawn(job):
    """Start the job in its own session with the caller's descriptors at their numbers.

    A plain fork+exec rather than subprocess: the caller's descriptor numbers may be
    any (bash's <(...) gives 63), and subprocess keeps its own error pipe at a number
    that one of them could overwrite.
    """
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            err_w = fcntl.fcntl(err_w, fcntl.F_DUPFD_CLOEXEC, top_fd(job) + 1)
            setup_child(job)
            os.execve(job.path, job.argv, job.env)
        except BaseException as e:
            os.write(err_w, str(getattr(e, "errno", None) or 0).encode())
        finally:
            os._exit(127)
    os.close(err_w)
    with os.fdopen(err_r, "rb") as errors:
        failure = errors.read()
    if failure:
        os.waitpid(pid, 0)
        code = int(failure)
        raise OSError(code, os.strerror(code) if code else "could not set up the job")
    return pid


def top_fd(job):
    return max([*job.fds, *job.fds.values(), *(fd for fd in [job.cwd_fd] if fd), 2])


def setup_child(job):
    """In the child: the caller's descriptors, cwd, umask and limits; Python's
    ignored signals back to their defaults."""
    targets = sorted(job.fds)
    floor = top_fd(job) + 16
    # Move every source above every target first, so no dup2 clobbers a source.
    moved = {n: fcntl.fcntl(job.fds[n], fcntl.F_DUPFD_CLOEXEC, floor) for n in targets}
    for n in (0, 1, 2):
        if n not in moved:
            os.close(n)
    for n, fd in moved.items():
        os.dup2(fd, n)
    close_inherited_except(set(targets))
    if job.cwd_fd is not None:
        os.fchdir(job.cwd_fd)
    else:
        os.chdir(job.cwd)
    os.umask(job.umask)
    for res, soft, hard in job.rlimits:
        try:
            resource.setrlimit(res, (soft, hard))
        except (ValueError, OSError):
            pass   # a limit above the dispatcher's own hard limit cannot be raised
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)


def close_inherited_except(keep):
    """In the child: close every descriptor above 2 that exec would keep, but keep."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd in keep:
            continue
        try:
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                os.close(fd)
        except OSError:
            pass   # the descriptor listdir itself used


def supervise(job, pid):
    """Wait for the job, forwarding signals, enforcing its time limit and cancels."""
    pidfd = os.pidfd_open(pid)
    deadline = time.monotonic() + job.time_limit if job.time_limit else None
    kill_at = None      # when SIGKILL follows a SIGTERM that arv-wrap sent
    why_killed = None
    steered = False
    try:
        while True:
            waits = [t for t in (deadline, kill_at) if t is not None]
            timeout = max(0.0, min(waits) - time.monotonic()) if waits else None
            ready, _, _ = select.select([pidfd, job.wake_fd], [], [], timeout)
            if pidfd in ready:
                break
            for signum in job.take_signals():
                steered = True
                signal_group(pid, signum)
            now = time.monotonic()
            if job.cancel_reason and why_killed is None:
                why_killed = job.cancel_reason
                signal_group(pid, signal.SIGTERM)
                kill_at = now + KILL_GRACE
            if deadline and now >= deadline and why_killed is None:
                why_killed = f"{job.tool} exceeded its time limit of {job.time_limit}s"
                signal_group(pid, signal.SIGTERM)
                kill_at, deadline = now + KILL_GRACE, None
            if kill_at and now >= kill_at:
                signal_group(pid, signal.SIGKILL)
                kill_at = None
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finally:
        os.close(pidfd)
    if why_killed or steered:
        signal_group(pid, signal.SIGKILL)   # leave nothing of a stopped job running
    return outcome_of(status, job, why_killed)


def outcome_of(status, job, why_killed):
    died_of = -status if status < 0 else None
    if why_killed and why_killed == job.cancel_reason:
        return Outcome("cancelled", reason=why_killed, caller_signal=died_of or signal.SIGTERM,
                       message=f"job {job.id} ({job.tool}) cancelled: {why_killed}")
    if died_of:
        return Outcome("signaled", signal=died_of, reason=why_killed, message=why_killed)
    return Outcome("exited", exit_status=status, reason=why_killed, message=why_killed)


def signal_group(pgid, signum):
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
