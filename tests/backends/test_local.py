"""The local backend on its own: its scheduler, its outcomes and its signalling, with
real pipes and real processes (no dispatcher, no mocks)."""
import contextlib
import os
import shutil
import signal
import subprocess

import pytest

from arvwrap import store
from arvwrap.backends import local
from arvwrap.jobspec import Job

from conftest import until, alive as running

GIB = 1 << 30


def make_job(argv=("true",), stdin=None, stdout=None, stderr=None, stdin_mode="auto",
             **fields):
    """A Job whose descriptors are duplicates of the given ones (the Job owns them)."""
    fds = {n: os.dup(fd) for n, fd in ((0, stdin), (1, stdout), (2, stderr)) if fd is not None}
    argv = [os.fsencode(a) for a in argv]
    return Job(id=store.new_id(), run=None, parent=None, argv=argv,
               path=os.fsencode(shutil.which(os.fsdecode(argv[0]))), cwd=os.getcwdb(),
               env={b"PATH": os.environb[b"PATH"]}, fds=fds, stdin=stdin_mode, **fields)


@pytest.fixture
def claim():
    """claim(cpus=..., stdin=fd, stdout=fd, ...): a Claim on a fresh Job, closed after."""
    made = []

    def make(**fields):
        job = make_job(**fields)
        made.append(job)
        return local.Claim(job)
    yield make
    for job in made:
        job.close()


@pytest.fixture
def pipe():
    """pipe(): (read end, write end) of a real pipe, both closed after the test."""
    made = []

    def make():
        ends = os.pipe()
        made.extend(ends)
        return ends
    yield make
    for fd in made:
        with contextlib.suppress(OSError):
            os.close(fd)


# -- admission ------------------------------------------------------------------

def test_four_quarter_cpu_claims_share_one_core(claim):
    s = local.Scheduler(1, GIB)
    assert all(s.submit(claim(cpus=0.25)) for _ in range(4))
    assert not s.submit(claim(cpus=0.25))      # the core is full


def test_a_two_cpu_claim_waits_until_two_are_free(claim):
    s = local.Scheduler(2, GIB)
    first = claim(cpus=1)
    big = claim(cpus=2)
    assert s.submit(first)
    assert not s.submit(big)
    assert s.release(first) == [big]
    assert big in s.running and not s.queue


