"""The local backend on its own: real processes, real pipes, no dispatcher."""
import os
import shutil
import signal
import subprocess
import threading
import time


from arvwrap import store
from arvwrap.backends import local
from arvwrap.jobspec import Job


def make_job(argv, stdin=None, stdout=None, stderr=None, stdin_mode="auto", **fields):
    """A Job whose descriptors are duplicates of the given ones (the backend owns them)."""
    fds = {n: os.dup(fd) for n, fd in ((0, stdin), (1, stdout), (2, stderr)) if fd is not None}
    argv = [os.fsencode(a) for a in argv]
    return Job(id=store.new_id(), run=None, parent=None, argv=argv,
               path=os.fsencode(shutil.which(os.fsdecode(argv[0]))), cwd=os.getcwdb(),
               env={b"PATH": os.environb[b"PATH"]}, fds=fds, stdin=stdin_mode, **fields)


class Runner:
    """Runs a job in a thread and remembers when it started and how it ended."""

    def __init__(self, backend, job):
        self.job, self.started_at, self.outcome = job, None, None
        self.thread = threading.Thread(target=self._run, args=(backend,))
        self.thread.start()

    def _run(self, backend):
        def started(_backend_id):
            self.started_at = time.monotonic()
        try:
            self.outcome = backend.run(self.job, started)
        finally:
            self.job.close()

    def wait(self, timeout=30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "job did not finish"
        return self.outcome


def test_output_goes_straight_to_the_callers_descriptor(tmp_path):
    backend = local.Backend({"cpus": 2})
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    outcome = Runner(backend, make_job(["sh", "-c", "echo hi; exit 7"], stdout=out)).wait()
    os.close(out)
    assert (outcome.state, outcome.exit_status) == ("exited", 7)
    assert (tmp_path / "out").read_text() == "hi\n"


def test_fractional_cpus_share_one_core():
    backend = local.Backend({"cpus": 1})
    runners = [Runner(backend, make_job(["sleep", "0.5"], cpus=0.25)) for _ in range(4)]
    start = time.monotonic()
    for r in runners:
        r.wait()
    assert time.monotonic() - start < 1.4   # all four at once, not one after another


def test_a_two_cpu_job_waits_until_two_are_free():
    backend = local.Backend({"cpus": 2})
    first = Runner(backend, make_job(["sleep", "0.6"], cpus=1))
    time.sleep(0.1)
    big = Runner(backend, make_job(["true"], cpus=2))
    first.wait(), big.wait()
    assert big.started_at - first.started_at >= 0.5


def test_jobs_joined_by_a_pipe_run_together_over_budget():
    """bwa | samtools on 2 CPUs, each asking for 2, with more than a pipe buffer between."""
    backend = local.Backend({"cpus": 2})
    r, w = os.pipe()
    sink = os.open(os.devnull, os.O_WRONLY)
    writer = Runner(backend, make_job(["head", "-c", "1000000", "/dev/zero"], stdout=w, cpus=2))
    time.sleep(0.1)
    reader = Runner(backend, make_job(["wc", "-c"], stdin=r, stdout=sink, cpus=2))
    os.close(w), os.close(r), os.close(sink)
    assert writer.wait(10).exit_status == 0
    assert reader.wait(10).exit_status == 0


def test_oversize_is_clamped_or_refused():
    backend = local.Backend({"cpus": 2})
    job = make_job(["true"], cpus=8)
    assert Runner(backend, job).wait().state == "exited"
    assert job.cpus == 2 and "clamped" in job.notes[0]
    refused = Runner(backend, make_job(["true"], cpus=8, on_oversize="refuse")).wait()
    assert refused.state == "failed" and "on_oversize: refuse" in refused.message


def test_cancel_while_queued_and_while_running():
    backend = local.Backend({"cpus": 1})
    running = Runner(backend, make_job(["sleep", "30"], cpus=1))
    time.sleep(0.2)
    queued = Runner(backend, make_job(["true"], cpus=1))
    time.sleep(0.1)
    queued.job.cancel("test")
    assert queued.wait(5).state == "cancelled"
    running.job.cancel("test")
    outcome = running.wait(10)
    assert (outcome.state, outcome.caller_signal) == ("cancelled", signal.SIGTERM)


def test_forwarded_signal_reaches_the_job_and_its_children():
    backend = local.Backend({"cpus": 1})
    runner = Runner(backend, make_job(["sh", "-c", "sleep 30 & wait"]))
    time.sleep(0.3)
    runner.job.signal(signal.SIGINT)
    outcome = runner.wait(10)
    assert outcome.state == "signaled" and outcome.signal == signal.SIGINT


def test_time_limit_kills_with_a_reason():
    backend = local.Backend({"cpus": 1})
    outcome = Runner(backend, make_job(["sleep", "30"], time_limit=1)).wait(15)
    assert outcome.state == "signaled" and outcome.signal == signal.SIGTERM
    assert "time limit" in outcome.message


def test_missing_stdout_stays_closed(tmp_path):
    backend = local.Backend({"cpus": 1})
    err = os.open(tmp_path / "err", os.O_WRONLY | os.O_CREAT, 0o600)
    outcome = Runner(backend, make_job(["sh", "-c", "echo x || echo closed >&2"], stderr=err)).wait()
    os.close(err)
    assert outcome.exit_status == 0
    assert "closed" in (tmp_path / "err").read_text() or "Bad file" in (tmp_path / "err").read_text()


def test_jobs_joined_through_a_local_filter_run_together_over_budget():
    """gzip -dc | tr | sort: the filter between two jobs must not hide the pipe."""
    backend = local.Backend({"cpus": 2})
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    sink = os.open(os.devnull, os.O_WRONLY)
    writer = Runner(backend, make_job(["head", "-c", "1000000", "/dev/zero"], stdout=a_w, cpus=1))
    time.sleep(0.1)
    middle = subprocess.Popen(["tr", "\\0", "x"], stdin=a_r, stdout=b_w)
    reader = Runner(backend, make_job(["wc", "-c"], stdin=b_r, stdout=sink, cpus=2))
    for fd in (a_r, a_w, b_r, b_w, sink):
        os.close(fd)
    assert writer.wait(10).exit_status == 0
    assert reader.wait(10).exit_status == 0
    assert middle.wait(10) == 0


def test_a_queued_job_fed_by_a_local_process_still_waits():
    """`cat list | while read f; do tool; done`: no running job upstream, so no overcommit."""
    backend = local.Backend({"cpus": 1})
    hog = Runner(backend, make_job(["sleep", "1"], cpus=1))
    time.sleep(0.1)
    r, w = os.pipe()
    feeder = subprocess.Popen(["cat", "/etc/passwd"], stdout=w)
    waiting = Runner(backend, make_job(["true"], stdin=r, cpus=1))
    os.close(r), os.close(w)
    hog.wait(), waiting.wait()
    feeder.wait()
    assert waiting.started_at - hog.started_at >= 0.8


def test_stdin_none_gives_the_job_dev_null_and_leaves_the_callers_input(tmp_path):
    backend = local.Backend({"cpus": 1})
    r, w = os.pipe()
    os.write(w, b"for the caller\n")
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    outcome = Runner(backend, make_job(["cat"], stdin=r, stdout=out, stdin_mode="none")).wait()
    os.close(out), os.close(w)
    assert outcome.exit_status == 0 and (tmp_path / "out").read_bytes() == b""
    assert os.read(r, 100) == b"for the caller\n"


def test_ctrl_c_while_queued_ends_the_call_as_the_signal_would():
    backend = local.Backend({"cpus": 1})
    hog = Runner(backend, make_job(["sleep", "30"], cpus=1))
    time.sleep(0.2)
    queued = Runner(backend, make_job(["true"], cpus=1))
    time.sleep(0.1)
    queued.job.signal(signal.SIGINT)
    outcome = queued.wait(5)
    assert (outcome.state, outcome.caller_signal, outcome.message) == (
        "cancelled", signal.SIGINT, None)
    hog.job.cancel("test")
    hog.wait(10)
