"""Jobs on the other backends: backend.run blocks, so each runs in a thread of its
own; its outcome comes back to the loop (part of arvwrap.dispatcher.Dispatcher).
The client's forwarded signals and its going away reach the job through the Job.

A remote backend rebuilds the caller's process state where the tool runs (rlimits,
nice, ignored signals, the signal mask). A local job inherits it, so the client
leaves it out of the request and the dispatcher asks for it ("state") only here:
the first call goes queued -> stating -> recorded and started.
"""
import logging
import threading
import time

from arvwrap import backends, protocol, store
from arvwrap.backends.base import must_run_locally
from arvwrap.jobspec import Outcome

log = logging.getLogger("arvwrap.dispatcher")


class RemoteJobs:
    def _dispatch_remote(self, call):
        """Record the job, then start it, once its caller's process state is known."""
        if call.state_unknown:                  # asked once, whatever the answer
            call.state, call.state_unknown = "stating", False
            if not self._send(call, protocol.STATE_QUERY):
                self._caller_gone(call)
            return
        self.capture_remote(call)
        if self._record(call):      # started once recorded, unless that failed
            self.when_recorded(lambda: call.conn is not None and self._start_remote(call))

    def _got_state(self, call, state):
        """The client's answer to "state"."""
        if call.state != "stating":
            return
        if not isinstance(state, protocol.ProcessState):    # ("badstate", why)
            log.warning("a client sent a bad process state: %s", state[1])
            self._finish(call, f"fail the client sent a bad process state: {state[1]}")
            return
        job = call.job
        job.rlimits, job.nice = state.rlimits, state.nice
        job.ignored_signals, job.blocked_signals = state.ignored_signals, state.blocked_signals
        call.state = "building"
        self._dispatch_remote(call)

    def _start_remote(self, call):
        call.state = "remote"
        threading.Thread(target=self._run_remote, args=(call,), daemon=True).start()

    def _run_remote(self, call):
        job = call.job
        try:
            backend = self.backend(job.backend)
            why = must_run_locally(backend, job)
            outcome = (Outcome("failed", use_local_backend=True, reason=why) if why
                       else self.run_on(backend, job))
        except backends.BackendError as e:
            outcome = Outcome("failed", reason=str(e), message=str(e), run_locally=True)
        except Exception as e:         # a backend that cannot even load: never a hang
            log.exception("backend %s cannot start", job.backend)
            outcome = Outcome("failed", reason=f"the {job.backend} backend cannot start: {e}",
                              message=f"the {job.backend} backend cannot start: {e}")
        self.post(lambda: self._remote_done(call, outcome))

    def _remote_done(self, call, outcome):
        if self.falls_back(call.job, outcome) and call.conn is not None:
            call.job.backend = "local"
            self._submit_local(call)
            return
        if call.conn is None:          # the caller went away while it ran
            self.record_end(call.job, outcome)
            self._close(call)
            return
        self._end(call, outcome)

    def run_on(self, backend, job):
        def started(backend_id, state="running"):
            # a backend may give its id while the job still waits there (state "queued")
            fields = {"started": store.now(),
                      "queued_seconds": round(time.monotonic() - job.arrived, 3)
                      } if state == "running" else {}
            self.store.update(job.id, state=state, backend_id=backend_id, **fields)
        try:
            return backend.run(job, started)
        except Exception as e:
            log.exception("backend %s failed on job %s", job.backend, job.id)
            return Outcome("failed", reason=f"backend error: {e}",
                           message=f"the {job.backend} backend failed: {e}")

    @staticmethod
    def falls_back(job, outcome):
        """Whether a remote backend's outcome sends the job to the local backend."""
        if job.backend == "local":
            return False
        if outcome.use_local_backend:
            job.notes.append(f"ran on the local backend: {outcome.reason}")
            return True
        if outcome.run_locally and job.on_backend_error == "local":
            job.notes.append(f"{outcome.reason}; ran on the local backend (on_backend_error: local)")
            return True
        if outcome.run_locally:    # the backend failed and the rule says fail
            outcome.run_locally = False
            outcome.message = outcome.message or outcome.reason
        return False
