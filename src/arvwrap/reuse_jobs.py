"""Job reuse in the dispatcher, decided before any backend is asked (part of
arvwrap.dispatcher.Dispatcher).

A call whose rule has `reuse` in a run with reuse on goes: keying (a worker
thread spools a piped stdin, hashes the inputs and looks the key up) ->
- a hit: its outputs are restored and its streams replayed into the caller's
  descriptors (a worker again), and it ends as the job it reuses did; or
- the same key already running: it waits for that job and then looks again; or
- a miss: it runs on its backend as any call, with its stdout and stderr going
  through pipes that a Tee copies to the caller and to capture files; at its end,
  if it exited 0 and its outputs can be told, they and the captures become an
  entry of the cache.
The worker threads never touch the loop's state: they post their result back.
"""
import concurrent.futures
import logging
import os
import signal
import sqlite3
from dataclasses import dataclass, field
from typing import Optional

from arvwrap import cache as cache_mod, reuse, store, streams
from arvwrap.backends.remote import fds as descriptors
from arvwrap.jobspec import Outcome

log = logging.getLogger("arvwrap.dispatcher")
TEE_GRACE = 30.0    # s the captures may go on after the job ended (a child holding them)
WORKERS = 4


@dataclass
class Capture:
    plan: Optional[reuse.Plan]                     # None: not keyed, only its stdin spooled
    spooled: Optional[str]                         # the spooled stdin, if any
    callers: dict = field(default_factory=dict)    # 1, 2 -> dup of the caller's descriptor
    tees: dict = field(default_factory=dict)       # 1, 2 -> streams.Tee
    write_ends: list = field(default_factory=list)  # ours, for a remote job's streams
    saving: bool = False


def reuse_enabled(env, rule):
    """A rule with reuse, in a run with ARV_WRAP_REUSE=1 (arv-wrap --reuse)."""
    return rule is not None and rule.reuse is not None and env.get(b"ARV_WRAP_REUSE") == b"1"


