"""The byte streams of job reuse, each in a thread of its own (they block on the
caller's descriptors, which the loop must never do):

- Tee: a job's stdout or stderr, from the pipe it writes to, into the caller's
  descriptor and a capture file at once, live;
- replay: a reused job's captured bytes into the caller's descriptors;
- spool: the caller's stdin (a pipe) read to its end into a file, which the key
  hashes and the job then reads.
"""
import errno
import logging
import os
import threading

log = logging.getLogger("arvwrap.dispatcher")
CHUNK = 1 << 16


def write_all(fd, data):
    """False once the reader is gone (EPIPE) or the descriptor is unusable."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.EBADF, errno.EINVAL):
                log.warning("writing a job's output: %s", e)
            return False
    return True


class Tee(threading.Thread):
    """Copies source (read end, ours) to target (the caller's, a dup of ours) and
    to the file capture. complete is False if the caller stopped reading (then
    the source is closed, so the job sees EPIPE as it would have)."""

    def __init__(self, source, target, capture):
        super().__init__(daemon=True)
        self.source, self.target, self.capture = source, target, capture
        self.complete = True

    def run(self):
        try:
            with open(self.capture, "wb") as out:
                while True:
                    data = os.read(self.source, CHUNK)
                    if not data:
                        break
                    out.write(data)
                    if self.target is not None and not write_all(self.target, data):
                        self.complete = False
                        break
        except OSError as e:
            log.warning("capturing a job's output: %s", e)
            self.complete = False
        finally:
            os.close(self.source)
            if self.target is not None:
                os.close(self.target)


def replay(path, fd):
    """The bytes of a file into fd; False if they could not all be written."""
    with open(path, "rb") as f:
        while True:
            data = f.read(CHUNK)
            if not data:
                return True
            if not write_all(fd, data):
                return False


def spool(fd, path):
    """Read fd to its end into a new private file at path."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(descriptor, "wb") as out:      # raises on a full disk: no short spool
        while True:
            try:
                data = os.read(fd, CHUNK)
            except InterruptedError:
                continue
            if not data:
                return
            out.write(data)
