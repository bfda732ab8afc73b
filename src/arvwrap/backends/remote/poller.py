"""One batched status query per interval for all the jobs of a backend.

No flood of status queries: whatever the number of jobs, one thread asks once per
interval, and only while there is something to ask about:

- ``watch(id, watcher)``: each round, ``watcher.seen(state)`` gets the job's state
  from the batch (None: the backend no longer lists it);
- ``unwatch(id, watcher, orphan=True, name=...)``: the job's own thread gave up on
  it: it is cancelled (one cancel for all such orphans per round) while the backend
  lists it under that name (None: any), so an id a scheduler gave to another job
  after losing its state is never cancelled;
- ``cancel_later(id, name)``: the same for a job nobody watches;
- ``retry(action)``: ``action()`` is tried once per round until it returns True
  (a cleanup that needs the scheduler to answer); ``cleaning()`` says whether any
  such work is left.

The backend gives ``query(ids) -> {id: (state, name)}`` (None when the query failed:
the next round asks again) and ``cancel(ids)``. The thread is guarded: a watcher whose
``seen`` raises is failed alone (``watcher.fail(reason)``); a round that raises is
logged and the thread restarts; a poller that keeps crashing fails every job it
watches and tells on_give_up.
"""
import logging
import threading
import time

from arvwrap.backends.remote import guard

log = logging.getLogger("arvwrap.dispatcher")


class StatusPoller:
    def __init__(self, what, query, cancel, interval, on_give_up=None):
        self.what = what
        self.query = query
        self.cancel = cancel
        self.interval = interval
        self.on_give_up = on_give_up
        self.cond = threading.Condition()
        self.watched = {}        # backend id -> watcher
        self.orphans = {}        # backend id -> its name, to cancel while listed so
        self.actions = []        # callables tried each round until they return True
        self.thread = None
        self.stopped = None      # why it gave up
        self.last = 0.0          # when the last round began

    def watch(self, job_id, watcher):
        """Watch one job; returns how many are watched now."""
        with self.cond:
            if self.stopped:
                stopped = self.stopped
            else:
                stopped = None
                self.watched[job_id] = watcher
                self._wake()
            count = len(self.watched)
        if stopped:
            guard.tell(watcher.fail, stopped)
        return count

    def unwatch(self, job_id, watcher, orphan=False, name=None):
        with self.cond:
            if self.watched.get(job_id) is watcher:
                del self.watched[job_id]
        if orphan:
            self.cancel_later(job_id, name)

    def cancel_later(self, job_id, name=None):
        """Cancel a job nobody watches (a dead dispatcher's, say), retried each round
        until the backend no longer lists it (under that name)."""
        with self.cond:
            self.orphans[job_id] = name
            self._wake()

    def cleaning(self):
        """Whether cancels or actions are still to be done (the scheduler was away)."""
        with self.cond:
            return bool(self.orphans or self.actions)

    def retry(self, action):
        with self.cond:
            self.actions.append(action)
            self._wake()

    def _wake(self):
        """(holding cond) Start the thread on first use; wake it."""
        if self.thread is None and not self.stopped:
            self.last = time.monotonic()     # the first round comes one interval later
            self.thread = guard.start(self.what, self._run, restart=True,
                                      on_give_up=self._give_up)
        self.cond.notify_all()

    def _run(self):
        while True:
            with self.cond:
                while not (self.watched or self.orphans or self.actions):
                    self.cond.wait()
                # at most one round per interval, whatever wakes us
                while time.monotonic() < self.last + self.interval:
                    self.cond.wait(self.last + self.interval - time.monotonic())
                orphans = dict(self.orphans)
                actions = list(self.actions)    # kept until done: cleaning() sees them
            self.last = time.monotonic()
            self._round(orphans, actions)

    def _round(self, orphans, actions):
        for action in actions:
            if action():
                with self.cond:
                    self.actions.remove(action)
        with self.cond:
            ids = set(orphans) | set(self.watched)
        listed = self.query(ids)
        if listed is None:
            return
        ours = {i for i, name in orphans.items()
                if i in listed and name in (None, listed[i][1])}
        if ours:
            self.cancel(ours)
        with self.cond:
            # cancelled ones stay while the backend lists them (as theirs)
            self.orphans = {i: n for i, n in self.orphans.items()
                            if i not in orphans or i in ours}
            watched = list(self.watched.items())
        for job_id, watcher in watched:
            self._tell(job_id, watcher, listed.get(job_id, (None,))[0])

    def _tell(self, job_id, watcher, state):
        try:
            watcher.seen(state)
        except Exception as e:
            log.exception("%s: a job's status", self.what)
            self.unwatch(job_id, watcher)      # failed: its own thread ends it
            guard.tell(watcher.fail, f"{self.what} failed on it ({type(e).__name__}: {e}; "
                                     f"see dispatcher.log)")

    def _give_up(self, reason):
        with self.cond:
            self.stopped = reason
            watched, self.watched = list(self.watched.values()), {}
        for watcher in watched:
            guard.tell(watcher.fail, reason)
        guard.tell(self.on_give_up, reason)