class ReuseJobs:
    @property
    def cache(self):
        if self._cache is None:
            self._cache = cache_mod.Cache(self.state_dir)
        return self._cache

    @property
    def workers(self):
        if self._workers is None:
            self._workers = concurrent.futures.ThreadPoolExecutor(WORKERS, "arvwrap-reuse")
        return self._workers

    def _in_worker(self, work, *args):
        """work(*args) in a worker thread; an error there is logged and posted as
        the failure of that call (work's last words are a post)."""
        def guarded():
            try:
                work(*args)
            except Exception as e:
                log.exception("job reuse failed")
                call, error = args[0], e      # e is unbound once the except block ends
                self.post(lambda: self._reuse_failed(call, error))
        self.workers.submit(guarded)

    def _reuse_failed(self, call, error):
        if call.conn is not None and (call.recorded or self._record(call)):
            self._end(call, Outcome("failed", reason=f"job reuse: {error}",
                                    message=f"job reuse failed: {error}"))

    # -- keying --
    def _start_keying(self, call):
        call.state = "keying"
        try:
            self.cache              # opened here, once, not by racing workers
        except (OSError, sqlite3.Error) as e:
            self._reuse_failed(call, f"cannot open the cache: {e}")
            return
        self._in_worker(self._key, call)

    def _key(self, call):
        """(worker) The call's plan and the entry it may reuse."""
        job, spooled = call.job, None
        try:
            stdin = reuse.stdin_part(job.fds.get(0), job.rule.stdin)
            if call.spooled:                # keyed before, waiting: the same bytes
                spooled, call.spooled = call.spooled, None
                stdin = "spool " + self.cache.digests.digest(spooled)[0]
            elif stdin == "spool":
                spooled = self.cache.new_tmp("stdin")
                try:
                    streams.spool(job.fds[0], spooled)
                except OSError as e:        # what it read is gone with it: no run at all
                    _unlink(spooled)
                    why = f"cannot keep its stdin: {e}"
                    self.post(lambda: self._reuse_failed(call, why))
                    return
                stdin = "spool " + self.cache.digests.digest(spooled)[0]
            elif stdin == "file":
                fd = job.fds[0]
                digest = self.cache.digests.digest(f"/proc/self/fd/{fd}")[0]
                stdin = f"file {digest} at {os.lseek(fd, 0, os.SEEK_CUR)}"
            plan = reuse.plan(job.rule.reuse, job.path, job.argv, job.cwd, job.env,
                              self.cache.digests, stdin,
                              job.rule.image if job.backend == "docker" else None)
            entry = self.cache.get(plan.key)
            if entry is not None and not self._intact(entry):
                entry, why = None, f"not reused: the cached result of job {entry.job} is damaged"
            else:
                why = None if entry else self._why_missed(job, plan)
        except (OSError, ValueError, sqlite3.Error) as e:   # it runs, unkept
            why = f"not reusable: {e}"
            self.post(lambda: self._keyed(call, None, None, spooled, why))
            return
        self.post(lambda: self._keyed(call, plan, entry, spooled, why))

    def _intact(self, entry):
        return (self.cache.intact(entry.stdout) and self.cache.intact(entry.stderr)
                and all(self.cache.intact(o.digest, o.size) for o in entry.outputs))

    def _why_missed(self, job, plan):
        parts = shown_parts(plan.parts, job.redactor)
        nearest = self.cache.nearest(job.tool, parts)
        if nearest is None:
            return f"not reused: no earlier job of {job.tool} is kept"
        diffs = cache_mod.differences(nearest.parts, parts)
        said = ", ".join(p if d is None else f"{p} {d}" for p, d in diffs[:3])
        return f"not reused: differs from job {nearest.job} in {said}"

    def _keyed(self, call, plan, entry, spooled, why):
        job = call.job
        if call.conn is None or entry is not None:
            _unlink(spooled)      # no run will read it
        if call.conn is None:
            return
        if entry is not None:
            self._reuse(call, entry)
            return
        if plan is not None and plan.key in self.running_keys:
            call.spooled = spooled        # kept: it runs after all if that job fails
            self._wait_for_same(call, plan.key)
            return
        if why:
            job.notes.append(why)
        if plan is not None:
            self.running_keys[plan.key] = []
            self.key_runners[plan.key] = job.id
            call.capture = Capture(plan, spooled)
            for n in (1, 2):
                if n in job.fds:
                    call.capture.callers[n] = os.dup(job.fds[n])
        elif spooled:              # not keyed, but its stdin was read: it gets the spool
            call.capture = Capture(None, spooled)
        self._dispatch(call)

    def _wait_for_same(self, call, key):
        """The same work is running: wait for it (recorded as queued, saying so)."""
        runner = self.key_runners[key]
        call.state = "waiting"
        self.running_keys[key].append(call)
        self._record(call, reason=f"waits for job {runner}, the same work, to reuse its result")

    # -- a hit --
    def _reuse(self, call, entry):
        job = call.job
        job.notes.append(f"reused the result of job {entry.job}")
        if not self._record(call, state="running", started=store.now(), reused_from=entry.job,
                            queued_seconds=0):
            return
        call.state = "reusing"
        self.when_recorded(lambda: call.conn is not None and self._in_worker(
            self._replay, call, entry))

    def _replay(self, call, entry):
        """(worker) Restore the outputs, replay the streams, touch the entry."""
        for output in entry.outputs:
            self.cache.restore(output)
        complete = all(streams.replay(self.cache.blob_path(digest), call.job.fds[n])
                       for n, digest in ((1, entry.stdout), (2, entry.stderr))
                       if n in call.job.fds)
        self.cache.touch(entry.key)
        outcome = (Outcome("exited", exit_status=entry.status) if complete else
                   Outcome("signaled", signal=signal.SIGPIPE,
                           reason="the caller stopped reading its output"))
        self.post(lambda: call.conn is not None and self._end(
            call, outcome, reused_from=entry.job, cpu_seconds=0))

    # -- a miss: the streams while it runs --
    def capture_fds(self, call):
        """(line, descriptors) that make a local job write through the tees, or None."""
        capture = call.capture
        if capture is None:
            return None
        targets, fds = [], []
        if capture.spooled:
            fds.append(os.open(capture.spooled, os.O_RDONLY | os.O_CLOEXEC))
            targets.append(0)
        for n in (1, 2) if capture.plan else ():
            fds.append(self._tee(capture, n))
            targets.append(n)
        return f"fds {' '.join(map(str, targets))}\n".encode(), fds

    def capture_remote(self, call):
        """Point a remote job's stdin at the spool and its streams at the tees."""
        capture, job = call.capture, call.job
        if capture is None:
            return
        if capture.spooled:
            descriptors.close(job.fds.get(0))
            job.fds[0] = os.open(capture.spooled, os.O_RDONLY | os.O_CLOEXEC)
        for n in (1, 2) if capture.plan else ():
            write_end = self._tee(capture, n)
            descriptors.close(job.fds.get(n))
            job.fds[n] = write_end
            capture.write_ends.append(write_end)

    def _tee(self, capture, n):
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        tee = streams.Tee(read_end, capture.callers.pop(n, None), self.cache.new_tmp(f"fd{n}"))
        capture.tees[n] = tee
        tee.start()
        return write_end

    # -- a miss: its end --
    def finish_capture(self, call, outcome, fields):
        """Called by _end for a job with a capture: keep its result (worker), then end."""
        capture = call.capture
        capture.saving = True
        for fd in capture.write_ends:      # a remote job's: the backend is done with them
            for n, held in list(call.job.fds.items()):
                if held == fd:
                    del call.job.fds[n]        # closed once, here, not again by the job
            descriptors.close(fd)
        self._in_worker(self._keep, call, capture, outcome, fields)

    def _keep(self, call, capture, outcome, fields):
        """(worker) Wait for the tees; an exit 0 with outputs that can be told is kept."""
        for tee in capture.tees.values():
            tee.join(TEE_GRACE)
        note = None
        if capture.plan and outcome.state == "exited" and outcome.exit_status == 0:
            try:
                self._keep_entry(call.job, capture)
            except (OSError, reuse.NotReusable) as e:
                note = f"not kept for reuse: {e}"
        for tee in capture.tees.values():
            _unlink(tee.capture)
        _unlink(capture.spooled)
        self.post(lambda: self._kept(call, capture, outcome, fields, note))

    def _keep_entry(self, job, capture):
        if any(t.is_alive() or not t.complete for t in capture.tees.values()):
            raise reuse.NotReusable("its output was not all read (the caller stopped reading, "
                                    "or a process it left holds its stdout)")
        written = reuse.outputs(capture.plan)
        kept, size = [], 0
        for path in written:
            digest, bytes_ = self.cache.put_file(path)
            kept.append(cache_mod.Output(path=path, digest=digest, mode=os.stat(path).st_mode,
                                         size=bytes_))
            size += bytes_
        streams_ = {}
        for n, tee in capture.tees.items():
            streams_[n], bytes_ = self.cache.put_file(tee.capture, move=True)
            size += bytes_
        self.cache.put(cache_mod.Entry(key=capture.plan.key, job=job.id, tool=job.tool,
                                       parts=shown_parts(capture.plan.parts, job.redactor),
                                       stdout=streams_[1],
                                       stderr=streams_[2], outputs=kept, size=size))

    def _kept(self, call, capture, outcome, fields, note):
        if note:
            call.job.notes.append(note)
        key = capture.plan.key if capture.plan else None
        waiting = self.running_keys.pop(key, [])
        self.key_runners.pop(key, None)
        self._end(call, outcome, **fields)
        for other in waiting:                    # now a hit, or their turn to run
            if other.conn is not None:
                self._start_keying(other)


def shown_parts(parts, redactor):
    """A key's parts as the cache keeps them, to explain misses: argv without its
    secrets (the key itself is made of the real words; environment values are only
    digests already)."""
    return {**parts, "argv": [os.fsdecode(w) for w in redactor.argv(parts["argv"])]}


def _unlink(path):
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

