"""Every message between arv-wrap's parts and the dispatcher (docs/internals.md, section 4).

A request is a 12-byte header (b"AWR1" + little-endian u64 payload length) sent with
SCM_RIGHTS, then the payload: fields of one tag byte, bytes, NUL. After it the client
sends lines (ControlReader): "sig N" for each forwarded signal, "state" + fields
when the dispatcher asks for the caller's process state (a remote backend needs it;
a newer client leaves it out of the request), and for a job it runs itself ("run"
reply) "pid N", then "done STATUS UTIME_US STIME_US MAXRSS_KB" or "nostart ERRNO".
The dispatcher answers with text lines (warn, job, state, local, run, exit, signal,
fail; final_reply builds the last one from an Outcome). `arv-wrap
cancel` sends b"AWC1" + job id + newline instead and reads "ok" or "unknown".

The parsing is split from the I/O (parse_header, parse_payload) so that any I/O model
can use it: read_request does blocking I/O, Incoming the non-blocking kind. Whatever
goes wrong, the received descriptors are closed before ProtocolError is raised.
"""
import functools
import os
import re
import resource
import socket
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

MAGIC = b"AWR1"
CANCEL_MAGIC = b"AWC1"
HEADER = struct.Struct("<4sQ")
MAX_PAYLOAD = 64 << 20          # argv + environ are capped far lower by the kernel
MAX_FDS = 253                   # SCM_MAX_FD
_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * 4)   # each descriptor a C int
# Plain ints: socket's MsgFlag members cost an enum operation at each use.
_CLOEXEC, _CTRUNC = int(socket.MSG_CMSG_CLOEXEC), int(socket.MSG_CTRUNC)
_RLIMIT = re.compile(rb"([0-9]{1,4}) ([0-9]{1,20}|inf) ([0-9]{1,20}|inf)")
_CLIENT_LINE = re.compile(rb"(sig|pid|nostart) ([0-9]{1,10})|done (-?[0-9]{1,10}) ([0-9]{1,19}) "
                          rb"([0-9]{1,19}) ([0-9]{1,19})")
_NICE = re.compile(rb"-?[0-9]{1,2}")
_SIGSET = re.compile(rb"[0-9a-f]{1,16}")     # bit n-1 for signal n (1..64)
_REQUIRED = {b"R": "rule index", b"P": "resolved path", b"C": "cwd", b"U": "umask",
             b"I": "client pid"}
_OPTIONAL = {b"N": "nice", b"G": "ignored signals", b"B": "blocked signals"}   # newer clients
STATE_QUERY = b"state\n"     # the dispatcher asks a client for its caller's process state


class ProtocolError(Exception):
    """A malformed or truncated request (the message never contains a newline)."""


@dataclass
class Request:
    rule: int
    path: bytes
    argv: List[bytes]
    env: List[bytes]                        # "NAME=value" entries, in the caller's order
    cwd: bytes                              # empty if the client's getcwd failed
    umask: int
    rlimits: List[Tuple[int, int, int]]     # (resource, soft, hard); RLIM_INFINITY for inf
    fds: Dict[int, int] = field(default_factory=dict)   # caller's fd number -> our fd
    cwd_fd: Optional[int] = None            # an older client's cwd handle (unused)
    pid: int = 0
    nice: Optional[int] = None              # None: an older client did not say
    ignored_signals: Optional[int] = None   # bitmask, bit n-1 for signal n
    blocked_signals: Optional[int] = None   # the signal mask, the same way

    @property
    def state_left_out(self) -> bool:
        """A newer client sends the caller's process state (L, N, G, B) only when
        asked ("state"); an older one sent it here."""
        return not self.rlimits and self.ignored_signals is None

    def env_dict(self) -> Dict[bytes, bytes]:
        """The environment as a dict; like getenv, the first of duplicate names wins,
        and entries without '=' are left out."""
        out: Dict[bytes, bytes] = {}
        for entry in self.env:
            name, eq, value = entry.partition(b"=")
            if eq and name not in out:
                out[name] = value
        return out

    def received_fds(self) -> List[int]:
        return ([] if self.cwd_fd is None else [self.cwd_fd]) + list(self.fds.values())

    def close(self):
        """Close every received descriptor (idempotent)."""
        _close_all(self.received_fds())
        self.fds = {}
        self.cwd_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class ProcessState:
    """The caller's process state that a remote backend rebuilds where the tool runs,
    as the client answers "state" (the same fields as an older client's request)."""
    rlimits: List[Tuple[int, int, int]]
    nice: Optional[int] = None
    ignored_signals: Optional[int] = None
    blocked_signals: Optional[int] = None


def _close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------- parsing (no I/O)

