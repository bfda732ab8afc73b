"""Local jobs in the dispatcher: the client starts them, the dispatcher admits,
records and steers them (part of arvwrap.dispatcher.Dispatcher).

A local call goes: queued (its claim waits in the local scheduler) -> starting
("run" sent: the client forks and execs the tool as the caller's own child) ->
running ("pid": a pidfd steers it for time limits and cancels) -> "done" with the
wait status and rusage, or the client goes away (the tool dies with it).
"""
import logging
import os
import signal
import time

from arvwrap import protocol, store
from arvwrap.backends import local
from arvwrap.jobspec import Outcome

log = logging.getLogger("arvwrap.dispatcher")
PID_RECORD_DELAY = 0.05  # s a local job runs before its pid is written on its own


class LocalJobs:
    def _submit_local(self, call):
        job, scheduler = call.job, self.backend("local").scheduler
        job.backend = "local"
        refused = self.backend("local").fit(job)
        if refused or job.cancel_reason:
            if self._record(call, backend="local"):
                self._end(call, refused or local.cancelled_while_queued(job))
            return
        parent = self.by_job.get(job.parent)
        lender = parent.claim if parent is not None and parent.claim in scheduler.running else None
        call.claim = local.Claim(job, owner=call, exclude_pid=job.client_pid, lender=lender)
        job.close()                 # the client keeps the caller's descriptors itself
        admitted = scheduler.submit(call.claim)
        # one write: the record of a call that starts at once says so from the start
        if not self._record(call, backend="local", **(self._running(call) if admitted else {})):
            self._release(call)
            return
        if admitted:
            self._launch(call)
        else:
            call.state = "queued"
            self._schedule_recheck()

    def _running(self, call):
        """The record fields of a local job the scheduler just let start."""
        call.admitted = time.monotonic()
        return {"state": "running", "started": store.now(),
                "queued_seconds": round(call.admitted - call.created, 3)}

    def _launch(self, call):
        """Tell the client to start the tool: it was admitted."""
        job = call.job
        if call.unrecorded:
            return
        if call.state == "queued":           # admitted after waiting: its record says so
            try:
                self.store.update(job.id, **self._running(call))
            except Exception as e:
                log.error("cannot record the start of job %s: %s", job.id, e)
        call.state = "starting"
        placed = self.capture_fds(call)
        if placed:
            self._send(call, *placed)
        if not self._send(call, protocol.run_message(job.env, job.stdin == "none")):
            self._caller_gone(call)

    def _client_message(self, call, message, following=()):
        """One message of the client; following: those it sent after it, read with it."""
        if isinstance(message, int):                 # a forwarded signal
            if call.state == "queued":
                self._withdraw(call)
                self._end(call, local.cancelled_while_queued(call.job, message))
            elif call.state in ("stating", "remote"):  # its backend takes it when it starts
                call.job.signal(message)
        elif isinstance(message, protocol.Done):
            self._local_done(call, message)
        elif isinstance(message, protocol.ProcessState) or message[0] == "badstate":
            self._got_state(call, message)
        elif message[0] == "pid" and call.state == "starting":
            ended = any(isinstance(m, protocol.Done) for m in following)
            self._local_started(call, message[1], steered=not ended)
        elif message[0] == "nostart" and call.state == "starting":
            self._release(call)
            self._end(call, Outcome("failed", reason=f"cannot start: {os.strerror(message[1])}"))

    def _local_started(self, call, pid, steered=True):
        """The tool runs as pid. steered: it may still be running, so open the pidfd
        that steers it and arm its timers (not for a tool whose end came with this)."""
        call.state, call.pid = "running", pid
        job = call.job
        if steered:
            try:
                call.pidfd = os.pidfd_open(pid)
            except OSError:
                call.pidfd = None        # it has already ended: its "done" follows
            if job.time_limit:
                call.kill_timer = self.after(job.time_limit, lambda: self._kill_local(
                    call, f"{job.tool} exceeded its time limit of {job.time_limit}s"))
            # the pid reaches the record with its end, or now if the job outlives a
            # short while: a quick tool costs one write less
            call.pid_timer = self.after(PID_RECORD_DELAY, lambda: self._record_pid(call))
        if job.cancel_reason:
            self._kill_local(call, job.cancel_reason)

    def _record_pid(self, call):
        call.pid_timer = None
        if call.state == "running" and call.conn is not None:
            try:
                self.store.update(call.job.id, backend_id=str(call.pid))
            except Exception as e:
                log.error("cannot record the pid of job %s: %s", call.job.id, e)

    def _local_done(self, call, done):
        if call.state not in ("starting", "running"):
            return
        self._release(call)
        call.tool_status = done.status
        status = os.waitstatus_to_exitcode(done.status)
        outcome = local.outcome_of(status, call.job, call.why_killed)
        self.cancel_timer(call.pid_timer)
        self._end(call, outcome, cpu_seconds=round(done.cpu_seconds, 3), max_rss=done.max_rss,
                  **({"backend_id": str(call.pid)} if call.pid else {}))

    def _kill_local(self, call, why):
        """SIGTERM the tool and everything below it; SIGKILL after a grace."""
        if call.state != "running" or call.why_killed:
            return
        call.why_killed = why
        self.cancel_timer(call.kill_timer)
        if call.pidfd is None:
            return
        local.signal_tree(call.pidfd, call.pid, signal.SIGTERM)
        call.kill_timer = self.after(local.KILL_GRACE, lambda: call.pidfd is not None and (
            local.signal_tree(call.pidfd, call.pid, signal.SIGKILL)))

    def _release(self, call):
        """Give back what a local call held, and start the jobs that now fit."""
        claim, call.claim = call.claim, None
        if claim is None:
            return
        if claim in self.backend("local").scheduler.running:
            for admitted in self.backend("local").scheduler.release(claim):
                self._launch(admitted.owner)
        else:
            self._withdraw_claim(claim)

    def _withdraw(self, call):
        claim, call.claim = call.claim, None
        if claim is not None:
            self._withdraw_claim(claim)

    def _withdraw_claim(self, claim):
        for admitted in self.backend("local").scheduler.withdraw(claim):
            self._launch(admitted.owner)

    def _schedule_recheck(self):
        if not self.recheck_due and self.backend("local").scheduler.needs_recheck():
            self.recheck_due = True
            self.after(local.RECHECK, self._recheck)

    def _recheck(self):
        self.recheck_due = False
        scheduler = self.backend("local").scheduler
        if scheduler.needs_recheck():
            for admitted in scheduler.recheck():
                self._launch(admitted.owner)
        self._schedule_recheck()

    def _caller_gone(self, call):
        """The client closed or died (its tool dies with it: PR_SET_PDEATHSIG)."""
        job = call.job
        if job is None or call.state in ("reading", "building", "stating"):
            self._close(call)
            return
        reason = "the redirected call went away"
        if call.state == "remote":
            job.cancel(reason)
            self.poller.unregister(call.conn.fileno())   # its thread answers; nobody reads
            call.conn.close()
            call.conn = None
            return
        self._release(call)
        job.cancel(reason)           # unless arv-wrap cancelled it first: that reason stays
        self.cancel_timer(call.pid_timer)
        self._end(call, Outcome("cancelled", reason=job.cancel_reason,
                                caller_signal=signal.SIGKILL),
                  **({"backend_id": str(call.pid)} if call.pid else {}))
