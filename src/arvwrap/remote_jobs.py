"""Jobs on the other backends: backend.run blocks, so each runs in a thread of its
own; its outcome comes back to the loop (part of arvwrap.dispatcher.Dispatcher).
The client's forwarded signals and its going away reach the job through the Job.
"""
import logging
import threading
import time

from arvwrap import backends, store
from arvwrap.backends.base import must_run_locally
from arvwrap.jobspec import Outcome

log = logging.getLogger("arvwrap.dispatcher")


class RemoteJobs:
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