def parse_header(header: bytes) -> int:
    """The payload length from the 12 header bytes."""
    if len(header) != HEADER.size:
        raise ProtocolError(f"request header is {len(header)} bytes, not {HEADER.size}")
    magic, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r} (not an arv-wrap client, or another version)")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"request payload of {length} bytes exceeds {MAX_PAYLOAD}")
    return length


def _decimal(tag, value, limit=None):
    if not (value.isdigit() and len(value) <= 19):    # bytes: ASCII digits only
        raise ProtocolError(f"field {tag.decode()} is not a decimal number: {value[:40]!r}")
    number = int(value)
    if limit is not None and number > limit:
        raise ProtocolError(f"field {tag.decode()} out of range: {number}")
    return number


def _nice(value):
    if not _NICE.fullmatch(value) or not -20 <= int(value) <= 19:
        raise ProtocolError(f"field N is not a nice value (-20..19): {value[:40]!r}")
    return int(value)


def _sigset(tag, value):
    if not _SIGSET.fullmatch(value):
        raise ProtocolError(f"field {tag.decode()} is not a hexadecimal signal set: "
                            f"{value[:40]!r}")
    return int(value, 16)


def _limit(value):
    return resource.RLIM_INFINITY if value == b"inf" else int(value)


def parse_payload(payload: bytes, fds: List[int]) -> Request:
    """A Request from the payload and the descriptors received with the header (in
    order). On error, closes fds and raises ProtocolError; on success the Request
    owns them."""
    try:
        return _parse_payload(bytes(payload), fds)
    except ProtocolError:
        _close_all(fds)
        raise


# The repeated fields, by their tag's byte: argv, environ, rlimits, descriptor labels.
_REPEATED = {ord(tag): i for i, tag in enumerate("AELF")}


def _parse_payload(payload, fds):
    """Fields are NUL-terminated and hold no NUL: one split finds them all."""
    if not payload.endswith(b"\0"):
        raise ProtocolError("payload does not end with a NUL")
    repeated = argv, env, limits, labels = [], [], [], []
    single = {}
    for item in payload[:-1].split(b"\0"):
        if not item:
            raise ProtocolError("empty field (no tag)")
        which = _REPEATED.get(item[0])
        if which is not None:
            repeated[which].append(item[1:])
            continue
        tag = item[:1]
        if tag not in _REQUIRED and tag not in _OPTIONAL:
            raise ProtocolError(f"unknown field tag {tag!r}")
        if tag in single:
            what = _REQUIRED.get(tag) or _OPTIONAL[tag]
            raise ProtocolError(f"field {tag.decode()} ({what}) given twice")
        single[tag] = item[1:]
    missing = [name for tag, name in _REQUIRED.items() if tag not in single]
    if missing:
        raise ProtocolError("request lacks " + ", ".join(missing))
    state = _state(limits, single)
    request = Request(rule=_decimal(b"R", single[b"R"], 2**31 - 1), path=single[b"P"],
                      argv=argv, env=env, cwd=single[b"C"],
                      umask=_decimal(b"U", single[b"U"], 0o777), rlimits=state.rlimits,
                      pid=_decimal(b"I", single[b"I"], 2**31 - 1), nice=state.nice,
                      ignored_signals=state.ignored_signals,
                      blocked_signals=state.blocked_signals)
    _assign_fds(request, labels, fds)
    return request


def _state(limits, single):
    """The ProcessState of L fields and the single fields N, G and B (those given)."""
    return ProcessState(rlimits=list(_rlimits(tuple(limits))),
                        nice=_nice(single[b"N"]) if b"N" in single else None,
                        ignored_signals=_sigset(b"G", single[b"G"]) if b"G" in single else None,
                        blocked_signals=_sigset(b"B", single[b"B"]) if b"B" in single else None)


def parse_state(body: bytes) -> ProcessState:
    """The ProcessState of a client's "state" line (after "state "): L, N, G and B
    fields, each ending in NUL, as in a request. Raises ProtocolError."""
    if not body.endswith(b"\0"):
        raise ProtocolError("state does not end with a NUL")
    limits, single = [], {}
    for item in body[:-1].split(b"\0"):
        tag, value = item[:1], item[1:]
        if tag == b"L":
            limits.append(value)
        elif tag not in _OPTIONAL:
            raise ProtocolError(f"unknown state field tag {tag!r}")
        elif tag in single:
            raise ProtocolError(f"state field {tag.decode()} ({_OPTIONAL[tag]}) given twice")
        else:
            single[tag] = value
    return _state(limits, single)


