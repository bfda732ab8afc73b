"""The listener strangers can reach (arvwrap.backends.remote.listener) and its refusal
log (refusals): the handshake limit, the caps per peer and in all (the oldest
stranger goes first, so a newcomer with its token always gets in), the descriptor
reserve, and a log a flood cannot fill. The flood on the real cluster, with real
calls beside it: tests/test_strangers.py."""
import logging
import socket
import time

import pytest

from arvwrap.backends.remote import fds, refusals
from arvwrap.backends.remote.listener import Limits, Listener
from conftest import poll, until


class Taken:
    """identify() for tokens b"t0", b"t1", ...: what each took, in order."""

    def __init__(self):
        self.conns = {}

    def __call__(self, line):
        if not line.startswith(b"t"):
            return None
        return lambda conn: self.conns.setdefault(line, conn)


def connect(port, data=b"", source="127.0.0.1"):
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    if data:
        sock.sendall(data)
    return sock


def closed(sock, timeout=5):
    """The listener closed its end (EOF or a reset) within timeout seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def refusal_lines(caplog):
    return [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]


def test_the_token_line_is_taken_and_what_follows_it_kept():
    taken = Taken()
    listener = Listener("127.0.0.1", taken)
    sock = connect(listener.port, b"t0\nafter the line")
    conn = until(lambda: taken.conns.get(b"t0"), 5, "the connection taken")
    assert conn.getblocking() and conn.recv(100) == b"after the line"
    assert sock.recv(10) == b"+"               # the other end is told it was taken
    assert not listener.strangers
    sock.close()


@pytest.mark.parametrize("sent, why", [
    (b"", "no token within 0.3s"),                       # opens and never sends
    (b"t", "no token within 0.3s"),                      # slow-loris: never a whole line
    (b"x" * 200, "it sent no token line"),               # garbage
    (b"nope\n", "its token is no running job's (or was used already)"),
])
def test_a_stranger_is_dropped_and_logged_without_its_bytes(caplog, sent, why):
    caplog.set_level(logging.WARNING, "arvwrap.dispatcher")
    listener = Listener("127.0.0.1", Taken(), Limits(handshake=0.3), label="test relay")
    start = time.monotonic()
    sock = connect(listener.port, sent)
    assert closed(sock)
    assert time.monotonic() - start < 3
    assert poll(lambda: refusal_lines(caplog))
    assert refusal_lines(caplog) == [f"test relay: refused a connection from 127.0.0.1: {why}"]
    assert b"nope" not in caplog.text.encode() and "xxx" not in caplog.text


def test_over_the_cap_per_peer_the_oldest_stranger_goes_and_a_newcomer_gets_in():
    taken = Taken()
    listener = Listener("127.0.0.1", taken, Limits(per_peer=4))
    silent = [connect(listener.port) for _ in range(10)]
    until(lambda: len(listener.strangers) == 4 and not listener.by_peer.keys() - {"127.0.0.1"},
          5, "four strangers kept")
    assert all(closed(s) for s in silent[:6])          # the oldest six dropped
    assert not any(closed(s, 0.2) for s in silent[6:])
    sock = connect(listener.port, b"t0\n")
    assert until(lambda: taken.conns.get(b"t0"), 5, "the newcomer taken")
    for s in silent + [sock]:
        s.close()


def test_over_the_cap_in_all_the_oldest_of_any_peer_goes():
    listener = Listener("127.0.0.1", Taken(), Limits(per_peer=100, total=5))
    first = [connect(listener.port, source="127.0.0.2") for _ in range(3)]
    later = [connect(listener.port, source="127.0.0.3") for _ in range(4)]
    assert all(closed(s) for s in first[:2])
    until(lambda: len(listener.strangers) == 5, 5, "five strangers in all")
    assert dict((p, len(c)) for p, c in listener.by_peer.items()) == {
        "127.0.0.2": 1, "127.0.0.3": 4}
    for s in first + later:
        s.close()


def test_stand_in_limit_it_stops_accepting_before_the_descriptors_run_out(monkeypatch, caplog):
    """A descriptor limit just above what is open (a stand-in for a low RLIMIT_NOFILE,
    which the whole test process would share): the listener keeps the reserve free and
    leaves the rest in the kernel's backlog; once the limit allows, it takes them."""
    caplog.set_level(logging.WARNING, "arvwrap.dispatcher")
    real = fds.resource.getrlimit
    stand_in = {}
    monkeypatch.setattr(fds.resource, "getrlimit", lambda r: stand_in.get(r) or real(r))
    monkeypatch.setattr(fds.Budget, "RECOUNT", 0.0)
    taken = Taken()
    listener = Listener("127.0.0.1", taken, Limits(reserve=0.0))
    open_now = len(fds.os.listdir("/proc/self/fd")) - 1
    stand_in[fds.resource.RLIMIT_NOFILE] = (open_now + fds.Budget.MINIMUM + 3, 1 << 20)
    socks = [connect(listener.port, b"t%d\n" % i) for i in range(6)]    # 6 of our own fds
    time.sleep(0.5)
    assert len(taken.conns) < 6
    assert any("not accepting connections for now" in r.getMessage() for r in caplog.records)
    del stand_in[fds.resource.RLIMIT_NOFILE]
    until(lambda: len(taken.conns) == 6, 5, "the rest taken once there is room")
    for s in socks + list(taken.conns.values()):
        s.close()


def test_a_flood_of_refusals_is_a_few_lines_then_counts(caplog):
    caplog.set_level(logging.WARNING, "arvwrap.dispatcher")
    log = refusals.RefusalLog("test relay")
    for i in range(1000):
        log.refused("10.0.0.7", "no token within 5s" if i % 2 else "it sent no token line")
    for i in range(100):
        log.refused(f"10.0.1.{i}", "it sent no token line")
    assert len(caplog.records) == refusals.PER_WINDOW + refusals.MAX_PEERS - 1
    log.flush(time.monotonic() + refusals.WINDOW)
    summary = caplog.records[-2:]
    assert [r.getMessage() for r in summary] == [
        "test relay: refused 995 more connections from 10.0.0.7 in the last 10s "
        "(498 no token within 5s; 497 it sent no token line)",
        "test relay: refused 69 connections from other addresses in the last 10s "
        "(69 it sent no token line)"]
