"""One srun from start to end (Live): submit, follow what srun says while steering
the job (signals, cancel, timeouts, failures), conclude with the tool's outcome."""
import os
import re
import secrets
import signal
import subprocess
import time

from arvwrap.backends.remote import fds, guard
from arvwrap.backends.remote.streams import Log, Stream
from arvwrap.backends.slurm import command
from arvwrap.backends.slurm.messages import RE_CONTROLLER, Attempt
from arvwrap.jobspec import Outcome

KILL_GRACE = 10.0        # s between SIGTERM and SIGKILL of an srun that must end
STREAM_GRACE = 5.0       # s to wait for a stream's end after srun exited
GONE_POLLS = 3           # polls without its job in squeue before an srun is ended


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
            self.pid = self.spawn(command.srun_argv(b, job, self.name), command.srun_env(b, job, self.token), err_w)
        except OSError as e:
            fds.close(self.err_r)
            text = f"cannot start srun: {e.strerror}"
            return Outcome("failed", run_locally=True, reason=text, message=text)
        finally:
            fds.close(err_w)
        b.cluster.counters.add("submissions")
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
        doubtful = a.controller or (b.cluster.trouble_at or 0) >= self.began
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
            if a.node_failed:
                text = (f"{label}: its node {a.node_failed} was lost (Slurm: Node failure); "
                        f"what the tool did there is unknown")
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
        launcher = command.launcher(self.backend, self.job.rlimits, self.job.umask)
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
