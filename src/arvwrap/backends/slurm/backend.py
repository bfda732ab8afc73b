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

Its parts are in this package (see its __init__); this module ties them together.
"""
import logging
import os
import shutil
import subprocess
import threading

from arvwrap import paths
from arvwrap.backends import BackendError, base
from arvwrap.backends.remote import fds, guard
from arvwrap.backends.remote.poller import StatusPoller
from arvwrap.backends.remote.relay import Relay
from arvwrap.backends.remote.spool import Spool, hold_until_input, plan_stdin
from arvwrap.backends.remote.throttle import Throttle
from arvwrap.backends.slurm import sizing, srun
from arvwrap.backends.slurm.cluster import Cluster
from arvwrap.backends.slurm.settings import MIB, PROCESS_STATE, Options, Settings
from arvwrap.jobspec import Outcome

log = logging.getLogger("arvwrap.dispatcher")


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
        tools = {}
        for tool in ("srun", "scancel", "squeue", "sinfo", "scontrol"):
            path = shutil.which(tool)
            if path is None:
                raise BackendError(f"slurm: {tool} is not installed (not on PATH)")
            tools[tool] = path
        self.cluster = Cluster(tools, self.timeout, self.poll_interval)
        # the relay on the nodes and the launcher in front of srun (the shared
        # filesystem makes this path valid on the nodes too)
        self.helper = paths.HELPER
        self._relay_lock = threading.Lock()
        # the dispatcher's state dir, as the client computed it from the same environment
        state = state_dir or paths.state_dir()
        self.spool_dir = os.path.join(state, "spool")
        self.log_dir = os.path.join(state, "logs")     # read by `arv-wrap logs`
        self.throttle = Throttle(self.rate, max(1, self.max_jobs))
        self.relay = None
        self.stopped = None        # why it takes no more jobs (a machinery thread died)
        self.poller = StatusPoller("the slurm status poller", self.poll, self.cancel,
                                   self.poll_interval, on_give_up=self.stop)

    # -- answers --
    def check(self):
        try:
            out = self.cluster.run("scontrol", ["ping"], timeout=self.timeout, counter="other_queries")
        except subprocess.TimeoutExpired:
            raise BackendError(f"slurm: the controller did not answer within {self.timeout:g}s")
        text = (out.stdout + out.stderr).strip()
        if "is UP" not in text:
            raise BackendError(f"slurm: the controller does not answer: {text or out.returncode}")
        cpus, memory = self.largest()
        stats = self.cluster.counters.snapshot()
        bind, host = (self.relay.bound, self.relay.host) if self.relay else self.where()
        return (f"slurm: {text}; largest node: {cpus} CPUs, {memory // MIB} MiB; "
                f"nodes send the streams to {host} (listening on {bind}); "
                f"{stats['submissions']} submitted, {stats['status_queries']} status queries")

    def stats(self):
        return self.cluster.counters.snapshot()

    # -- sizing --
    def largest(self, partition=None):
        """(cpus, memory bytes) of the largest node (of partition, else the default one)."""
        big = sizing.largest_node(self.cluster, partition)
        return big["cpus"], big["memory"]

    def fit(self, job):
        """Apply on_oversize against the largest node of the job's partition; None if it fits."""
        return sizing.fit(self, job)

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
            return srun.Live(self, job, started, stdin, spool, failure).run()
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
                bind, host = self.where()
                self.relay = Relay(bind, host, "the slurm stream relay", on_give_up=self.stop,
                                   label="slurm relay", limits=self.settings.limits())
            return self.relay

    def where(self):
        """(where a listener for the nodes binds, the address the nodes are told):
        ARV_WRAP_SLURM_LISTEN, else this host's address on the route to the controller
        (one address, never all of them by default); ARV_WRAP_SLURM_HOST, else the
        bound address (the route's when it binds every address)."""
        bind = self.settings.listen or self.own_address()
        host = self.settings.host
        if not host:
            host = self.own_address() if bind in ("0.0.0.0", "::", "") else bind
        return bind, host

    def own_address(self):
        return self.cluster.own_address()

    # -- asked by the status poller and the jobs: one batched squeue per round --
    def scancel(self, ids=(), name=None, signum=None):
        return self.cluster.scancel(ids, name, signum)

    def poll(self, ids):
        """{slurm id: (state, job name)} of every job of ours that squeue lists; None
        if it failed."""
        return self.cluster.poll(ids)

    def cancel(self, ids, signum=None):
        done = self.scancel(sorted(ids, key=int), signum=signum)
        return done is not None and done.returncode == 0

    def register(self, live):
        count = self.poller.watch(live.attempt.slurm_id, live)
        self.cluster.counters.max_in_flight = max(self.cluster.counters.max_in_flight, count)

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
            self.forget_by_name(srun.job_name(os.path.basename(argv0), record["id"]))
