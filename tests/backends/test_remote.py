"""The shared remote machinery (arvwrap.backends.remote) on its own, without a
cluster: the relay, the streams, the stdin spool, the throttle, the batched poller,
and the guard that keeps each of their threads from dying silently. Tests named
`fault_injecting` break a part on purpose to see the jobs it concerns failed."""
import errno
import os
import socket
import threading
import time
from types import SimpleNamespace


from arvwrap.backends.remote import guard
from arvwrap.backends.remote.poller import StatusPoller
from arvwrap.backends.remote.relay import Relay
from arvwrap.backends.remote.spool import Spool, plan_stdin
from arvwrap.backends.remote.streams import Stream
from arvwrap.backends.remote.throttle import Throttle
from conftest import until


class FakeJob:
    """What the machinery asks of a Job: its cancel reason, wake-ups, on_wake."""

    def __init__(self):
        self.cancel_reason = None
        self.on_wake = None
        self.woken = threading.Event()

    def _wake(self):
        self.woken.set()
        if self.on_wake:
            self.on_wake()


class Failures:
    """on_fail callbacks that remember what they were told."""

    def __init__(self):
        self.reasons = []

    def __call__(self, reason):
        self.reasons.append(reason)


def read_all(fd):
    out = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return out
        out += chunk


# -- guard ------------------------------------------------------------------------------

def test_guard_fault_injecting_body_is_restarted_then_given_up(monkeypatch, caplog):
    monkeypatch.setattr(guard, "RESTARTS", 2)
    crashed, gave_up, runs = Failures(), Failures(), []

    def body():
        runs.append(1)
        raise ValueError("injected")
    guard.run_guarded("the test thread", body, crashed, restart=True, on_give_up=gave_up)
    assert len(runs) == 3 and len(crashed.reasons) == 3
    assert gave_up.reasons == ["the test thread failed (ValueError: injected; "
                               "see dispatcher.log)"]
    assert "the test thread failed" in caplog.text


def test_guard_fault_injecting_body_that_recovers_keeps_running():
    crashed, gave_up, runs = Failures(), Failures(), []

    def body():
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("twice")
    guard.run_guarded("it", body, crashed, restart=True, on_give_up=gave_up)
    assert (len(runs), len(crashed.reasons), gave_up.reasons) == (3, 2, [])


def test_guard_without_restart_fails_once_and_a_failing_callback_is_only_logged():
    def boom(reason):
        raise KeyError(reason)
    guard.run_guarded("it", lambda: 1 / 0, on_crash=boom, on_give_up=boom)   # no raise


def test_a_job_failure_keeps_the_first_reason_and_wakes_the_job():
    job = FakeJob()
    failure = guard.JobFailure(job)
    failure("first")
    failure("second")
    assert failure.reason == "first" and job.woken.is_set()


# -- throttle ---------------------------------------------------------------------------

def test_the_throttle_keeps_the_limit_in_flight_and_lets_a_cancel_out():
    throttle = Throttle(rate=1000, limit=2)
    first, second, third = FakeJob(), FakeJob(), FakeJob()
    assert throttle.acquire(first) and throttle.acquire(second)
    got = []
    waiter = threading.Thread(target=lambda: got.append(throttle.acquire(third)))
    waiter.start()
    time.sleep(0.2)
    assert got == []                      # two in flight: the third waits
    throttle.release()
    waiter.join(5)
    assert got == [True]
    fourth = FakeJob()
    waiter = threading.Thread(target=lambda: got.append(throttle.acquire(fourth)))
    waiter.start()
    time.sleep(0.1)
    fourth.cancel_reason = "cancelled"
    fourth._wake()
    waiter.join(5)
    assert got == [True, False]


def test_the_throttle_spreads_submissions_at_its_rate():
    throttle = Throttle(rate=20, limit=100)
    start = time.monotonic()
    for _ in range(30):
        assert throttle.acquire(FakeJob())
    took = time.monotonic() - start
    assert 0.4 < took < 2.5, took       # a burst of 20, then 10 more at 20/s


# -- stdin spool ------------------------------------------------------------------------

def test_the_spool_drains_a_pipe_while_the_job_waits_and_feeds_it_all(tmp_path):
    r, w = os.pipe()
    data = os.urandom(300_000)
    spool = Spool(r, str(tmp_path))
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))
    writer.start()
    writer.join(5)          # the writer never waits for the (queued) reader
    assert not writer.is_alive()
    spool.job_running()
    assert read_all(spool.feed_r) == data
    spool.close()
    os.close(r)


