"""The TCP listener the tool's streams connect back to, from wherever it runs.

A job registers a one-time token; the first connection that sends "o<token>\\n"
(stdout) or "e<token>\\n" (stderr) is handed to it. Anything else is dropped, and
so is a connection that sends no whole token within HANDSHAKE_TIMEOUT.

One guarded thread serves every job's handshakes. If it crashes, every job still
waiting for a connection is failed (its streams would never arrive) and the thread
starts again; if it keeps crashing, the relay closes and on_give_up is told.
"""
import logging
import selectors
import socket
import threading
import time

from arvwrap.backends.remote import guard

log = logging.getLogger("arvwrap.dispatcher")
HANDSHAKE_TIMEOUT = 30.0  # s a relay connection may take to send its token


class Relay:
    def __init__(self, bind_host, advertise_host, what="the stream relay", on_give_up=None,
                 label="relay"):
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((bind_host, 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.host = advertise_host
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.waiting = {}          # b"o" + token -> callback(sock)
        self.failers = {}          # token -> on_fail(reason) of its job
        self.pending = {}          # connection -> handshake deadline
        self.closed = None         # why it stopped taking connections
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.sock, selectors.EVENT_READ, None)
        self.on_give_up = on_give_up
        self.label = label         # its log lines: "<label>: refused a connection ..."
        guard.start(what, self._serve, on_crash=self._fail_waiting, restart=True,
                    on_give_up=self._give_up)

    def expect(self, token, on_stdout, on_stderr, on_fail=None):
        """Hand the token's connections to on_stdout/on_stderr; on_fail(reason) if the
        relay cannot."""
        with self.lock:
            if self.closed:
                closed = self.closed
            else:
                closed = None
                self.waiting[b"o" + token] = on_stdout
                self.waiting[b"e" + token] = on_stderr
                self.failers[token] = on_fail
        if closed:
            guard.tell(on_fail, closed)

    def forget(self, token):
        with self.lock:
            self.waiting.pop(b"o" + token, None)
            self.waiting.pop(b"e" + token, None)
            self.failers.pop(token, None)

    def _serve(self):
        try:
            while True:
                for key, _ in self.selector.select(timeout=1.0):
                    if key.fileobj is self.sock:
                        self._accept()
                    else:
                        self._handshake(key.fileobj)
                now = time.monotonic()
                for conn in [c for c, deadline in self.pending.items() if deadline < now]:
                    self._drop(conn, f"no token within {HANDSHAKE_TIMEOUT:g}s")
        finally:
            for conn in list(self.pending):
                self._drop(conn)

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:       # none left (BlockingIOError), or out of descriptors
                return
            conn.setblocking(False)
            self.pending[conn] = time.monotonic() + HANDSHAKE_TIMEOUT
            self.selector.register(conn, selectors.EVENT_READ, None)

    def _handshake(self, conn):
        try:
            head = conn.recv(128, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            head = b""
        end = head.find(b"\n")
        if not head or (end < 0 and len(head) >= 128):
            self._drop(conn, "it sent no token line" if head
                       else "it closed before sending a token")
            return
        if end < 0:
            return
        conn.recv(end + 1)
        token = head[1:end]
        with self.lock:
            handler = self.waiting.pop(head[:end], None)
            on_fail = self.failers.get(token)
            if b"o" + token not in self.waiting and b"e" + token not in self.waiting:
                self.failers.pop(token, None)   # both streams are its job's now
        if handler is None:
            # never the bytes it sent in the log: they may be a real token, mistyped
            self._drop(conn, "its token is no running job's (or was used already)")
            return
        self.selector.unregister(conn)
        del self.pending[conn]
        conn.setblocking(True)
        self._hand_over(handler, conn, on_fail)

    @staticmethod
    def _hand_over(handler, conn, on_fail):
        """A handler's failure is its job's, not every job's."""
        try:
            handler(conn)
        except Exception as e:
            log.exception("handing a stream connection to its job")
            conn.close()
            guard.tell(on_fail, f"its stream could not be taken ({type(e).__name__}: {e})")

    def _drop(self, conn, why=None):
        if why:
            try:
                peer = "%s:%s" % conn.getpeername()[:2]
            except OSError:
                peer = "a peer gone"
            log.warning("%s: refused a connection from %s: %s", self.label, peer, why)
        try:
            self.selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        self.pending.pop(conn, None)
        conn.close()

    def _fail_waiting(self, reason):
        """The serving thread crashed: no job still waiting will get its streams."""
        with self.lock:
            failers = list(self.failers.values())
            self.waiting.clear()
            self.failers.clear()
        for on_fail in failers:
            guard.tell(on_fail, reason)

    def _give_up(self, reason):
        with self.lock:
            self.closed = reason
        self.selector.unregister(self.sock)
        self.sock.close()
        guard.tell(self.on_give_up, reason)
