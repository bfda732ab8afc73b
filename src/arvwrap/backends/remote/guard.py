"""Background threads that cannot die silently.

Every thread of the remote machinery runs its body through ``start``. An exception
the body did not expect is logged with its traceback, the jobs it concerns are
failed with a clear reason (``on_crash(reason)``), and the body starts again (with
``restart``), at most RESTARTS times in WINDOW seconds. Past that, or without
``restart``, ``on_give_up(reason)`` is told and the thread ends: a backend takes
that as its cue to stop cleanly.

A job's own thread learns of a failure through its ``JobFailure``: the first
reason wins, and the job's wake_fd becomes readable.
"""
import logging
import threading
import time

log = logging.getLogger("arvwrap.dispatcher")
RESTARTS = 5
WINDOW = 60.0


def start(what, body, on_crash=None, restart=False, on_give_up=None, then=None):
    """Run body() in a daemon thread, guarded; what names it in the reasons
    ("the slurm stream relay"). then(), if given, runs last, after any on_crash: a
    job that waits for the thread's end learns of its failure first."""
    def target():
        try:
            run_guarded(what, body, on_crash, restart, on_give_up)
        finally:
            if then is not None:
                then()
    thread = threading.Thread(target=target, name=what, daemon=True)
    thread.start()
    return thread


def run_guarded(what, body, on_crash=None, restart=False, on_give_up=None):
    crashes = []
    while True:
        try:
            body()
            return
        except Exception as e:
            reason = f"{what} failed ({type(e).__name__}: {e}; see dispatcher.log)"
            log.exception("%s failed", what)
        tell(on_crash, reason)
        now = time.monotonic()
        crashes = [t for t in crashes if now - t < WINDOW] + [now]
        if not restart or len(crashes) > RESTARTS:
            tell(on_give_up, reason)
            return
        log.warning("restarting %s", what)


def tell(callback, reason):
    """callback(reason), if any; its own failure is logged, never raised."""
    if callback is None:
        return
    try:
        callback(reason)
    except Exception:
        log.exception("while failing the jobs of a crashed thread")


class JobFailure:
    """Why arv-wrap's own machinery failed one job (None while it did not)."""

    def __init__(self, job):
        self.job = job
        self.reason = None
        self.lock = threading.Lock()

    def __call__(self, reason):
        with self.lock:
            if self.reason is None:
                self.reason = reason
        self.job._wake()