def test_spool_fault_injecting_full_disk_fails_the_job(tmp_path, monkeypatch):
    failed = Failures()
    real = os.pwrite

    def full(fd, data, offset):
        if offset > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)
    monkeypatch.setattr(os, "pwrite", full)
    r, w = os.pipe()
    spool = Spool(r, str(tmp_path), "the stdin of job J", on_fail=failed)
    os.write(w, b"a" * 1000)
    until(lambda: spool.written, what="the first write")
    os.write(w, b"b" * 1000)
    until(lambda: failed.reasons, what="the failure")
    assert failed.reasons == ["the spooling of the stdin of job J failed (OSError: [Errno 28] "
                              "No space left on device; see dispatcher.log)"]
    spool.close()
    for fd in (r, w):
        os.close(fd)


def test_plan_stdin_reopens_a_file_at_the_callers_offset(tmp_path):
    path = tmp_path / "list"
    path.write_bytes(b"one\ntwo\n")
    fd = os.open(path, os.O_RDONLY)
    os.read(fd, 4)
    job = SimpleNamespace(fds={0: fd}, stdin="auto")
    again, spool_source = plan_stdin(job)
    assert spool_source is None and os.read(again, 100) == b"two\n"
    assert os.lseek(fd, 0, os.SEEK_CUR) == 4        # the caller's own offset stays
    r, w = os.pipe()
    assert plan_stdin(SimpleNamespace(fds={0: r}, stdin="auto")) == (None, r)
    assert plan_stdin(SimpleNamespace(fds={0: r}, stdin="none")) == (None, None)
    for n in (fd, again, r, w):
        os.close(n)


# -- relay and streams ------------------------------------------------------------------

def connect(relay, line):
    sock = socket.create_connection(("127.0.0.1", relay.port))
    sock.sendall(line)
    return sock


def test_the_relay_hands_each_stream_to_its_job_by_token():
    relay = Relay("127.0.0.1", "127.0.0.1")
    got = {}
    relay.expect(b"tok", lambda s: got.setdefault("out", s), lambda s: got.setdefault("err", s))
    stranger = connect(relay, b"onot-a-token\n")
    out, err = connect(relay, b"otok\nhello"), connect(relay, b"etok\n")
    until(lambda: len(got) == 2, what="both streams")
    assert got["out"].recv(100) == b"hello"
    assert out.recv(1) == err.recv(1) == b"+"      # each told it was taken
    assert stranger.recv(10) == b""                # dropped, unanswered
    for s in (stranger, out, err, *got.values()):
        s.close()


def test_relay_fault_injecting_handler_fails_only_its_job():
    relay = Relay("127.0.0.1", "127.0.0.1")
    failed, fine, got = Failures(), Failures(), []

    def broken(sock):
        raise RuntimeError("injected")
    relay.expect(b"bad", broken, broken, failed)
    relay.expect(b"good", got.append, got.append, fine)
    socks = [connect(relay, b"obad\n"), connect(relay, b"ogood\n")]
    until(lambda: failed.reasons and got, what="the handover")
    assert failed.reasons == ["its stream could not be taken (RuntimeError: injected)"]
    assert fine.reasons == []
    for s in socks + got:
        s.close()


class CrashingRelay(Relay):
    """A relay whose serving loop breaks on the first handshake (a fault injected)."""
    crashes = 1

    def _identify(self, line):
        if self.crashes:
            self.crashes -= 1
            raise RuntimeError("injected")
        return super()._identify(line)


def test_relay_fault_injecting_crash_fails_waiting_jobs_and_restarts():
    relay = CrashingRelay("127.0.0.1", "127.0.0.1", "the test relay")
    failed, got = Failures(), []
    relay.expect(b"one", got.append, got.append, failed)
    first = connect(relay, b"oone\n")
    until(lambda: failed.reasons, what="the waiting job failed")
    assert failed.reasons == ["the test relay failed (RuntimeError: injected; "
                              "see dispatcher.log)"]
    relay.expect(b"two", got.append, got.append)
    second = connect(relay, b"otwo\n")
    until(lambda: got, what="a stream through the restarted relay")
    for s in (first, second, *got):
        s.close()


def test_a_stream_copies_to_the_callers_descriptor_and_keeps_a_log(tmp_path):
    ours, theirs = socket.socketpair()
    r, w = os.pipe()
    log = tmp_path / "logs" / "job.stderr"
    stream = Stream(w, str(log))
    stream.attach(ours)
    theirs.sendall(b"live\x00bytes")
    theirs.close()
    stream.finish(5)
    os.close(w)
    assert read_all(r) == b"live\x00bytes" and log.read_bytes() == b"live\x00bytes"
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    os.close(r)


class FaultyStream(Stream):
    def _keep(self, data):
        raise MemoryError("injected")


def test_stream_fault_injecting_copy_fails_its_job():
    ours, theirs = socket.socketpair()
    r, w = os.pipe()
    failed = Failures()
    stream = FaultyStream(w, None, "the stdout of job J", on_fail=failed)
    stream.attach(ours)
    theirs.sendall(b"x")
    stream.finish(5)
    assert stream.done.is_set()
    assert failed.reasons == ["the copy of the stdout of job J failed (MemoryError: injected; "
                              "see dispatcher.log)"]
    theirs.close()
    for fd in (r, w):
        os.close(fd)


