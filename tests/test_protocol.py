"""arvwrap.protocol against the real compiled client (docs/internals.md, section 4).

Round trips: a Python server bound where the client looks (paths.socket_path) reads
the request the real `arv-wrap-client --shim` sends and checks every field; the
descriptors it receives must be the very files the client had. Malformed requests,
written by hand into a socketpair, must raise ProtocolError and leak no descriptor.
"""
import os
import resource
import shutil
import socket
import struct
import subprocess
import tempfile
import threading

import pytest

from arvwrap import paths, protocol



@pytest.fixture
def env(base_env):
    """base_env with a short private XDG_RUNTIME_DIR (sun_path holds 107 bytes) and an
    ARV_WRAP_PYTHON that fails, so a client that missed our socket never starts a real
    dispatcher."""
    runtime = tempfile.mkdtemp(prefix="aw-", dir="/tmp")
    env = dict(base_env, XDG_RUNTIME_DIR=runtime, ARV_WRAP_PYTHON="/bin/false")
    env.pop("LD_PRELOAD", None)
    yield env
    shutil.rmtree(runtime, ignore_errors=True)


class Server:
    """Accepts one connection at the client's socket path and reads its request (and,
    with ask_state, the caller's process state, as for a remote job)."""

    def __init__(self, env, reply="exit 0", peek=False, ask_state=False):
        self.path = paths.socket_path(env)
        paths.private_dir(os.path.dirname(self.path))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.listener.settimeout(20)
        self.reply, self.peek, self.ask_state = reply, peek, ask_state
        self.request = self.error = self.cred = self.state = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
            with conn:
                self.cred = protocol.peer_cred(conn)
                if self.peek:       # as the dispatcher does before reading
                    assert conn.recv(4, socket.MSG_PEEK) == b"AWR1"
                self.request = protocol.read_request(conn)
                if self.ask_state:
                    conn.sendall(protocol.STATE_QUERY)
                    reader = protocol.ControlReader(conn)
                    while self.state is None and not reader.eof:
                        self.state = next(iter(reader.read()), None)
                protocol.send_line(conn, self.reply)
        except Exception as e:      # reported by join()
            self.error = e

    def join(self):
        self.thread.join(20)
        self.listener.close()
        os.unlink(self.path)
        if self.error:
            raise self.error
        return self.request


def same_file(fd, other):
    a = os.fstat(fd)
    b = os.fstat(other) if isinstance(other, int) else os.stat(other)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


TRICKY_ARGV = [b"tool", b"with space", b"new\nline", b"", b"\xff\xfe not utf-8", b"'\"$x`"]


