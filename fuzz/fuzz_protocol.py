"""atheris target: the dispatcher's side of the client <-> dispatcher protocol
(src/arvwrap/protocol.py) on arbitrary bytes.

The first byte picks what is fed:
  0: a request through a real socketpair into Incoming, with 0-3 descriptors
     passed by SCM_RIGHTS and the bytes split into chunks as the input says;
     "AWR1" and the length are put in front when the second byte is even, so the
     payload parser is reached;
  1: the client's lines after the request, in chunks, into ControlReader.feed;
  2: parse_payload directly.
Checked: nothing but ProtocolError is ever raised; a result has the documented
shape; and no descriptor is leaked, on success (after Request.close) or on error.

    python fuzz/fuzz_protocol.py [libFuzzer options] [CORPUS...]
"""
import os
import socket
import struct
import sys

import atheris

with atheris.instrument_imports():
    from arvwrap import protocol


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def chunks(fdp, data):
    out = []
    while data:
        n = fdp.ConsumeIntInRange(1, max(1, len(data)))
        out.append(data[:n])
        data = data[n:]
    return out


def check_request(req):
    assert isinstance(req, protocol.Request)
    assert isinstance(req.rule, int) and 0 <= req.rule < 2**31
    assert isinstance(req.path, bytes) and all(isinstance(a, bytes) for a in req.argv)
    assert 0 <= req.umask <= 0o777
    for fd in req.fds.values():
        os.fstat(fd)


def feed_incoming(fdp):
    framed = fdp.ConsumeIntInRange(0, 1) == 0
    nfds = fdp.ConsumeIntInRange(0, 3)
    data = fdp.ConsumeBytes(fdp.remaining_bytes() // 2)
    if framed:
        data = b"AWR1" + struct.pack("<Q", len(data)) + data
    parts = chunks(fdp, data)
    before = open_fds()
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        incoming = protocol.Incoming(b)
        result = None
        for i, part in enumerate(parts or [b""]):
            if i == 0 and nfds:
                extra = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
                try:
                    a.sendmsg([part], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        struct.pack(f"{nfds}i", *extra))])
                finally:
                    for fd in extra:
                        os.close(fd)
            elif part:
                a.sendall(part)
            if i == len(parts) - 1:
                a.shutdown(socket.SHUT_WR)
            try:
                while result is None:
                    got = incoming.feed()
                    if got is None:
                        break
                    result = got
            except protocol.ProtocolError:
                result = "error"
            if result is not None:
                break
        if result is None:       # the client closed: feed until the error or the end
            try:
                for _ in range(len(data) + 4):
                    result = incoming.feed()
                    if result is not None:
                        break
            except protocol.ProtocolError:
                result = "error"
        if isinstance(result, tuple):
            kind, value = result
            if kind == "request":
                check_request(value)
                value.close()
            else:
                assert kind == "cancel" and isinstance(value, str), result
    finally:
        a.close()
        b.close()
    assert open_fds() == before, "descriptors leaked"


def feed_control(fdp):
    reader = protocol.ControlReader(None)
    for part in chunks(fdp, fdp.ConsumeBytes(fdp.remaining_bytes())):
        for m in reader.feed(part):
            if isinstance(m, int):
                assert 1 <= m < 65, m
            elif isinstance(m, tuple):
                assert m[0] in ("pid", "nostart") and isinstance(m[1], int), m
            else:
                assert isinstance(m, protocol.Done), m
        assert len(reader._partial) <= protocol.ControlReader.MAX_LINE + len(part)


def parse_direct(fdp):
    before = open_fds()
    fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(fdp.ConsumeIntInRange(0, 2))]
    try:
        req = protocol.parse_payload(fdp.ConsumeBytes(fdp.remaining_bytes()), fds)
    except protocol.ProtocolError:
        pass
    else:
        check_request(req)
        req.close()
    assert open_fds() == before, "descriptors leaked"


def test_one_input(data):
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    (feed_incoming, feed_control, parse_direct)[mode](fdp)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