# -- the batched status poller ----------------------------------------------------------

class FakeScheduler:
    """query/cancel as a backend gives them, counting the calls; states by id."""

    def __init__(self):
        self.states = {}
        self.queries = 0
        self.cancelled = []
        self.broken = False

    def query(self, ids):
        self.queries += 1
        if self.broken:
            raise ValueError("injected")
        return {i: (state, f"name-{i}") for i, state in self.states.items()}

    def cancel(self, ids):
        self.cancelled.append(sorted(ids))
        for i in ids:
            self.states.pop(i, None)


class Watcher:
    def __init__(self):
        self.states = []
        self.failed = Failures()

    def seen(self, state):
        self.states.append(state)

    def fail(self, reason):
        self.failed(reason)


def test_one_query_per_round_for_every_job():
    scheduler = FakeScheduler()
    poller = StatusPoller("the poller", scheduler.query, scheduler.cancel, 0.1)
    watchers = {str(i): Watcher() for i in range(50)}
    scheduler.states = {i: "RUNNING" for i in watchers}
    for i, watcher in watchers.items():
        poller.watch(i, watcher)
    until(lambda: all(len(w.states) >= 3 for w in watchers.values()), what="three rounds")
    assert scheduler.queries <= 5
    poller.unwatch("7", watchers["7"], orphan=True, name="name-7")   # its srun is gone
    until(lambda: scheduler.cancelled, what="the cancel")
    assert scheduler.cancelled[0] == ["7"]


def test_an_orphan_is_cancelled_each_round_until_it_is_no_longer_listed():
    scheduler = FakeScheduler()
    scheduler.cancel = lambda ids: scheduler.cancelled.append(sorted(ids))   # it stays
    scheduler.states = {"9": "RUNNING"}
    poller = StatusPoller("the poller", scheduler.query, scheduler.cancel, 0.05)
    poller.cancel_later("9", "name-9")
    until(lambda: len(scheduler.cancelled) >= 2, what="two cancels")
    assert poller.cleaning()
    del scheduler.states["9"]               # now it is gone
    until(lambda: not poller.cleaning(), what="the orphan dropped")


def test_an_orphan_listed_under_another_name_is_not_cancelled():
    """A scheduler that lost its state may give the id to another job."""
    scheduler = FakeScheduler()
    scheduler.states = {"9": "RUNNING"}         # listed as name-9
    poller = StatusPoller("the poller", scheduler.query, scheduler.cancel, 0.05)
    poller.cancel_later("9", "arv-wrap:tool:J1")
    until(lambda: not poller.cleaning(), what="the orphan dropped")
    assert scheduler.cancelled == [] and scheduler.states == {"9": "RUNNING"}


def test_a_retried_action_runs_each_round_until_it_is_done():
    scheduler = FakeScheduler()
    poller = StatusPoller("the poller", scheduler.query, scheduler.cancel, 0.05)
    tries = []
    poller.retry(lambda: tries.append(1) or len(tries) >= 3)
    until(lambda: len(tries) == 3, what="three tries")
    time.sleep(0.3)
    assert len(tries) == 3


def test_poller_fault_injecting_watcher_is_failed_alone():
    scheduler = FakeScheduler()
    poller = StatusPoller("the slurm status poller", scheduler.query, scheduler.cancel, 0.05)
    good, bad = Watcher(), Watcher()
    bad.seen = lambda state: {}["injected"]
    poller.watch("1", good)
    poller.watch("2", bad)
    until(lambda: bad.failed.reasons and len(good.states) >= 2, what="two rounds")
    assert bad.failed.reasons[0] == ("the slurm status poller failed on it (KeyError: "
                                     "'injected'; see dispatcher.log)")
    assert good.failed.reasons == []


def test_poller_fault_injecting_query_restarts_then_fails_every_job(monkeypatch):
    monkeypatch.setattr(guard, "RESTARTS", 2)
    scheduler = FakeScheduler()
    scheduler.broken = True
    stopped = Failures()
    poller = StatusPoller("the slurm status poller", scheduler.query, scheduler.cancel, 0.05,
                          on_give_up=stopped)
    watcher = Watcher()
    poller.watch("1", watcher)
    until(lambda: stopped.reasons, what="the poller to give up")
    assert scheduler.queries == 3
    assert watcher.failed.reasons == stopped.reasons == [
        "the slurm status poller failed (ValueError: injected; see dispatcher.log)"]
    late = Watcher()
    poller.watch("2", late)                 # a stopped poller fails a new job at once
    assert late.failed.reasons == stopped.reasons
