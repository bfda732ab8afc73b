"""A tool's stream, from the connection its relay opened to the caller's descriptor.

``Stream`` copies one connection to one of the caller's descriptors in a guarded
thread of its own (a crash fails its job, with the reason), and keeps a capped copy
(``Log``) when given a path: `arv-wrap logs JOB --follow` reads it live.
"""
import os
import socket
import threading

from arvwrap import paths
from arvwrap.backends.remote import fds, guard
from arvwrap.redact import StreamRedactor

MIB = 1 << 20
LOG_KEEP = 1 * MIB       # a job's kept stderr: its last LOG_KEEP bytes, once ...
LOG_TRIM_AT = 2 * MIB    # ... the file would pass LOG_TRIM_AT


class Log:
    """A job's stderr kept as it arrives (`arv-wrap logs JOB --follow` reads it live),
    capped: the file never passes LOG_TRIM_AT; when it would, it is cut to its last
    bytes, in place, so a reader that holds it open keeps reading the same file."""

    def __init__(self, path):
        self.fd = Log.create(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size

    @staticmethod
    def create(path, mode=os.O_WRONLY):
        """Open the job's log, made 0600 in a 0700 dir if missing (never truncated: the
        job's start and its stream may both come first)."""
        paths.private_dir(os.path.dirname(path))
        return os.open(path, mode | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)

    def write(self, data):
        if self.size + len(data) > LOG_TRIM_AT:
            keep = max(0, LOG_KEEP - len(data))
            tail = os.pread(self.fd, keep, self.size - keep) if keep else b""
            os.pwrite(self.fd, tail, 0)
            os.ftruncate(self.fd, len(tail))
            self.size = len(tail)
            data = data[-LOG_KEEP:]
        os.pwrite(self.fd, data, self.size)
        self.size += len(data)

    def close(self):
        fds.close(self.fd)


class Stream:
    """Copies one relay connection to one of the caller's descriptors, in a thread,
    and to a Log if given one (its path)."""

    def __init__(self, target_fd, log_path=None, what="a stream", on_fail=None, secrets=()):
        self.target = target_fd
        self.log_path = log_path
        self.redactor = StreamRedactor(secrets)     # the kept copy never holds a secret
        self.what = what
        self.on_fail = on_fail
        self.done = threading.Event()
        self.connected = threading.Event()
        self.sock = None
        self.log = None

    def attach(self, sock):
        self.sock = sock
        self.connected.set()
        guard.start(f"the copy of {self.what}", self._run, on_crash=self.on_fail,
                    then=self.done.set)

    def _run(self):
        try:
            self._open_log()
            self._copy()
        finally:
            if self.log is not None:
                self._keep_last()
                self.log.close()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    def _open_log(self):
        if self.log_path:
            try:
                self.log = Log(self.log_path)
            except OSError:
                pass       # no copy kept; the stream itself is what matters

    def _copy(self):
        for data in fds.received(self.sock):
            self._keep(data)
            if self.target is None:
                return      # the caller has no such descriptor: the tool gets EPIPE
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.target, view):]
            except OSError:
                return      # the caller's reader is gone: close, the tool gets EPIPE

    def _keep(self, data):
        if self.log is not None:
            try:
                self.log.write(self.redactor.feed(data))
            except OSError:
                self.log.close()
                self.log = None

    def _keep_last(self):
        """What the redactor held back (the start of what may have been a secret)."""
        try:
            self.log.write(self.redactor.flush())
        except OSError:
            pass

    def finish(self, timeout):
        """Wait for the end of the stream (after the job ended); cut it after timeout."""
        if not self.connected.is_set():
            return
        if not self.done.wait(timeout) and self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.done.wait(1.0)
