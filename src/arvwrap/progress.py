"""`arv-wrap -v`: one line per job start and one per job end of a run, on stderr.

A Follower polls the store (read-only, see top.Reader) from a daemon thread and
writes lines like

    arv-wrap: started 01JF... bwa mem -t 2 ref.fa r.fq (local 12345, 2 CPUs, 8G)
    arv-wrap: ended 01JF... bwa mem -t 2 ref.fa r.fq: exit 0 in 1.2s (cpu 2.1s, max rss 312M)

It only reads records, so it never slows the jobs down nor changes their streams:
the lines go to the stream it is given (arv-wrap's own stderr), only when asked.

    follower = Follower(state_dir, run_id, sys.stderr).start()
    ...                       # the run
    follower.stop()           # the last lines, then return
"""
import signal
import sqlite3
import threading
import time

from arvwrap import store
from arvwrap.top import Reader, clip, command, duration, epoch, number, printable, size

POLL = 0.2               # seconds between reads of the store
COMMAND_WIDTH = 60       # columns of a job's command line kept in a line


class Follower:
    def __init__(self, state_dir, run_id, stream, interval=POLL, prefix="arv-wrap: "):
        self.reader = Reader(state_dir)
        self.run_id = run_id
        self.stream = stream
        self.interval = interval
        self.prefix = prefix
        self._started = set()     # job ids whose start was told
        self._ended = set()       # job ids whose end was told
        self._seen = set()        # job ids read at least once
        self._stop = threading.Event()
        self._thread = None
        self._lock = threading.Lock()    # one poll at a time (the thread, then stop())
        self._broken = False             # the stream cannot be written any more
        self.polls = 0                   # reads of the store so far

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="arv-wrap-progress",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout=1.0):
        """Stop following, after printing what is still to be said: jobs seen
        running get up to timeout seconds for their end to be recorded (a tool's
        end can reach the store just after its caller saw it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if not self._unfinished() or time.monotonic() >= deadline:
                return
            time.sleep(min(self.interval, POLL, max(0.0, deadline - time.monotonic())))

    def _unfinished(self):
        return bool(self._seen - self._ended)

    def _follow(self):
        while True:
            self.poll()
            if self._stop.wait(self.interval):
                return

    def poll(self):
        """Read the run's jobs once and print the starts and ends not told yet."""
        with self._lock:
            try:
                jobs = self.reader.query("WHERE run = ? AND kind = 'job' ORDER BY id",
                                         [self.run_id]) or []
            except (OSError, sqlite3.Error):
                return           # busy, or being replaced: the next poll reads it
            finally:
                self.polls += 1
            for job in jobs:
                self._seen.add(job["id"])
                state = job.get("state")
                if job["id"] not in self._started and (job.get("started") or state == "running"):
                    self._started.add(job["id"])
                    self._write(f"started {job['id']} {self._command(job)} ({where(job)})")
                if job["id"] not in self._ended and state in store.FINAL_STATES:
                    self._ended.add(job["id"])
                    self._started.add(job["id"])    # a job that never started: no start line
                    self._write(f"ended {job['id']} {self._command(job)}: {outcome(job)}")

    def _command(self, job):
        return clip(printable(command(job.get("argv"))), COMMAND_WIDTH, "...")

    def _write(self, text):
        if self._broken:
            return
        try:
            self.stream.write(self.prefix + text + "\n")
            self.stream.flush()
        except (OSError, ValueError):      # closed, or a broken pipe: stay quiet
            self._broken = True


def where(job):
    """local 12345, 2 CPUs, 8G"""
    parts = [" ".join(str(x) for x in (job.get("backend"), job.get("backend_id")) if x)
             or "?"]
    cpus = job.get("cpus")
    if cpus is not None:
        parts.append(f"{number(cpus)} CPU" + ("" if cpus == 1 else "s"))
    if job.get("memory"):
        parts.append(size(job["memory"]))
    return ", ".join(parts)


def outcome(job):
    """exit 0 in 1.2s (cpu 2.1s, max rss 312M); signal 9 (SIGKILL) in 3.0s; failed: why"""
    state = job.get("state")
    if state == "exited":
        text = f"exit {job.get('exit_status')}"
    elif state == "signaled":
        try:
            name = f" ({signal.Signals(job.get('signal')).name})"
        except (ValueError, TypeError):
            name = ""
        text = f"signal {job.get('signal')}{name}"
    else:
        text = state or "?"
    started, ended = epoch(job.get("started")), epoch(job.get("ended"))
    if started and ended:
        text += f" in {duration(ended - started)}"
    used = []
    if job.get("cpu_seconds") is not None:
        used.append(f"cpu {duration(job['cpu_seconds'])}")
    if job.get("max_rss"):
        used.append(f"max rss {size(job['max_rss'])}")
    if used:
        text += f" ({', '.join(used)})"
    if job.get("reason"):
        text += f": {printable(job['reason'])}"
    return text