@functools.lru_cache(maxsize=64)
def _rlimits(fields):
    """[(resource, soft, hard)] from the L fields. A caller's limits are the same in
    each of its calls, so each set is parsed once (a bad one raises every time)."""
    rlimits = []
    for value in fields:
        m = _RLIMIT.fullmatch(value)
        if not m:
            raise ProtocolError(f"bad rlimit field {value[:60]!r}")
        rlimits.append((int(m[1]), _limit(m[2]), _limit(m[3])))
    if len({r for r, _, _ in rlimits}) != len(rlimits):
        raise ProtocolError("an rlimit is given twice")
    return tuple(rlimits)


def _assign_fds(request, labels, fds):
    if len(labels) != len(fds):
        raise ProtocolError(f"{len(labels)} F fields but {len(fds)} descriptors received")
    for label, fd in zip(labels, fds):
        if label == b"cwd":
            if request.cwd_fd is not None:
                raise ProtocolError("F cwd given twice")
            request.cwd_fd = fd
            continue
        number = _decimal(b"F", label, 2**31 - 1)
        if number in request.fds:
            raise ProtocolError(f"F {number} given twice")
        request.fds[number] = fd


# ---------------------------------------------------------------- socket I/O

def _fds_from_ancillary(ancdata, fds):
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(memoryview(data)[:len(data) - len(data) % 4].cast("i"))


def read_request(sock: socket.socket) -> Request:
    """Read one request from a blocking socket (received fds are close-on-exec)."""
    fds: List[int] = []
    try:
        header = b""
        while len(header) < HEADER.size:
            data, ancdata, flags, _ = sock.recvmsg(HEADER.size - len(header), _ANCILLARY,
                                                   _CLOEXEC)
            _fds_from_ancillary(ancdata, fds)
            if flags & _CTRUNC:
                raise ProtocolError("descriptors were truncated (more than the limit sent)")
            if not data:
                raise ProtocolError(f"connection closed after {len(header)} of "
                                    f"{HEADER.size} header bytes")
            header += data
        length = parse_header(header)
        payload = bytearray(length)
        view, got = memoryview(payload), 0
        while got < length:
            n = sock.recv_into(view[got:])
            if n == 0:
                raise ProtocolError(f"connection closed after {got} of {length} payload bytes")
            got += n
    except ProtocolError:
        _close_all(fds)
        raise
    except OSError as e:
        _close_all(fds)
        raise ProtocolError(f"reading the request: {e}") from e
    return parse_payload(payload, fds)


class Incoming:
    """A connection's first message, read without blocking: a request, or a cancel.

    feed() does one recv and returns None until the message is whole, then
    ("request", Request) or ("cancel", job id). Raises ProtocolError for anything
    else (the descriptors received so far are closed)."""
    MAX_CANCEL = 256

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fds: List[int] = []
        self.header = b""
        self.payload: Optional[bytearray] = None
        self.got = 0

    def feed(self):
        try:
            return self._feed()
        except ProtocolError:
            _close_all(self.fds)
            self.fds = []
            raise

    def _feed(self):
        if self.payload is None:
            return self._feed_header()
        try:
            n = self.sock.recv_into(memoryview(self.payload)[self.got:])
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            raise ProtocolError(f"reading the request: {e}") from e
        if n == 0:
            raise ProtocolError(f"connection closed after {self.got} of "
                                f"{len(self.payload)} payload bytes")
        self.got += n
        if self.got < len(self.payload):
            return None
        fds, self.fds = self.fds, []
        return "request", parse_payload(self.payload, fds)

    def _feed_header(self):
        size = self.MAX_CANCEL if self.header.startswith(CANCEL_MAGIC) else HEADER.size
        try:
            data, ancdata, flags, _ = self.sock.recvmsg(size - len(self.header), _ANCILLARY,
                                                        _CLOEXEC)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            raise ProtocolError(f"reading the request: {e}") from e
        _fds_from_ancillary(ancdata, self.fds)
        if flags & _CTRUNC:
            raise ProtocolError("descriptors were truncated (more than the limit sent)")
        if not data:
            raise ProtocolError(f"connection closed after {len(self.header)} header bytes")
        self.header += data
        if self.header.startswith(CANCEL_MAGIC):
            return self._cancel()
        if len(self.header) < HEADER.size:
            return None
        length = parse_header(self.header)
        self.payload = bytearray(length)
        if length == 0:
            return "request", parse_payload(b"", self.fds)
        return self._feed()       # the payload is usually there already: no second wake

    def _cancel(self):
        if b"\n" not in self.header:
            if len(self.header) >= self.MAX_CANCEL:
                raise ProtocolError("over-long cancel message")
            return None
        _close_all(self.fds)
        self.fds = []
        return "cancel", self.header[len(CANCEL_MAGIC):].split(b"\n")[0].strip().decode(
            errors="replace")


def cancel_message(job_id: str) -> bytes:
    return CANCEL_MAGIC + job_id.encode() + b"\n"


