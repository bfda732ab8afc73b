"""A TCP listener that anyone who can reach its port may connect to, and what holds
it against them (the stream relay's, and any other whose connections introduce
themselves with a token line).

A connection is a *stranger* from its accept until it has sent one whole line
that ``identify(line)`` knows: identify returns a callable that takes the
connection over (blocking again, the line consumed, nothing after it), or None.
A connection taken is answered ACK first: the other end keeps a connection only
once it has that answer, and connects again if it was dropped before (which any
stranger-dropping rule below may do to it under a flood).
Against strangers:

- each must send its line within ``limits.handshake`` seconds, in at most
  MAX_LINE bytes; a close before it, garbage or an unknown line: dropped at once;
- at most ``limits.per_peer`` strangers per peer address and ``limits.total`` in
  all: past a cap the *oldest* stranger (of that peer, else of all) is dropped to
  make room. A real client sends its line the moment it connects and is read as
  soon as it is accepted, so a flood cannot keep it out (a cap that refused the
  newcomer would let a flood do exactly that);
- descriptors: it accepts only while the process keeps ``limits.reserve`` of its
  descriptor limit free (fds.Budget), so the dispatcher's own accept of local
  calls never fails for want of one; the kernel's backlog holds the rest meanwhile;
- every refusal is logged (RefusalLog: a few lines per peer, then counts; never
  the bytes sent, which may be a real token, mistyped).

One guarded thread serves every handshake. If it crashes, ``on_crash(reason)`` is
told (the relay fails the jobs waiting for a connection) and it starts again; if
it keeps crashing, the socket is closed and ``on_give_up(reason)`` is told.
"""
import collections
import logging
import socket
import threading
import time
from dataclasses import dataclass

from arvwrap.backends.remote import fds, guard
from arvwrap.backends.remote.refusals import RefusalLog

log = logging.getLogger("arvwrap.dispatcher")
MAX_LINE = 128          # bytes a stranger may send before its line ends
ACK = b"+"              # sent once a connection is taken (the relay waits for it)
ACCEPT_BATCH = 64       # accepts between two looks at the strangers' data
PAUSE = 0.1             # s between looks at the descriptor budget while it is short


@dataclass
class Limits:
    handshake: float = 5.0     # s a stranger has to send its line
    per_peer: int = 64         # strangers kept per peer address
    total: int = 512           # strangers kept in all
    reserve: float = 0.125     # of the descriptor limit kept free (64 at least)


class Listener:
    def __init__(self, bind_host, identify, limits=None, what="the listener", label="listener",
                 on_crash=None, on_give_up=None):
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((bind_host, 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.identify = identify
        self.limits = limits or Limits()
        self.budget = fds.Budget(self.limits.reserve)
        self.refusals = RefusalLog(label)
        self.strangers = collections.OrderedDict()    # conn -> (deadline, peer), oldest first
        self.by_peer = collections.defaultdict(collections.OrderedDict)   # peer -> {conn: None}
        self.watch = fds.Events()
        self.accepting = False
        self.closed = None
        self.on_crash, self.on_give_up = on_crash, on_give_up
        self.lock = threading.Lock()
        guard.start(what, self._serve, on_crash=self._crashed, restart=True,
                    on_give_up=self._give_up)

    # -- the serving thread --
    def _serve(self):
        try:
            while True:
                self._accept_while_there_is_room()
                for fd in self.watch.poll(self._timeout()):
                    if fd == self.sock.fileno():
                        self._accept()
                    else:
                        conn = self.watch.owner(fd)
                        if conn is not None:
                            self._handshake(conn)
                self._expire(time.monotonic())
                self.refusals.flush()
        finally:
            for conn in list(self.strangers):
                self._drop(conn)
            self.accepting = False
            self.watch = fds.Events()

    def _timeout(self):
        if not self.accepting:
            return PAUSE
        if self.strangers:
            deadline = next(iter(self.strangers.values()))[0]
            return min(1.0, max(0.0, deadline - time.monotonic()) + 0.01)
        return 1.0

    def _accept_while_there_is_room(self):
        """Watch the socket only while accepting leaves the process its reserve."""
        room = self.budget.room()
        if room and not self.accepting:
            self.watch.add(self.sock.fileno(), self.sock)
        elif not room and self.accepting:
            self.watch.remove(self.sock.fileno())
            self.refusals.short_of_descriptors(self.budget)
        self.accepting = room

    def _accept(self):
        for _ in range(ACCEPT_BATCH):
            if not self.budget.room():
                return
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:      # out of descriptors after all: the budget will see
                self.refusals.short_of_descriptors(self.budget, e)
                return
            self.budget.took()
            conn.setblocking(False)
            self._keep(conn, peer[0])
            self._handshake(conn)     # its line is usually there already

    def _keep(self, conn, peer):
        """A new stranger; the oldest of its peer, else of all, goes if over a cap."""
        mine = self.by_peer[peer]
        if len(mine) >= self.limits.per_peer:
            self._drop(next(iter(mine)), f"over {self.limits.per_peer} connections "
                                         f"without a token from this address")
        if len(self.strangers) >= self.limits.total:
            self._drop(next(iter(self.strangers)), f"over {self.limits.total} connections "
                                                   f"without a token in all")
        self.strangers[conn] = (time.monotonic() + self.limits.handshake, peer)
        mine[conn] = None
        self.watch.add(conn.fileno(), conn)

    def _handshake(self, conn):
        try:
            head = conn.recv(MAX_LINE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            head = b""
        end = head.find(b"\n")
        if not head:
            self._drop(conn, "it closed before sending a token")
            return
        if end < 0:
            if len(head) >= MAX_LINE:
                self._drop(conn, "it sent no token line")
            return
        conn.recv(end + 1)
        take = self.identify(head[:end])
        if take is None:
            self._drop(conn, "its token is no running job's (or was used already)")
            return
        self._forget(conn)
        conn.setblocking(True)
        try:
            conn.sendall(ACK)         # taken: until this, the other end may be dropped
        except OSError:
            pass                      # gone already: what takes it sees the end
        try:
            take(conn)
        except Exception:
            log.exception("%s: taking a connection", self.refusals.label)
            conn.close()

    def _expire(self, now):
        while self.strangers:
            conn, (deadline, _) = next(iter(self.strangers.items()))
            if deadline > now:
                return
            self._drop(conn, f"no token within {self.limits.handshake:g}s")

    def _forget(self, conn):
        """No longer a stranger (taken over, or dropped)."""
        _, peer = self.strangers.pop(conn, (None, None))
        if peer is not None:
            mine = self.by_peer[peer]
            mine.pop(conn, None)
            if not mine:
                del self.by_peer[peer]
        try:
            self.watch.remove(conn.fileno())
        except (KeyError, ValueError, OSError):
            pass

    def _drop(self, conn, why=None):
        peer = self.strangers.get(conn, (None, None))[1]
        self._forget(conn)
        if why:
            self.refusals.refused(peer or "a peer gone", why)
        conn.close()

    # -- its failures --
    def _crashed(self, reason):
        guard.tell(self.on_crash, reason)

    def _give_up(self, reason):
        with self.lock:
            self.closed = reason
        self.sock.close()
        guard.tell(self.on_give_up, reason)
