"""Small descriptor helpers shared by the remote machinery."""
import os
import select


class Readable:
    """The descriptors of fds that are readable or hung up, by poll (no 1024 limit)."""

    def __init__(self, fds):
        self.poller = select.poll()
        for fd in fds:
            self.poller.register(fd, select.POLLIN | select.POLLPRI)

    def forget(self, fd):
        self.poller.unregister(fd)

    def poll(self, timeout=None):
        ms = None if timeout is None else max(0, int(timeout * 1000))
        while True:
            try:
                return [fd for fd, _ in self.poller.poll(ms)]
            except InterruptedError:
                continue


def readable(fds, timeout=None):
    """[those of fds that are readable or hung up], within timeout seconds."""
    return Readable(fds).poll(timeout)


def received(sock, size=1 << 16):
    """What sock receives, chunk by chunk, until its end (an error counts as the end)."""
    while True:
        try:
            data = sock.recv(size)
        except OSError:
            return
        if not data:
            return
        yield data


def drain(fd):
    """Everything fd has to give without waiting."""
    out = b""
    try:
        while readable([fd], 0):
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            out += chunk
    except OSError:
        pass
    return out


def write_all(fd, data):
    """Write all of data, waiting on a descriptor the caller made non-blocking."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            poller.poll(1000)


def close(fd):
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