def peer_cred(sock: socket.socket) -> Tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end (SO_PEERCRED)."""
    creds = struct.Struct("3i")
    return creds.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, creds.size))


def peer_uid(sock: socket.socket) -> int:
    return peer_cred(sock)[1]


# ---------------------------------------------------------------- replies

def encode_line(text) -> bytes:
    """One protocol line: newlines inside text become spaces."""
    data = os.fsencode(text) if isinstance(text, str) else bytes(text)
    return data.replace(b"\r", b" ").replace(b"\n", b" ") + b"\n"


def send_line(sock: socket.socket, text) -> bool:
    """Send one line; False (never an exception) if the client is gone."""
    try:
        sock.sendall(encode_line(text))
        return True
    except OSError:           # BrokenPipe, ConnectionReset, a closed socket, a timeout
        return False


def send_warn(sock, text) -> bool:
    return send_line(sock, "warn " + text)


def send_job(sock, job_id) -> bool:
    return send_line(sock, f"job {job_id}")


def send_local(sock) -> bool:
    return send_line(sock, "local")


def send_exit(sock, status: int) -> bool:
    if not 0 <= status <= 255:
        raise ValueError(f"exit status {status} is not in 0..255")
    return send_line(sock, f"exit {status}")


def send_signal(sock, signum: int, text: Optional[str] = None) -> bool:
    if not 1 <= signum < 65:
        raise ValueError(f"bad signal number {signum}")
    return send_line(sock, f"signal {signum}" + (f" {text}" if text else ""))


def send_fail(sock, text) -> bool:
    return send_line(sock, "fail " + text)


def run_message(env: Dict[bytes, bytes], stdin_none: bool = False) -> bytes:
    """"run": the client starts the tool itself as its own child, with exactly this
    environment (a counted block of NAME=value entries, each ending in NUL)."""
    block = b"\0".join(map(b"=".join, env.items())) + b"\0" if env else b""
    flags = b" stdin-none" if stdin_none else b""
    return b"run %d%s\n" % (len(block), flags) + block


def status_reply(status) -> Optional[str]:
    """The final reply a wait status implies: what a client that reported it does on
    its own when the connection closes after "done" (None for no status)."""
    if status is None:
        return None
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else None


def final_reply(outcome) -> str:
    """The last line for the client, from a jobspec.Outcome."""
    if outcome.run_locally:
        return "local"
    if outcome.state == "exited":
        return f"exit {outcome.exit_status}"
    if outcome.state == "signaled":
        return f"signal {outcome.signal}" + (f" {outcome.message}" if outcome.message else "")
    if outcome.state == "cancelled":
        text = f" {outcome.message}" if outcome.message else ""
        return f"signal {outcome.caller_signal or 15}{text}"
    return f"fail {outcome.message or outcome.reason or 'the job could not run'}"


# ---------------------------------------------------------------- after the request

@dataclass
class Done:
    """"done": the tool the client ran has ended."""
    status: int            # the raw wait status
    cpu_seconds: float     # user + system of the tool and its reaped children
    max_rss: int           # bytes


class ControlReader:
    """The client's lines after the request.

    read() does one recv and returns the messages it completed: an int N for
    "sig N", ("pid", N), ("nostart", ERRNO), a Done, a ProcessState for "state", or
    ("badstate", why) for a state line that does not parse; on a non-blocking (or
    timed-out) socket with nothing to read it returns []. `eof` becomes True when
    the client has gone (closed, reset, killed). Unknown or malformed lines are
    ignored; so is an endless line.
    """
    MAX_LINE = 4096          # a state line: 16 rlimits of up to 46 bytes, and 3 short fields

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.eof = False
        self._partial = b""

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list:
        if self.eof:
            return []
        try:
            data = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return []
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return []
        return self.feed(data)

    def feed(self, data: bytes) -> list:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.MAX_LINE:
            self._partial = b""
        return [m for m in map(_client_message, lines) if m is not None]

    def __iter__(self):
        """Blocking: yield each forwarded signal until the client goes away."""
        while not self.eof:
            yield from (m for m in self.read() if isinstance(m, int))


def _client_message(line):
    if line.startswith(b"state "):
        try:
            return parse_state(line[6:])
        except ProtocolError as e:
            return "badstate", str(e)
    m = _CLIENT_LINE.fullmatch(line)
    if not m:
        return None
    if m[1] == b"sig":
        return int(m[2]) if 1 <= int(m[2]) < 65 else None
    if m[1]:
        return m[1].decode(), int(m[2])
    status = int(m[3])
    return Done(status & 0xFFFFFFFF, (int(m[4]) + int(m[5])) / 1e6, int(m[6]) * 1024)
