"""The caller's stdin, for a job that runs elsewhere.

``plan_stdin`` chooses per the rule's ``stdin``: ``none`` -> nothing; ``pass`` -> the
caller's fd 0 as is; ``auto`` -> a regular file is reopened at the caller's offset
(the caller's own offset never moves, so ``while read f; do tool "$f"; done < list``
sees every line), /dev/null and terminals are passed, and a pipe or socket is
pumped into a spool file (``Spool``: 0600, unlinked at once) that feeds the job, so
the writer never blocks on a reader that waits in a queue. ``hold_until_input``
keeps such a job from being submitted until data or EOF is there (unless only its
own ancestors hold the pipe's write end, as a driver that never writes does).

The spool's two threads are guarded: a crash (a full disk, say) fails the job
rather than handing it a stdin cut short.
"""
import os
import stat
import tempfile
import threading
import time

from arvwrap.backends.remote import fds, guard

MIB = 1 << 20
SPOOL_CAP = 64 * MIB     # unread spool bytes at which the pump pauses (job running)
HOLD_RECHECK = 0.2       # s between checks of a held pipe reader


def plan_stdin(job):
    """(descriptor for the job's stdin or None for /dev/null, caller pipe to spool or None)."""
    fd = job.fds.get(0)
    if job.stdin == "none" or fd is None:
        return None, None
    if job.stdin == "pass":
        return os.dup(fd), None
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        try:
            again = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return os.dup(fd), None
        os.lseek(again, os.lseek(fd, 0, os.SEEK_CUR), os.SEEK_SET)
        return again, None
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        return None, fd
    return os.dup(fd), None


class Spool:
    """Drains the caller's stdin pipe into an unlinked 0600 file and feeds the job from it.

    While the job waits in Slurm's queue the pump reads without limit, so a writer
    upstream never blocks on it; once the job runs, the pump pauses when SPOOL_CAP
    bytes are unread, as a pipe would make the writer wait for a slow reader.
    """

    def __init__(self, source_fd, spool_dir, what="stdin", on_fail=None):
        fd, path = tempfile.mkstemp(prefix="stdin-", suffix=".spool", dir=spool_dir)
        os.unlink(path)
        self.file = fd
        self.source = source_fd
        self.written = 0
        self.fed = 0
        self.eof = False
        self.running = False
        self.stopped = False
        self.cond = threading.Condition()
        self.stop_r, self.stop_w = os.pipe2(os.O_CLOEXEC)
        self.feed_r, self.feed_w = os.pipe2(os.O_CLOEXEC)   # the submitter's stdin
        self.threads = [guard.start(f"the spooling of {what}", self._pump, on_crash=on_fail),
                        guard.start(f"the feeding of {what}", self._feed, on_crash=on_fail)]

    def reader_started(self):
        """The submitting process holds the read end of its stdin now; ours must go so
        the feeder sees EPIPE when it stops reading."""
        fds.close(self.feed_r)
        self.feed_r = None

    def job_running(self):
        with self.cond:
            self.running = True
            self.cond.notify_all()

    def _pump(self):
        try:
            while True:
                with self.cond:
                    while (self.running and not self.stopped
                           and self.written - self.fed >= SPOOL_CAP):
                        self.cond.wait()
                    if self.stopped:
                        return
                ready = fds.readable([self.source, self.stop_r])
                if self.stop_r in ready:
                    return
                try:
                    data = os.read(self.source, 1 << 20)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    os.pwrite(self.file, data, self.written)
                with self.cond:
                    if data:
                        self.written += len(data)
                    else:
                        self.eof = True
                    self.cond.notify_all()
                if not data:
                    return
        finally:
            with self.cond:
                self.eof = True
                self.cond.notify_all()

    def _feed(self):
        try:
            while True:
                with self.cond:
                    while self.fed >= self.written and not self.eof and not self.stopped:
                        self.cond.wait()
                    if self.stopped or (self.fed >= self.written and self.eof):
                        return
                    start, end = self.fed, min(self.written, self.fed + (1 << 20))
                data = os.pread(self.file, end - start, start)
                view = memoryview(data)
                while view:
                    view = view[os.write(self.feed_w, view):]
                with self.cond:
                    self.fed += len(data)
                    self.cond.notify_all()
        except OSError:
            pass     # its reader stopped reading (the tool ended)
        finally:
            fds.close(self.feed_w)

    def close(self):
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        os.write(self.stop_w, b"x")
        for t in self.threads:
            t.join(5)
        for fd in (self.file, self.stop_r, self.stop_w, self.feed_r):
            fds.close(fd)


def hold_until_input(job, fd):
    """Wait until the caller's stdin pipe has data or EOF, or only the call's own
    ancestors could write into it. False if the job was cancelled meanwhile."""
    checked_at = 0.0
    while True:
        if job.cancel_reason:
            return False
        ready = fds.readable([fd, job.wake_fd], HOLD_RECHECK)
        if fd in ready:
            return True
        if job.wake_fd in ready:
            pending = job.take_signals()
            if pending:
                for signum in pending:
                    job.signal(signum)   # keep them for the job; a signal before start cancels
                return True
        now = time.monotonic()
        if now - checked_at >= 1.0:
            checked_at = now
            if writers_are_ancestors(fd):
                return True


def writers_are_ancestors(fd):
    """True if every process that holds the write end of the pipe at fd is an ancestor of
    a process reading it at its fd 0 (a driver that made the pipe and may never write)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return True
    kind = "pipe" if stat.S_ISFIFO(st.st_mode) else "socket"
    readers, writers, parents = pipe_holders(f"{kind}:[{st.st_ino}]")
    ancestors = set()
    for pid in readers:
        seen = 0
        while pid in parents and pid > 1 and seen < 512:
            pid = parents[pid]
            ancestors.add(pid)
            seen += 1
    return not (writers - ancestors)


def pipe_holders(target):
    """(pids reading target at fd 0, pids holding it open for writing, {pid: parent})
    over the processes we can see, except ourselves."""
    me = os.getpid()
    readers, writers, parents = set(), set(), {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                parents[pid] = int(f.read().rsplit(b")", 1)[1].split()[1])
            numbers = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for n in numbers:
            flags = _open_flags(pid, n, target)
            if flags is None:
                continue
            if n == "0":
                readers.add(pid)
            if flags & 3 in (1, 2):
                writers.add(pid)
    return readers, writers, parents


def _open_flags(pid, n, target):
    """The open flags of pid's fd n if it is target, else None."""
    try:
        if os.readlink(f"/proc/{pid}/fd/{n}") != target:
            return None
        with open(f"/proc/{pid}/fdinfo/{n}") as f:
            return next((int(line.split()[1], 8) for line in f
                         if line.startswith("flags:")), 0)
    except (OSError, StopIteration, ValueError):
        return None
