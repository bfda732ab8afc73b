"""The local backend: an embedded scheduler for this machine.

One dispatcher serves every pipeline of a user on the machine, so its budget of
CPUs and memory is shared by all of them. Jobs are admitted first come, first
served while they fit; a fraction of a CPU is a fraction (four 0.25-CPU jobs share
one core).

A local job is the caller's own child: once a job is admitted, the client that
handed the call over starts the tool itself (csrc/client/handoff.c), so it keeps
everything a plain exec keeps. This module never starts a process; it decides
when a job may start, and steers a running one through a pidfd (signal_tree).

Pipes between jobs never deadlock: a job joined by pipes to a running job is
admitted at once, even over budget, because the running job may be blocked
writing into it (or waiting to read from it). Joined means directly (one's
stdout is the other's stdin) or through local processes in between, as in
`gzip -dc | tr | sort`, which one scan of /proc per round finds for all queued
jobs at once.

The scheduler is not thread-safe: the dispatcher calls it from its event loop.
"""
import collections
import dataclasses
import os
import signal
import stat
from typing import Optional

from arvwrap.backends import base
from arvwrap.jobspec import Outcome, on_oversize

KILL_GRACE = 5.0   # seconds between SIGTERM and SIGKILL when arv-wrap ends a job
MILLI = 1000       # CPUs are counted in thousandths
RECHECK = 0.2      # seconds between scans for pipes through local processes

# What of the caller's process state a job keeps, for `arv-wrap check`.
PROCESS_STATE = (
    "all of it, as a plain exec: the job is the caller's own child (every descriptor, uid, "
    "gid and groups, signal dispositions and mask, nice, CPU affinity, cgroup, namespaces, "
    "oom_score_adj, no_new_privs, rlimits, umask)",)


def _size(text):
    from arvwrap.whitelist import parse_memory
    return parse_memory(text)


@dataclasses.dataclass
class Settings:
    """ARV_WRAP_LOCAL_CPUS, ARV_WRAP_LOCAL_MEMORY: the budget (default: the machine's)."""
    cpus: Optional[float] = None
    memory: Optional[int] = dataclasses.field(
        default=None, metadata={"parse": _size, "expected": "a size (8G, 512M)"})


def parse_budget(settings):
    cpus = settings.cpus or len(os.sched_getaffinity(0))
    memory = settings.memory or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return float(cpus), int(memory)


class Claim:
    """What one job holds or waits for; owner is the dispatcher's, untouched here.

    lender: the claim of the running pipeline job (nested) this job was started
    from. A pipeline waits for its tools, so it lends what it holds to one of them
    at a time: its 0.1-CPU driver never keeps its own 1-CPU tool waiting on a
    one-CPU budget."""

    def __init__(self, job, owner=None, exclude_pid=None, lender=None):
        self.job = job
        self.owner = owner
        self.cpus = round(job.cpus * MILLI)
        self.memory = job.memory or 0
        self.pipes = pipe_ends(job.fds)
        self.exclude_pid = exclude_pid   # the client: not a process between pipes
        self.lender = lender
        self.borrower = None             # the claim running on what this one lends
        self.borrowed = (0, 0)           # (cpus, memory) this one runs on, lent


def pipe_ends(fds):
    """{pipe inode: 'r' or 'w'} for the job's standard descriptors that are pipes."""
    ends = {}
    for number, mode in ((0, "r"), (1, "w"), (2, "w")):
        fd = fds.get(number)
        if fd is None:
            continue
        st = os.fstat(fd)
        if stat.S_ISFIFO(st.st_mode):
            ends[st.st_ino] = mode
    return ends


