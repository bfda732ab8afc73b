"""arv-wrap -v: the follower prints one line per job start and end of its run,
for records that change under it."""
import io
import re
import threading
import time

from arvwrap import progress, store

from conftest import until as wait_for


class Stream(io.StringIO):
    def lines(self):
        return self.getvalue().splitlines()


def new_run(db):
    run = store.new_id()
    db.insert({"id": run, "run": run, "kind": "run", "argv": ["pipeline.sh"], "state": "running",
               "started": store.now()})
    return run


def new_job(db, run, argv, **fields):
    job = {"id": store.new_id(), "run": run, "parent": run, "kind": "job", "argv": argv,
           "backend": "local", "state": "queued", "cpus": 2, "memory": 8 << 30, **fields}
    db.insert(job)
    time.sleep(0.002)          # ids order by their millisecond
    return job["id"]


def test_start_and_end_lines_as_records_change(state_dir):
    db = store.Store(state_dir)
    run, other = new_run(db), new_run(db)
    out = Stream()
    follower = progress.Follower(state_dir, run, out, interval=0.05).start()
    try:
        job = new_job(db, run, ["/usr/bin/bwa", "mem", "-t", "2", "ref.fa", "r.fq"])
        new_job(db, other, ["other-run-tool"], state="running", backend_id="7",
                started=store.now())
        db.update(job, state="running", backend_id="12345", started="2026-12-01T09:01:50.000Z")
        wait_for(lambda: out.lines(), what="a start line")
        assert out.lines() == [f"arv-wrap: started {job} bwa mem -t 2 ref.fa r.fq "
                               "(local 12345, 2 CPUs, 8G)"]
        db.update(job, state="exited", exit_status=0, ended="2026-12-01T09:01:51.234Z",
                  cpu_seconds=2.1, max_rss=312 << 20)
        wait_for(lambda: len(out.lines()) == 2, what="an end line")
        assert out.lines()[1] == (f"arv-wrap: ended {job} bwa mem -t 2 ref.fa r.fq: "
                                  "exit 0 in 1.2s (cpu 2.1s, max rss 312M)")

        # killed by a signal; failed before it ever started (no start line, the reason)
        killed = new_job(db, run, ["sort", "big"], cpus=1, memory=None)
        db.update(killed, state="running", backend_id="777", started="2026-12-01T09:00:00.000Z")
        wait_for(lambda: len(out.lines()) == 3, what="a start line")
        db.update(killed, state="signaled", signal=9, ended="2026-12-01T09:03:12.000Z",
                  reason="killed: memory limit")
        refused = new_job(db, run, ["gzip", "x"], backend="slurm")
        db.update(refused, state="failed", ended=store.now(), reason="backend error: no sbatch")
        wait_for(lambda: len(out.lines()) == 5, what="two end lines")
    finally:
        follower.stop()
    lines = out.lines()
    assert lines[2] == f"arv-wrap: started {killed} sort big (local 777, 1 CPU)"
    assert f"arv-wrap: ended {killed} sort big: signal 9 (SIGKILL) in 3m12s: killed: memory limit" in lines
    assert f"arv-wrap: ended {refused} gzip x: failed: backend error: no sbatch" in lines
    assert not any("other-run-tool" in line for line in lines)
    assert len(lines) == 5 and len(set(lines)) == 5          # each said once


def test_stop_prints_the_last_lines(state_dir):
    db = store.Store(state_dir)
    run = new_run(db)
    out = Stream()
    follower = progress.Follower(state_dir, run, out, interval=3600).start()
    wait_for(lambda: follower.polls >= 1, what="a first poll")
    # a job that started and ended between two polls, and one still running at stop()
    quick = new_job(db, run, ["md5sum", "a\nb"], state="exited", exit_status=1,
                    backend_id="5", started="2026-12-01T09:00:00.000Z",
                    ended="2026-12-01T09:00:00.500Z")
    slow = new_job(db, run, ["sleep", "1"], state="running", backend_id="6",
                   started=store.now())
    timer = threading.Timer(0.3, lambda: db.update(slow, state="exited", exit_status=0,
                                                   ended=store.now()))
    timer.start()
    began = time.monotonic()
    follower.stop(timeout=10)
    took = time.monotonic() - began
    timer.join()
    lines = out.lines()
    assert lines[:2] == [f"arv-wrap: started {quick} md5sum 'a\\x0ab' (local 5, 2 CPUs, 8G)",
                         f"arv-wrap: ended {quick} md5sum 'a\\x0ab': exit 1 in 0.50s"]
    assert lines[2] == f"arv-wrap: started {slow} sleep 1 (local 6, 2 CPUs, 8G)"
    assert re.fullmatch(rf"arv-wrap: ended {slow} sleep 1: exit 0 in \d+\.\d+s", lines[3])
    assert len(lines) == 4
    assert took < 5                        # it waited for that end, not for its timeout
    assert not follower._thread.is_alive()


def test_stop_gives_up_on_a_job_that_never_ends(state_dir):
    db = store.Store(state_dir)
    run = new_run(db)
    new_job(db, run, ["hang"], state="running", backend_id="9", started=store.now())
    out = Stream()
    follower = progress.Follower(state_dir, run, out, interval=0.05).start()
    wait_for(lambda: out.lines(), what="a start line")
    began = time.monotonic()
    follower.stop(timeout=0.3)
    assert 0.25 < time.monotonic() - began < 3
    assert len(out.lines()) == 1


def test_a_closed_stream_or_a_missing_store_is_no_error(tmp_path, state_dir):
    db = store.Store(state_dir)
    run = new_run(db)
    out = Stream()
    out.close()
    follower = progress.Follower(state_dir, run, out, interval=0.05).start()
    new_job(db, run, ["x"], state="exited", exit_status=0, started=store.now(),
            ended=store.now())
    follower.stop()
    missing = progress.Follower(str(tmp_path / "none"), "RUN", Stream(), interval=0.05).start()
    missing.stop()
    assert not (tmp_path / "none").exists()
