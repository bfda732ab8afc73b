"""The TCP listener the tool's streams connect back to, from wherever it runs.

A job registers a one-time token; the first connection that sends "o<token>\\n"
(stdout) or "e<token>\\n" (stderr) is handed to it. Anything else is a stranger,
which the listener (arvwrap.backends.remote.listener) drops and logs, within its
limits: per peer and in all, a handshake of a few seconds, descriptors kept for
local calls.

If the listener's thread crashes, every job still waiting for a connection is
failed (its streams would never arrive) and the thread starts again; if it keeps
crashing, the relay closes and on_give_up is told.
"""
import logging
import threading

from arvwrap.backends.remote import guard
from arvwrap.backends.remote.listener import Listener

log = logging.getLogger("arvwrap.dispatcher")


class Relay:
    def __init__(self, bind_host, advertise_host, what="the stream relay", on_give_up=None,
                 label="relay", limits=None):
        self.host = advertise_host
        self.bound = bind_host
        self.lock = threading.Lock()
        self.waiting = {}          # b"o" + token -> callback(sock)
        self.failers = {}          # token -> on_fail(reason) of its job
        self.closed = None         # why it stopped taking connections
        self.on_give_up = on_give_up
        self.listener = Listener(bind_host, self._identify, limits, what, label,
                                 on_crash=self._fail_waiting, on_give_up=self._give_up)
        self.port = self.listener.port

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

    def _identify(self, line):
        """What takes the connection whose line this is, or None (a stranger)."""
        token = line[1:]
        with self.lock:
            handler = self.waiting.pop(line, None)
            on_fail = self.failers.get(token)
            if b"o" + token not in self.waiting and b"e" + token not in self.waiting:
                self.failers.pop(token, None)   # both streams are its job's now
        if handler is None:
            return None
        return lambda conn: self._hand_over(handler, conn, on_fail)

    @staticmethod
    def _hand_over(handler, conn, on_fail):
        """A handler's failure is its job's, not every job's."""
        try:
            handler(conn)
        except Exception as e:
            log.exception("handing a stream connection to its job")
            conn.close()
            guard.tell(on_fail, f"its stream could not be taken ({type(e).__name__}: {e})")

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
        guard.tell(self.on_give_up, reason)
