"""One job: what to run, where, with which resources, and how it may be steered.

A Job is built by the dispatcher from a client's request and the matched rule, and
handed to one backend. The backend runs it to the end and returns an Outcome; the
dispatcher and the caller talk to it meanwhile only through signal() and cancel().
"""
import os
import threading
from dataclasses import dataclass, field
from typing import Optional

from arvwrap import redact, store

SHIM_NAME = b"libarvwrap.so"


@dataclass
class Outcome:
    state: str                    # one of store.FINAL_STATES
    exit_status: Optional[int] = None
    signal: Optional[int] = None
    reason: Optional[str] = None  # for the record
    message: Optional[str] = None  # the one `arv-wrap:` line for the caller, if any
    run_locally: bool = False     # the backend could not run it; the caller should
    use_local_backend: bool = False  # the backend cannot carry this call (e.g. a /dev/fd
                                     # argument): run it on the local backend instead
    caller_signal: Optional[int] = None  # a cancelled job: the signal the caller dies of
    usage: dict = field(default_factory=dict)  # what it used, as record fields
                                               # (cpu_seconds, max_rss), where measured


def job_environment(env, job_id, nested, rule):
    """The caller's environment as the job sees it.

    arv-wrap's own variables and its shim are removed unless the job is itself a
    pipeline (nested), whose tools must keep being redirected; ARV_WRAP_JOB names
    the job in every case (given job_id), so calls made under it record it as their
    parent.
    """
    if nested:
        out = dict(env)
    else:
        out = {name: value for name, value in env.items() if not name.startswith(b"ARV_WRAP_")}
        if b"LD_PRELOAD" in out:
            out[b"LD_PRELOAD"] = strip_shim(out[b"LD_PRELOAD"])
            if not out[b"LD_PRELOAD"]:
                del out[b"LD_PRELOAD"]
    if rule is not None:
        for name in rule.env_drop or ():
            out.pop(os.fsencode(name), None)
        for name, value in (rule.env_set or {}).items():
            out[os.fsencode(name)] = os.fsencode(value)
    if job_id is not None:
        out[b"ARV_WRAP_JOB"] = job_id.encode()
    return out


def strip_shim(preload):
    """LD_PRELOAD without arv-wrap's shim (entries are separated by ':' or spaces)."""
    entries = preload.replace(b" ", b":").split(b":")
    return b":".join(e for e in entries if e and os.path.basename(e) != SHIM_NAME)


@dataclass
class Job:
    id: str
    run: Optional[str]
    parent: Optional[str]
    argv: list                   # list[bytes], argv[0] included
    path: bytes                  # resolved executable
    cwd: bytes
    env: dict                    # bytes -> bytes, as the job must see it
    umask: int = 0o022
    rlimits: list = field(default_factory=list)   # (resource, soft, hard)
    # the caller's nice and signal state (None: its client did not say), for a
    # backend whose task does not inherit them; bitmasks have bit n-1 for signal n
    nice: Optional[int] = None
    ignored_signals: Optional[int] = None
    blocked_signals: Optional[int] = None
    fds: dict = field(default_factory=dict)       # caller fd number -> our fd
    cwd_fd: Optional[int] = None
    cpus: float = 1.0
    memory: Optional[int] = None
    time_limit: Optional[int] = None
    stdin: str = "auto"
    nested: bool = False
    backend: str = "local"
    on_backend_error: str = "fail"
    on_oversize: str = "clamp"
    rule: object = None
    options: dict = field(default_factory=dict)   # backend name -> its whitelist block
    notes: list = field(default_factory=list)
    reuse: bool = False          # its result may be reused, and kept (arvwrap.reuse_jobs)
    redactor: object = None      # arvwrap.redact.Redactor: its secrets kept out of records

    def __post_init__(self):
        if self.redactor is None:
            self.redactor = redact.Redactor(redact.patterns_from(self.env), self.env)
        self._lock = threading.Lock()
        self._signals = []
        self.cancel_reason = None
        self._wake_r = self._wake_w = None   # made on first use: a local job never needs it
        self.on_wake = None      # a backend may set this to be told at once
        self._closed = False

    @property
    def tool(self):
        return os.path.basename(os.fsdecode(self.argv[0] if self.argv else self.path))

    def record(self):
        """The initial job record."""
        return {"id": self.id, "run": self.run, "parent": self.parent, "kind": "job",
                "argv": self.redactor.argv(self.argv), "cwd": self.cwd, "backend": self.backend,
                "state": "queued", "cpus": self.cpus, "memory": self.memory,
                "time_limit": self.time_limit,
                "rule": self.rule and f"{self.rule.file}:{self.rule.line}",
                "reason": self.redactor.text("; ".join(self.notes) or None)}

    # -- steering, from any thread --
    def signal(self, signum):
        with self._lock:
            self._signals.append(signum)
        self._wake()

    def cancel(self, reason):
        with self._lock:
            if self.cancel_reason is None:
                self.cancel_reason = reason
        self._wake()

    def first_signal(self):
        """The first signal forwarded and not yet taken, or None."""
        with self._lock:
            return self._signals[0] if self._signals else None

    def take_signals(self):
        with self._lock:
            pending, self._signals = self._signals, []
        try:
            while self._wake_r is not None and os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        return pending

    @property
    def wake_fd(self):
        """Readable when signal() or cancel() was called (made on first use)."""
        with self._lock:
            if self._wake_r is None and not self._closed:
                self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                if self._signals or self.cancel_reason:
                    os.write(self._wake_w, b"!")
            return self._wake_r

    def _wake(self):
        with self._lock:
            if self._closed or self._wake_w is None:   # closed: its numbers may be others'
                pass
            else:
                try:
                    os.write(self._wake_w, b"!")
                except OSError:
                    pass
        if self.on_wake:
            self.on_wake()

    def close(self):
        with self._lock:
            self._closed = True
        for fd in (*self.fds.values(), self.cwd_fd, self._wake_r, self._wake_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fds = {}
        self.cwd_fd = None


def on_oversize(job, too_big, offerer):
    """The rule's on_oversize for a request larger than a backend offers.

    too_big lists (key, what was asked, what is offered) as text. Returns the
    refusal Outcome, or None after noting each clamp on the job (the backend then
    lowers the values it knows how to)."""
    if not too_big:
        return None
    if job.on_oversize == "refuse":
        what = " and ".join(need for _, need, _ in too_big)
        return Outcome("failed", reason="oversize",
                       message=f"{job.tool} asks for {what}, more than {offerer} offers "
                               f"(on_oversize: refuse)")
    for key, need, have in too_big:
        job.notes.append(f"{key} clamped from {need} to {have}, the most {offerer} offers")
    return None


def final_fields(outcome):
    """Record fields for an outcome."""
    return {"state": outcome.state, "exit_status": outcome.exit_status,
            "signal": outcome.signal, "ended": store.now()}