def process_pipes(exclude):
    """{pid: (stdin pipe inode, stdout pipe inode)} of the processes we can see
    (None where that descriptor is not a pipe), except the pids in exclude."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in exclude:
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


def reach(start, hops):
    """Every pipe reachable from start by following hops."""
    seen, frontier = set(start), list(start)
    while frontier:
        for nxt in hops.get(frontier.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return seen


class Scheduler:
    def __init__(self, cpus, memory):
        self.total_cpus = round(cpus * MILLI)
        self.total_memory = memory
        self.used_cpus = 0
        self.used_memory = 0
        self.queue = collections.OrderedDict()    # claim -> None, in arrival order
        self.running = set()
        self._running_ends = collections.Counter()  # (pipe, mode) of running claims

    def submit(self, claim):
        """True if claim may start now; else it waits in the queue."""
        if self._joined(claim) or (not self.queue and self._fits(claim)):
            self._start(claim)
            return True
        if self._can_borrow(claim):
            self._start(claim, borrow=True)
            return True
        self.queue[claim] = None
        return False

    def withdraw(self, claim):
        """A queued claim that will not run after all (cancelled, caller gone);
        returns the queued claims that start now (it may have been the head)."""
        self.queue.pop(claim, None)
        return self._admit_head()

    def release(self, claim):
        """A running claim ended; returns the queued claims that start now."""
        self.running.discard(claim)
        self.used_cpus -= claim.cpus - claim.borrowed[0]
        self.used_memory -= claim.memory - claim.borrowed[1]
        for end in claim.pipes.items():
            self._running_ends[end] -= 1
            if not self._running_ends[end]:
                del self._running_ends[end]
        borrower = claim.borrower
        if borrower is not None:         # the pipeline ended before its tool: it owns it now
            self.used_cpus += borrower.borrowed[0]
            self.used_memory += borrower.borrowed[1]
            borrower.borrowed, claim.borrower = (0, 0), None
        started = []
        if claim.lender is not None and claim.lender.borrower is claim:
            claim.lender.borrower = None
            started = self._admit_borrower(claim.lender)
        return started + self._admit_head()

    def needs_recheck(self):
        """Whether a queued job could be joined to a running one through processes."""
        return bool(self.running) and any(c.pipes for c in self.queue)

    def recheck(self):
        """One /proc scan: start the queued claims joined to a running one through
        local processes (a filter between them); returns them."""
        exclude = {os.getpid()} | {c.exclude_pid for c in (*self.queue, *self.running)}
        feeds, fed_by = {}, {}
        for stdin, stdout in process_pipes(exclude).values():
            if stdin is not None and stdout is not None:
                feeds.setdefault(stdin, set()).add(stdout)
                fed_by.setdefault(stdout, set()).add(stdin)
        outputs = {p for c in self.running for p, mode in c.pipes.items() if mode == "w"}
        inputs = {p for c in self.running for p, mode in c.pipes.items() if mode == "r"}
        downstream, upstream = reach(outputs, feeds), reach(inputs, fed_by)
        joined = [c for c in self.queue
                  if any(p in (downstream if mode == "r" else upstream)
                         for p, mode in c.pipes.items())]
        for claim in joined:
            del self.queue[claim]
            self._start(claim)
        return joined + self._admit_head()

    def _fits(self, claim):
        return (self.used_cpus + claim.cpus <= self.total_cpus
                and self.used_memory + claim.memory <= self.total_memory)

    def _lendable(self, claim):
        """(cpus, memory) claim's pipeline can lend it now; None if it cannot."""
        lender = claim.lender
        if lender is None or lender not in self.running or lender.borrower is not None:
            return None
        return min(claim.cpus, lender.cpus), min(claim.memory, lender.memory)

    def _can_borrow(self, claim):
        """It fits in what its pipeline lends plus what is free (not FIFO: the lent
        part is no one else's)."""
        lent = self._lendable(claim)
        return lent is not None and (
            self.used_cpus + claim.cpus - lent[0] <= self.total_cpus
            and self.used_memory + claim.memory - lent[1] <= self.total_memory)

    def _admit_borrower(self, lender):
        """The first queued tool of lender's pipeline that fits on its loan."""
        for claim in self.queue:
            if claim.lender is lender and self._can_borrow(claim):
                del self.queue[claim]
                self._start(claim, borrow=True)
                return [claim]
        return []

    def _joined(self, claim):
        opposite = {"r": "w", "w": "r"}
        return any(self._running_ends[(pipe, opposite[mode])] > 0
                   for pipe, mode in claim.pipes.items())

    def _start(self, claim, borrow=False):
        if borrow:
            claim.borrowed = self._lendable(claim)
            claim.lender.borrower = claim
        self.running.add(claim)
        self.used_cpus += claim.cpus - claim.borrowed[0]
        self.used_memory += claim.memory - claim.borrowed[1]
        for end in claim.pipes.items():
            self._running_ends[end] += 1

    def _admit_head(self):
        """First come, first served: the head while it fits, and every queued
        claim joined by a pipe to one that started."""
        started = []
        while self.queue:
            head = next(iter(self.queue))
            if not self._fits(head):
                break
            del self.queue[head]
            self._start(head)
            started.append(head)
        if started:
            joined = [c for c in self.queue if self._joined(c)]
            for claim in joined:
                del self.queue[claim]
                self._start(claim)
            started += joined
        return started


class Backend(base.Backend):
    """Its jobs are started by the client (arvwrap.local_jobs): no run() here."""
    name = "local"
    Settings = Settings
    carries_descriptors = True
    fractional_cpus = True
    relays_streams = False
    process_state = PROCESS_STATE
    job_noun = "a local job"

    def __init__(self, config=None, state_dir=None):
        super().__init__(config, state_dir)
        cpus, memory = parse_budget(self.settings)
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


def cancelled_while_queued(job, signum=None):
    """A job that never started: a caller's Ctrl-C (or other forwarded signal) ends
    it as that signal would have ended the tool, silently; arv-wrap's own cancels
    end the caller with SIGTERM and say why."""
    if signum and not job.cancel_reason:
        return Outcome("cancelled", reason=f"signal {signum} from the caller while queued",
                       caller_signal=signum)
    return Outcome("cancelled", reason=job.cancel_reason, caller_signal=signal.SIGTERM,
                   message=f"job {job.id} ({job.tool}) cancelled while queued: "
                           f"{job.cancel_reason}")


def outcome_of(status, job, why_killed):
    """The Outcome of a tool that ended with exit code status (negative: signal)."""
    died_of = -status if status < 0 else None
    if why_killed and why_killed == job.cancel_reason:
        return Outcome("cancelled", reason=why_killed, caller_signal=died_of or signal.SIGTERM,
                       message=f"job {job.id} ({job.tool}) cancelled: {why_killed}")
    if died_of:
        return Outcome("signaled", signal=died_of, reason=why_killed, message=why_killed)
    return Outcome("exited", exit_status=status, reason=why_killed, message=why_killed)


def descendants(pid):
    """The pids below pid, from /proc/PID/task/TID/children."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            frontier += kids
    return found


def signal_tree(pidfd, pid, signum):
    """Signal a running tool (through its pidfd, so never a recycled pid) and every
    process below it, as a kill of its process group would have when it had one."""
    below = descendants(pid)
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass
    for child in below:
        try:
            os.kill(child, signum)
        except (ProcessLookupError, PermissionError):
            pass