def test_request_from_real_client_carries_every_field(client, env, tmp_path):
    work = tmp_path / "work dir"
    work.mkdir()
    (tmp_path / "in").write_bytes(b"input")
    named1 = open(tmp_path / "named1", "wb")
    named2 = open(tmp_path / "named2", "wb")
    n1, n2 = named1.fileno(), named2.fileno()
    argv = TRICKY_ARGV + [b"/dev/fd/%d" % n1, b"--in=/proc/self/fd/%d,x" % n2, b"/dev/fd/%d" % n1]
    job_env = dict(env, WEIRD=b"\xff\x01 a=b=c", EMPTY="")
    job_env = {os.fsencode(k): os.fsencode(v) for k, v in job_env.items()}
    nofile_hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    fsize_hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]

    def preexec():
        os.umask(0o027)
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, nofile_hard))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, fsize_hard))

    server = Server(env, peek=True, ask_state=True)
    with open(tmp_path / "in", "rb") as stdin, open(tmp_path / "out", "wb") as stdout, \
            open(tmp_path / "err", "wb") as stderr, named1, named2:
        proc = subprocess.Popen([client, "--shim", "7", "/bin/true", *argv], stdin=stdin,
                                stdout=stdout, stderr=stderr, env=job_env, cwd=work,
                                pass_fds=(n1, n2), preexec_fn=preexec)
        assert proc.wait(20) == 0
        with server.join() as req:
            assert req.rule == 7
            assert req.path == b"/bin/true"
            assert req.argv == argv
            assert req.env == [k + b"=" + v for k, v in job_env.items()]
            assert req.env_dict() == job_env
            assert req.cwd == os.fsencode(work)
            assert req.umask == 0o027
            assert req.pid == proc.pid == server.cred[0]
            assert server.cred[1] == os.getuid()
            assert req.rlimits == [] and req.state_left_out
            rlimits = server.state.rlimits
            limits = {r: (soft, hard) for r, soft, hard in rlimits}
            assert len(rlimits) == len(limits) == 16
            assert limits[resource.RLIMIT_NOFILE] == (300, nofile_hard)
            assert limits[resource.RLIMIT_FSIZE] == (1 << 30, fsize_hard)
            for r, (soft, hard) in limits.items():
                if r not in (resource.RLIMIT_NOFILE, resource.RLIMIT_FSIZE):
                    assert (soft, hard) == resource.getrlimit(r), r
            assert sorted(req.fds) == sorted([0, 1, 2, n1, n2])
            assert same_file(req.fds[0], stdin.fileno())
            assert same_file(req.fds[1], stdout.fileno())
            assert same_file(req.fds[2], stderr.fileno())
            assert same_file(req.fds[n1], n1)
            assert same_file(req.fds[n2], n2)
            assert req.cwd_fd is None        # an older client's cwd handle: nothing used it
            for fd in req.received_fds():
                assert os.get_inheritable(fd) is False      # MSG_CMSG_CLOEXEC
            # the descriptors work: what we write through fd 1 lands in the caller's file
            os.write(req.fds[1], b"via the received fd")
            received = req.received_fds()
        for fd in received:                                 # closed by the context manager
            with pytest.raises(OSError):
                os.fstat(fd)
    assert (tmp_path / "out").read_bytes() == b"via the received fd"


def test_request_skips_closed_and_unnamed_fds(client, env, tmp_path):
    """Closed stdin and a /dev/fd/N that is not open are not sent; an open fd that no
    argument names is not sent either."""
    spare = os.open(os.devnull, os.O_RDONLY)
    try:
        server = Server(env)
        proc = subprocess.run([client, "--shim", "0", "/bin/true", "t", "/dev/fd/200",
                               "/proc/self/fd/", "/dev/fd/x"],
                              env=env, pass_fds=(spare,), preexec_fn=lambda: os.close(0),
                              stdout=subprocess.DEVNULL, timeout=20)
        assert proc.returncode == 0
        with server.join() as req:
            assert sorted(req.fds) == [1, 2]
    finally:
        os.close(spare)


def test_request_with_no_argv_and_empty_environment(client, env):
    server = Server(env, reply="exit 0")
    # the client needs XDG_RUNTIME_DIR/state dir to find us, so keep just those
    small = {k: env[k] for k in ("XDG_RUNTIME_DIR", "ARV_WRAP_STATE_DIR", "ARV_WRAP_PYTHON")}
    proc = subprocess.run([client, "--shim", "2", "/bin/true"], env=small, timeout=20)
    assert proc.returncode == 0
    with server.join() as req:
        assert req.argv == []
        assert req.env_dict() == {os.fsencode(k): os.fsencode(v) for k, v in small.items()}


# ---------------------------------------------------------------- malformed requests

def field(tag, value):
    return tag + value + b"\0"


GOOD_FIELDS = [field(b"R", b"1"), field(b"P", b"/bin/true"), field(b"A", b"true"),
               field(b"E", b"A=1"), field(b"C", b"/"), field(b"U", b"18"),
               field(b"L", b"7 1024 inf"), field(b"I", b"123")]
GOOD = b"".join(GOOD_FIELDS)


def send_raw(sock, payload, fds=(), magic=b"AWR1", length=None, cut=None):
    header = magic + struct.pack("<Q", len(payload) if length is None else length)
    data = (header + payload)[:cut]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] if fds else []
    sock.sendmsg([data], anc)


