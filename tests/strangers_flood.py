"""Strangers for tests/test_strangers.py: N TCP connections to HOST:PORT that never
bring a valid token, opened over SECONDS, at most OPEN at a time, in turn one of:

  silent   connects and never sends
  loris    sends one byte (never a newline) every half second
  garbage  sends 200 random bytes, no newline
  token    sends a well-formed line with a token nobody registered
  quit     connects and closes at once

Prints one JSON line: how many were opened, how many the other end closed or reset,
how many could not connect (with the errors seen). Needs only the standard library
(run with python3 -S, also inside a node's network namespace).
"""
import errno
import json
import os
import selectors
import socket
import sys
import time

KINDS = ("silent", "loris", "garbage", "token", "quit")


def main(host, port, n, seconds, max_open):
    sel = selectors.DefaultSelector()
    start = time.monotonic()
    opened = ended = 0
    failed = {}
    open_ = {}                   # sock -> (kind, next send time)
    while opened < n or open_:
        now = time.monotonic()
        due = min(n, int((now - start) / seconds * n) + 1)
        while opened < due and len(open_) < max_open:
            kind = KINDS[opened % len(KINDS)]
            opened += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS):
                name = errno.errorcode.get(err, str(err))
                failed[name] = failed.get(name, 0) + 1
                sock.close()
                continue
            open_[sock] = (kind, now)
            sel.register(sock, selectors.EVENT_READ)
        for key, _ in sel.select(0.05):
            sock = key.fileobj
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:                     # the listener closed it (or reset it)
                ended += 1
                sel.unregister(sock)
                del open_[sock]
                sock.close()
        now = time.monotonic()
        for sock, (kind, at) in list(open_.items()):
            if at > now:
                continue
            try:
                if kind == "quit":
                    ended += 1
                    sel.unregister(sock)
                    del open_[sock]
                    sock.close()
                    continue
                if kind == "loris":
                    sock.send(b"o")
                    open_[sock] = (kind, now + 0.5)
                elif kind == "garbage":
                    sock.send(os.urandom(200).replace(b"\n", b"x"))
                    open_[sock] = (kind, float("inf"))
                elif kind == "token":
                    sock.send(b"o" + os.urandom(16).hex().encode() + b"\n")
                    open_[sock] = (kind, float("inf"))
                else:
                    open_[sock] = (kind, float("inf"))
            except OSError:          # not connected yet (tried again), or closed: recv sees it
                pass
        if opened >= n and time.monotonic() - start > seconds + 30:
            break                             # the listener kept some for ever: say so
    print(json.dumps({"opened": opened, "ended": ended, "left_open": len(open_),
                      "failed": failed, "seconds": round(time.monotonic() - start, 2)}))


if __name__ == "__main__":
    host, port, n, seconds, max_open = sys.argv[1:6]
    main(host, int(port), int(n), float(seconds), int(max_open))
