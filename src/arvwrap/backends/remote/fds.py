"""Small descriptor helpers shared by the remote machinery."""
import os
import resource
import select
import time


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


class Events:
    """An epoll of descriptors, each with the object that owns it (no 1024 limit)."""

    def __init__(self):
        self._epoll = select.epoll()
        self._owners = {}

    def add(self, fd, owner):
        self._epoll.register(fd, select.EPOLLIN)
        self._owners[fd] = owner

    def remove(self, fd):
        del self._owners[fd]
        self._epoll.unregister(fd)

    def owner(self, fd):
        return self._owners.get(fd)

    def poll(self, timeout):
        try:
            return [fd for fd, _ in self._epoll.poll(timeout)]
        except InterruptedError:
            return []


class Budget:
    """Whether the process may take one more descriptor and still keep `reserve` of
    its limit (RLIMIT_NOFILE's soft limit, read again on each count) free. The open
    descriptors are counted at most every RECOUNT seconds; those taken in between
    are added to the count (those closed only show at the next one)."""
    RECOUNT = 0.1
    MINIMUM = 64

    def __init__(self, reserve):
        self.fraction = reserve
        self.open = self.limit = 0
        self.counted_at = -1.0

    def room(self):
        now = time.monotonic()
        if now - self.counted_at >= self.RECOUNT:
            self.open = len(os.listdir("/proc/self/fd")) - 1    # the listing's own
            self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            self.counted_at = now
        return self.open + 1 + self.reserve() <= self.limit

    def reserve(self):
        return max(self.MINIMUM, int(self.limit * self.fraction))

    def took(self):
        self.open += 1