def open_fd_count():
    """This process's descriptors, less the listings of /proc/PID/fd that other threads
    (a listener left by an earlier test counts its descriptors so) may hold meanwhile."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:        # closed since the listing: the listing's own, or transient
            continue
        count += not (target.startswith("/proc/") and target.endswith("/fd"))
    return count


def test_good_handmade_request_parses():
    a, b = socket.socketpair()
    with a, b:
        fd = os.open(os.devnull, os.O_RDONLY)
        send_raw(a, GOOD + field(b"F", b"5"), fds=[fd])
        os.close(fd)
        with protocol.read_request(b) as req:
            assert (req.rule, req.path, req.argv, req.cwd, req.umask, req.pid) == \
                (1, b"/bin/true", [b"true"], b"/", 18, 123)
            assert req.rlimits == [(7, 1024, resource.RLIM_INFINITY)]
            assert list(req.fds) == [5] and req.cwd_fd is None
            # an older client sends no process state: none is assumed
            assert (req.nice, req.ignored_signals, req.blocked_signals) == (None, None, None)


def test_process_state_fields_parse():
    a, b = socket.socketpair()
    with a, b:
        send_raw(a, GOOD + field(b"N", b"-1") + field(b"G", b"1")
                 + field(b"B", b"8000000000000200"))
        with protocol.read_request(b) as req:
            assert req.nice == -1
            assert req.ignored_signals == 1             # SIGHUP (1)
            assert req.blocked_signals == 1 << 63 | 1 << 9   # signals 64 and 10 (SIGUSR1)


def test_a_state_line_parses_as_the_request_fields_do():
    reader = protocol.ControlReader(None)
    line = b"state L7 1024 inf\0L0 inf inf\0N-1\0G1\0B8000000000000200\0\n"
    [state] = reader.feed(b"sig 2\n" + line)[1:]
    assert state == protocol.ProcessState(
        rlimits=[(7, 1024, resource.RLIM_INFINITY), (0, resource.RLIM_INFINITY,
                                                     resource.RLIM_INFINITY)],
        nice=-1, ignored_signals=1, blocked_signals=1 << 63 | 1 << 9)
    assert reader.feed(b"state G0\0\n") == [protocol.ProcessState([], None, 0, None)]


@pytest.mark.parametrize("body, why", [
    (b"G1", "does not end with a NUL"),
    (b"G1\0G2\0", "G (ignored signals) given twice"),
    (b"X1\0", "unknown state field tag b'X'"),
    (b"\0", "unknown state field tag b''"),
    (b"N-21\0", "not a nice value"),
    (b"L7 x y\0", "bad rlimit field"),
])
def test_a_bad_state_line_is_said_to_be_bad(body, why):
    [(kind, text)] = protocol.ControlReader(None).feed(b"state " + body + b"\n")
    assert kind == "badstate" and why in text


MALFORMED = {
    "bad magic": dict(payload=GOOD, magic=b"XXXX"),
    "oversized": dict(payload=GOOD, length=protocol.MAX_PAYLOAD + 1),
    "eof in header": dict(payload=GOOD, cut=7),
    "eof in payload": dict(payload=GOOD, cut=30),
    "no trailing NUL": dict(payload=GOOD[:-1]),
    "empty payload": dict(payload=b""),
    "empty field": dict(payload=GOOD + b"\0"),
    "unknown tag": dict(payload=GOOD + field(b"Z", b"1")),
    "missing pid": dict(payload=GOOD.replace(field(b"I", b"123"), b"")),
    "missing cwd": dict(payload=GOOD.replace(field(b"C", b"/"), b"")),
    "rule twice": dict(payload=GOOD + field(b"R", b"2")),
    "rule not decimal": dict(payload=GOOD.replace(field(b"R", b"1"), field(b"R", b"-1"))),
    "umask out of range": dict(payload=GOOD.replace(field(b"U", b"18"), field(b"U", b"4096"))),
    "bad rlimit": dict(payload=GOOD + field(b"L", b"1 2")),
    "rlimit twice": dict(payload=GOOD + field(b"L", b"7 1 1")),
    "more F than fds": dict(payload=GOOD + field(b"F", b"0") + field(b"F", b"1"), nfds=1),
    "more fds than F": dict(payload=GOOD + field(b"F", b"cwd"), nfds=2),
    "F twice": dict(payload=GOOD + field(b"F", b"1") + field(b"F", b"1"), nfds=2),
    "F not a number": dict(payload=GOOD + field(b"F", b"one"), nfds=1),
    "nice out of range": dict(payload=GOOD + field(b"N", b"20")),
    "nice not decimal": dict(payload=GOOD + field(b"N", b"+1")),
    "nice empty": dict(payload=GOOD + field(b"N", b"")),
    "nice twice": dict(payload=GOOD + field(b"N", b"1") + field(b"N", b"1")),
    "ignored not hex": dict(payload=GOOD + field(b"G", b"0x1")),
    "ignored over 64 signals": dict(payload=GOOD + field(b"G", b"1" + b"0" * 16)),
    "blocked upper case": dict(payload=GOOD + field(b"B", b"FF")),
    "blocked twice": dict(payload=GOOD + field(b"B", b"0") + field(b"B", b"0")),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_raises_and_closes_fds(case):
    spec = dict(MALFORMED[case])
    nfds = spec.pop("nfds", 2 if case in ("bad magic", "no trailing NUL") else 0)
    a, b = socket.socketpair()
    with a, b:
        baseline = open_fd_count()
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(nfds)]
        send_raw(a, fds=fds, **spec)
        for fd in fds:
            os.close(fd)
        if "eof" in case:
            a.shutdown(socket.SHUT_WR)
        with pytest.raises(protocol.ProtocolError) as info:
            protocol.read_request(b)
        assert "\n" not in str(info.value)
        assert open_fd_count() == baseline


def test_the_most_fds_one_message_can_carry():
    a, b = socket.socketpair()
    with a, b:
        baseline = open_fd_count()
        fd = os.open(os.devnull, os.O_RDONLY)
        labels = b"".join(field(b"F", b"%d" % n) for n in range(protocol.MAX_FDS - 1))
        send_raw(a, GOOD + labels + field(b"F", b"cwd"), fds=[fd] * protocol.MAX_FDS)
        os.close(fd)
        with protocol.read_request(b) as req:
            assert len(req.fds) == protocol.MAX_FDS - 1 and req.cwd_fd is not None
        assert open_fd_count() == baseline


# ---------------------------------------------------------------- replies and control

def test_reply_helpers_write_lines_and_never_raise_when_client_gone():
    a, b = socket.socketpair()
    with a, b:
        assert protocol.send_warn(a, "two\nlines")
        assert protocol.send_job(a, "j-1")
        assert protocol.send_local(a)
        assert protocol.send_exit(a, 255)
        assert protocol.send_signal(a, 15, "cancelled")
        assert protocol.send_signal(a, 9)
        assert protocol.send_fail(a, "no backend")
        assert protocol.send_line(a, b"exit \xff")
        a.shutdown(socket.SHUT_WR)
        assert b.makefile("rb").read() == (b"warn two lines\njob j-1\nlocal\nexit 255\n"
                                           b"signal 15 cancelled\nsignal 9\nfail no backend\n"
                                           b"exit \xff\n")
    a, b = socket.socketpair()
    b.close()
    assert protocol.send_exit(a, 0) is False            # EPIPE
    a.close()
    assert protocol.send_line(a, "exit 0") is False     # closed socket object
    with pytest.raises(ValueError):
        protocol.send_exit(socket.socket(socket.AF_UNIX), 256)


def test_control_reader_parses_sig_lines_and_sees_eof():
    a, b = socket.socketpair()
    with a, b:
        reader = protocol.ControlReader(b)
        a.sendall(b"sig 2\nsig 1")
        assert reader.read() == [2]
        a.sendall(b"5\nbogus\nsig 99\nsig x\n" + b"y" * 1000 + b"\nsig 10\n")
        assert reader.read() == [15, 10]
        a.close()
        assert reader.read() == [] and reader.eof
    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        reader = protocol.ControlReader(b)
        assert reader.read() == [] and not reader.eof
        a.sendall(b"sig 3\nsig 12\n")
        a.close()
        assert list(protocol.ControlReader(b)) == [3, 12]


def test_peer_uid_is_ours():
    a, b = socket.socketpair()
    with a, b:
        assert protocol.peer_uid(a) == os.getuid()
        assert protocol.peer_cred(a)[0] == os.getpid()