def test_memory_counts_like_cpus(claim):
    s = local.Scheduler(4, GIB)
    first = claim(cpus=1, memory=GIB // 2 + 1)
    second = claim(cpus=1, memory=GIB // 2)
    assert s.submit(first)
    assert not s.submit(second)
    assert s.release(first) == [second]


def test_first_come_first_served_a_small_claim_waits_behind_a_big_queued_one(claim):
    s = local.Scheduler(2, GIB)
    hog, big, small = claim(cpus=1), claim(cpus=2), claim(cpus=1)
    assert s.submit(hog)
    assert not s.submit(big)
    assert not s.submit(small)        # it would fit, but big came first
    assert s.release(hog) == [big]
    assert s.release(big) == [small]


def test_withdraw_removes_a_queued_claim_and_release_admits_the_next(claim):
    s = local.Scheduler(1, GIB)
    hog, gone, nxt = claim(cpus=1), claim(cpus=1), claim(cpus=1)
    assert s.submit(hog)
    assert not s.submit(gone) and not s.submit(nxt)
    s.withdraw(gone)
    assert list(s.queue) == [nxt]
    assert s.release(hog) == [nxt]
    assert s.used_cpus == nxt.cpus


# -- pipes ---------------------------------------------------------------------

def test_a_reader_submitted_while_its_writer_runs_starts_at_once_over_budget(claim, pipe):
    """bwa -t 2 | samtools -@ 2 on 2 CPUs: the writer runs, the reader joins it."""
    r, w = pipe()
    s = local.Scheduler(2, GIB)
    writer = claim(cpus=2, stdout=w)
    reader = claim(cpus=2, stdin=r)
    assert writer.pipes and reader.pipes
    assert s.submit(writer)
    assert s.submit(reader)
    assert s.running == {writer, reader} and s.used_cpus == 4 * local.MILLI


def test_a_queued_reader_and_its_writer_are_admitted_together_over_budget(claim, pipe):
    """The reader came first and waits; once its writer is admitted, so is the reader."""
    r, w = pipe()
    s = local.Scheduler(2, GIB)
    hog = claim(cpus=2)
    reader = claim(cpus=2, stdin=r)
    writer = claim(cpus=2, stdout=w)
    assert s.submit(hog)
    assert not s.submit(reader)
    assert not s.submit(writer)
    assert set(s.release(hog)) == {reader, writer}
    assert s.used_cpus == 4 * local.MILLI and not s.queue


def test_a_queued_writer_joins_its_running_reader(claim, pipe):
    r, w = pipe()
    s = local.Scheduler(2, GIB)
    reader = claim(cpus=2, stdin=r)
    writer = claim(cpus=2, stdout=w)
    assert s.submit(reader)
    assert s.submit(writer)


def test_claims_joined_through_a_local_filter_are_admitted_by_recheck(claim, pipe):
    """gzip -dc | tr | sort: the filter between two jobs must not hide the pipe."""
    a_r, a_w = pipe()
    b_r, b_w = pipe()
    s = local.Scheduler(2, GIB)
    writer = claim(cpus=2, stdout=a_w)
    reader = claim(cpus=2, stdin=b_r)
    middle = subprocess.Popen(["tr", "a", "b"], stdin=a_r, stdout=b_w)
    try:
        assert s.submit(writer)
        assert not s.submit(reader)       # not directly joined
        assert s.needs_recheck()
        assert s.recheck() == [reader]
        assert reader in s.running and not s.needs_recheck()
    finally:
        middle.kill()
        middle.wait()


def test_a_queued_claim_fed_by_a_local_process_with_no_job_upstream_still_waits(claim, pipe):
    """cat list | while read f; do tool; done: no running job upstream, no overcommit."""
    r, w = pipe()
    s = local.Scheduler(1, GIB)
    hog = claim(cpus=1)
    waiting = claim(cpus=1, stdin=r)
    feeder = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=w)
    try:
        assert s.submit(hog)
        assert not s.submit(waiting)
        assert s.needs_recheck()
        assert s.recheck() == []
        assert list(s.queue) == [waiting]
        assert s.release(hog) == [waiting]
    finally:
        feeder.stdin.close()
        feeder.wait(10)


def test_recheck_is_not_needed_without_a_running_claim_or_a_queued_pipe(claim, pipe):
    r, _ = pipe()
    s = local.Scheduler(1, GIB)
    assert not s.needs_recheck()
    hog = claim(cpus=1)
    s.submit(hog)
    s.submit(claim(cpus=1))                # queued, but no pipe to follow
    assert not s.needs_recheck()
    s.submit(claim(cpus=1, stdin=r))
    assert s.needs_recheck()


# -- oversize ------------------------------------------------------------------

def test_an_oversize_request_is_clamped_with_a_note():
    backend = local.Backend({"cpus": 2, "memory": GIB})
    job = make_job(cpus=8, memory=4 * GIB)
    try:
        assert backend.fit(job) is None
        assert (job.cpus, job.memory) == (2, GIB)
        assert len(job.notes) == 2 and all("clamped" in n for n in job.notes)
        assert "8 CPUs" in job.notes[0]
    finally:
        job.close()


def test_an_oversize_request_is_refused_with_on_oversize_refuse():
    backend = local.Backend({"cpus": 2, "memory": GIB})
    job = make_job(cpus=8, on_oversize="refuse")
    try:
        refused = backend.fit(job)
        assert refused.state == "failed" and refused.reason == "oversize"
        assert "8 CPUs" in refused.message and "on_oversize: refuse" in refused.message
        assert job.cpus == 8 and not job.notes
    finally:
        job.close()


def test_a_request_that_fits_is_left_alone():
    backend = local.Backend({"cpus": 2, "memory": GIB})
    job = make_job(cpus=2, memory=GIB)
    try:
        assert backend.fit(job) is None
        assert (job.cpus, job.memory, job.notes) == (2, GIB, [])
    finally:
        job.close()


# -- outcomes ------------------------------------------------------------------

@pytest.fixture
def job():
    made = make_job(["sleep", "1"])
    yield made
    made.close()


def test_outcome_of_an_exit_code(job):
    for code in (0, 3, 255):
        outcome = local.outcome_of(code, job, None)
        assert (outcome.state, outcome.exit_status, outcome.signal) == ("exited", code, None)
        assert outcome.message is None and outcome.reason is None


def test_outcome_of_a_signal(job):
    outcome = local.outcome_of(-signal.SIGSEGV, job, None)
    assert (outcome.state, outcome.signal, outcome.exit_status) == (
        "signaled", signal.SIGSEGV, None)
    assert outcome.message is None


def test_outcome_of_a_time_limit_kill_says_why(job):
    why = "sleep exceeded its time limit of 1s"
    outcome = local.outcome_of(-signal.SIGTERM, job, why)
    assert (outcome.state, outcome.signal) == ("signaled", signal.SIGTERM)
    assert outcome.reason == why and outcome.message == why
    handled = local.outcome_of(1, job, why)        # a tool that caught SIGTERM and exited 1
    assert (handled.state, handled.exit_status, handled.message) == ("exited", 1, why)


def test_outcome_of_a_cancel_is_cancelled_and_the_caller_dies_of_the_signal(job):
    job.cancel("cancelled by arv-wrap cancel")
    outcome = local.outcome_of(-signal.SIGTERM, job, job.cancel_reason)
    assert (outcome.state, outcome.caller_signal) == ("cancelled", signal.SIGTERM)
    assert outcome.reason == "cancelled by arv-wrap cancel"
    assert job.id in outcome.message and "(sleep)" in outcome.message
    killed = local.outcome_of(-signal.SIGKILL, job, job.cancel_reason)   # after the grace
    assert (killed.state, killed.caller_signal) == ("cancelled", signal.SIGKILL)
    ignored = local.outcome_of(0, job, job.cancel_reason)   # caught SIGTERM, exited 0
    assert (ignored.state, ignored.caller_signal) == ("cancelled", signal.SIGTERM)


def test_a_callers_signal_while_queued_ends_it_silently_as_that_signal(job):
    outcome = local.cancelled_while_queued(job, signal.SIGINT)
    assert (outcome.state, outcome.caller_signal, outcome.message) == (
        "cancelled", signal.SIGINT, None)
    assert "signal 2" in outcome.reason


def test_arv_wraps_own_cancel_while_queued_ends_it_with_sigterm_and_says_why(job):
    job.cancel("cancelled by arv-wrap cancel")
    for signum in (None, signal.SIGINT):      # arv-wrap's cancel wins over a later signal
        outcome = local.cancelled_while_queued(job, signum)
        assert (outcome.state, outcome.caller_signal) == ("cancelled", signal.SIGTERM)
        assert outcome.reason == "cancelled by arv-wrap cancel"
        assert "cancelled while queued: cancelled by arv-wrap cancel" in outcome.message
        assert job.id in outcome.message


# -- steering real processes -----------------------------------------------------

@pytest.fixture
def shell_with_two_children():
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    yield proc
    for pid in [*local.descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def two_sleeps_below(pid):
    until(lambda: [comm(k) for k in local.descendants(pid)] == ["sleep", "sleep"],
          what="two sleeping children")
    return local.descendants(pid)


def test_descendants_finds_the_children_of_a_process(shell_with_two_children):
    kids = two_sleeps_below(shell_with_two_children.pid)
    assert len(set(kids)) == 2
    assert local.descendants(kids[0]) == []


def test_descendants_of_a_process_that_is_gone_is_empty():
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert local.descendants(proc.pid) == []


def test_signal_tree_kills_the_tool_and_its_children(shell_with_two_children):
    proc = shell_with_two_children
    kids = two_sleeps_below(proc.pid)
    pidfd = os.pidfd_open(proc.pid)
    try:
        local.signal_tree(pidfd, proc.pid, signal.SIGTERM)
    finally:
        os.close(pidfd)
    assert proc.wait(10) == -signal.SIGTERM
    until(lambda: not any(running(k) for k in kids), what="the children to end")


def test_signal_tree_on_a_tool_that_already_ended_does_nothing():
    proc = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(proc.pid)
    try:
        proc.wait()
        local.signal_tree(pidfd, proc.pid, signal.SIGTERM)   # no error, nothing signalled
    finally:
        os.close(pidfd)


def test_withdrawing_the_queued_head_admits_the_next_claim_that_now_fits(claim):
    """First come, first served while they fit: once the big head is gone (its caller's
    Ctrl-C), the small claim behind it fits beside the running one and starts at once,
    not when the running one ends. withdraw() returns what starts, as release() does."""
    s = local.Scheduler(2, GIB)
    running, big, small = claim(cpus=1), claim(cpus=2), claim(cpus=1)
    assert s.submit(running)
    assert not s.submit(big) and not s.submit(small)
    assert s.withdraw(big) == [small]
    assert s.running == {running, small} and not s.queue


# -- a pipeline lends what it holds to its tools ------------------------------------------

def test_a_pipeline_job_lends_its_cpus_to_one_tool_at_a_time(claim):
    """A 0.1-CPU driver waits for its 1-CPU tools on a 1-CPU budget: the first tool
    runs on the loan, the second waits for it, not for the driver."""
    s = local.Scheduler(1, 1 << 40)
    driver = claim(cpus=0.1)
    assert s.submit(driver)
    first, second = local.Claim(claim(cpus=1).job, lender=driver), None
    assert s.submit(first)
    assert s.used_cpus == 1000
    second = local.Claim(claim(cpus=1).job, lender=driver)
    assert not s.submit(second)
    assert s.release(first) == [second]
    assert s.release(second) == [] and s.used_cpus == 100


def test_a_tool_that_outlives_its_pipeline_keeps_what_it_borrowed(claim):
    s = local.Scheduler(1, 1 << 40)
    driver = claim(cpus=0.5)
    assert s.submit(driver)
    tool = local.Claim(claim(cpus=1).job, lender=driver)
    assert s.submit(tool)
    s.release(driver)
    assert s.used_cpus == 1000          # the tool's whole CPU, now its own
    s.release(tool)
    assert s.used_cpus == 0
