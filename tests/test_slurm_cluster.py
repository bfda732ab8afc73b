"""The Slurm test cluster (scripts/slurm-cluster.sh, of the instance SLURM_CONF names)
behaves as the Slurm backend expects, whatever its number of nodes; its nodes
themselves: tests/test_slurm_cluster_nodes.py.

Skipped when Slurm is not installed, except on CI (CI=true) where that is a failure.
Every command runs with a timeout so a broken cluster fails the test instead of hanging it.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import need, poll

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm-cluster.sh"
IS_ROOT = os.geteuid() == 0


def run(args, timeout=60, **kwargs):
    """Run a command, capture text output; a timeout is a test failure, not a hang."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{args} did not finish within {timeout}s (stdout={exc.stdout!r} stderr={exc.stderr!r})")


def cluster(cmd, timeout=120):
    return run(["bash", str(SCRIPT), cmd], timeout=timeout)


def srun(*args, timeout=60):
    return run(["srun", *args], timeout=timeout)


def config_value(key):
    out = run(["scontrol", "show", "config"], timeout=20).stdout
    return re.search(rf"^{key}\s*=\s*(\S+)", out, re.M).group(1)


def job_fields(job_id):
    """`scontrol show job` of a job as a dict (empty once the job has been purged)."""
    proc = run(["scontrol", "-o", "show", "job", str(job_id)], timeout=20)
    if proc.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


@pytest.fixture(scope="module")
def slurm():
    """Bring the cluster up (idempotent; installs packages on a fresh root machine)."""
    need("sinfo")
    need("srun")
    if IS_ROOT:
        proc = cluster("up", timeout=900)
        assert proc.returncode == 0, f"slurm-cluster.sh up failed:\n{proc.stdout}\n{proc.stderr}"
        assert proc.stdout.startswith("slurm cluster up: "), proc.stdout
    else:
        proc = cluster("status", timeout=30)
        if proc.returncode != 0:
            if os.environ.get("CI") == "true":
                pytest.fail(f"Slurm cluster is not up and we are not root to start it:\n{proc.stdout}")
            pytest.skip("Slurm cluster is not up and we are not root to start it")
    return proc.stdout


def test_cluster_is_up(slurm):
    proc = cluster("status", timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    nodes = cluster("nodes", timeout=30).stdout.split()
    assert nodes and all(f"node {n}: " in proc.stdout for n in nodes)
    rows = run(["sinfo", "-h", "-o", "%P %D"], timeout=20).stdout.split("\n")
    parts = {}
    for part, count in (r.split() for r in rows if r.strip()):    # a line per state
        parts[part] = parts.get(part, 0) + int(count)
    # debug (the default) and short have every node, solo the first one only
    assert parts == {"debug*": len(nodes), "short": len(nodes), "solo": 1}, rows
    # each node has the machine's hardware (RealMemory a bit below)
    shown = run(["scontrol", "-o", "show", "node"], timeout=20).stdout.splitlines()
    assert len(shown) == len(nodes)
    assert all(f"CPUTot={os.cpu_count()} " in line for line in shown), shown


def test_srun_streams_stdout_and_stderr_separately(slurm):
    proc = srun("sh", "-c", "echo to-out; echo to-err >&2; echo more-out")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "to-out\nmore-out\n"
    assert "to-err" in proc.stderr
    assert "to-out" not in proc.stderr


def test_srun_forwards_stdin(slurm):
    proc = run(["srun", "cat"], input="line one\nline two\n", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "line one\nline two\n"


def test_srun_returns_exit_code(slurm):
    assert srun("true").returncode == 0
    proc = srun("sh", "-c", "exit 3")
    assert proc.returncode == 3, proc.stderr


def test_final_state_in_scontrol_and_jobcomp(slurm):
    name = f"arvwrap-test-final-{os.getpid()}-{int(time.time())}"  # job ids restart if state is wiped
    proc = srun("-J", name, "sh", "-c", "echo $SLURM_JOB_ID; exit 3")
    assert proc.returncode == 3
    job_id = proc.stdout.strip()
    assert job_id.isdigit(), proc.stdout
    def ended():      # COMPLETING for a moment after srun's exit
        fields = job_fields(job_id)
        return fields if fields.get("JobState") != "COMPLETING" else None
    fields = poll(ended, 10) or job_fields(job_id)     # kept MinJobAge=300 s after the end
    assert fields.get("JobState") == "FAILED", fields
    assert fields.get("ExitCode") == "3:0", fields
    jobcomp_log = Path(config_value("JobCompLoc"))
    deadline = time.monotonic() + 10
    line = ""
    while time.monotonic() < deadline:
        if jobcomp_log.exists():
            line = next((x for x in jobcomp_log.read_text().splitlines()
                         if f"JobId={job_id} " in x and f"Name={name} " in x), "")
            if line:
                break
        time.sleep(0.2)
    assert "JobState=FAILED" in line, line or f"JobId={job_id} not in {jobcomp_log}"


def test_default_memory_per_cpu(slurm):
    """Without --mem a job gets DefMemPerCPU, not the whole node's memory."""
    proc = srun("sh", "-c", "echo $SLURM_JOB_ID")
    assert proc.returncode == 0, proc.stderr
    fields = job_fields(proc.stdout.strip())
    assert fields.get("MinMemoryCPU") == "512M", fields


def test_queued_job_starts_when_the_node_frees(slurm):
    """SchedulerParameters=batch_sched_delay=0,sched_min_interval=0: no seconds of delay.
    (On the one-node partition: elsewhere the second job would start on another node.)"""
    cpus = str(os.cpu_count())
    holder = subprocess.Popen(["srun", "-p", "solo", "-J", "arvwrap-test-holder", "-c", cpus,
                               "sleep", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if run(["squeue", "-h", "-n", "arvwrap-test-holder", "-t", "R"], timeout=20).stdout.strip():
                break
            time.sleep(0.05)
        else:
            pytest.fail("the node-filling job did not start")
        start = time.monotonic()
        proc = srun("-p", "solo", "-c", cpus, "true", timeout=60)
        elapsed = time.monotonic() - start
        assert proc.returncode == 0, proc.stderr
        assert "queued and waiting for resources" in proc.stderr
        assert elapsed < 4, f"queued job took {elapsed:.1f}s (the holder runs 2 s)"
    finally:
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


def test_impossible_request_is_refused_at_once(slurm):
    start = time.monotonic()
    proc = srun("-J", "arvwrap-test-impossible", "--cpus-per-task=64", "true", timeout=30)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "Unable to allocate resources" in proc.stderr, proc.stderr
    assert elapsed < 10, f"refusal took {elapsed:.1f}s"
    pending = run(["squeue", "-h", "-n", "arvwrap-test-impossible"], timeout=20).stdout
    assert pending.strip() == ""


def test_time_above_partition_max_is_refused(slurm):
    proc = srun("-p", "short", "-t", "10", "true", timeout=30)
    assert proc.returncode != 0
    assert "time limit" in proc.stderr.lower(), proc.stderr


def test_time_limit_kills_job(slurm):
    """-t 0:01 is rounded up to Slurm's unit, one minute, and slurmctld checks time limits
    every 30 s: the step is cancelled 60-91 s after start (measured 60 and 81 s here)."""
    start = time.monotonic()
    proc = srun("-p", "short", "-t", "0:01", "sleep", "100", timeout=150)
    elapsed = time.monotonic() - start
    assert proc.returncode == 128 + 15, (proc.returncode, proc.stderr)  # SIGTERM
    assert "TIME LIMIT" in proc.stderr, proc.stderr
    assert elapsed < 100, f"time limit took {elapsed:.1f}s"


def test_memory_limit_kills_job(slurm):
    """JobAcctGatherParams=OverMemoryKill: a step above --mem is killed without cgroups."""
    code = (
        "import time\n"
        "chunks = [bytearray(b'x' * (10 << 20)) for _ in range(30)]\n"  # 300 MB, touched
        "print('allocated', flush=True)\n"
        "time.sleep(20)\n"
        "print('survived', flush=True)\n"
    )
    start = time.monotonic()
    proc = srun("--mem=50M", sys.executable, "-S", "-c", code, timeout=90)
    elapsed = time.monotonic() - start
    assert "survived" not in proc.stdout
    assert proc.returncode == 128 + 9, (proc.returncode, proc.stderr)  # SIGKILL
    assert "memory limit" in proc.stderr.lower(), proc.stderr
    assert elapsed < 15, f"memory limit took {elapsed:.1f}s"


def started_step(name, script):
    """srun of a task running script (sh), once it has printed its first line."""
    proc = subprocess.Popen(["srun", "-J", name, "sh", "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    job_id = run(["squeue", "-h", "-n", name, "-o", "%i"], timeout=20).stdout.strip()
    assert job_id.isdigit()
    return proc, job_id


# The Slurm backend's relay runs the tool as its child, and relies on these two.

def test_a_signal_to_a_step_reaches_the_tasks_children_too(slurm):
    """So the relay does not pass on what slurmstepd sends: the tool has it already."""
    name = f"arvwrap-test-signal-{os.getpid()}"
    # both traps are set before "ready" (the child's own, once its sh runs)
    child = "trap 'echo child got it; exit 0' USR1; echo ready; while :; do sleep 0.1; done"
    proc, job_id = started_step(name, f"trap 'echo task got it' USR1; sh -c \"{child}\" & "
                                      "wait; wait")
    assert run(["scancel", "--signal=USR1", job_id], timeout=20).returncode == 0
    out, _ = proc.communicate(timeout=30)
    assert sorted(out.splitlines()) == ["child got it", "task got it"]


def test_cancelling_a_step_kills_the_tasks_children_too(slurm):
    """SIGTERM to every process of the step, then SIGKILL after KillWait (5 s) to those
    still there: proctrack/linuxproc follows the task's descendants. (Only those: a
    child whose parent died first is out of its reach, which is why the relay never
    dies before the tool.)"""
    name = f"arvwrap-test-tree-{os.getpid()}"
    proc, job_id = started_step(name, "trap '' TERM; sh -c 'exec sleep 4250' & echo ready; wait")
    assert run(["scancel", job_id], timeout=20).returncode == 0
    proc.communicate(timeout=30)
    assert not run(["pgrep", "-f", "^sleep 4250$"], timeout=10).stdout


@pytest.mark.skipif(not IS_ROOT, reason="stopping slurmctld needs root")
def test_controller_stop_and_start(slurm):
    try:
        proc = cluster("stop-controller", timeout=60)
        assert proc.returncode == 0, proc.stderr
        ping = run(["scontrol", "ping"], timeout=30)
        assert "DOWN" in ping.stdout, ping.stdout
        assert cluster("status", timeout=60).returncode == 1
        # a client gives up after ~9 s of connection retries, exit 1
        start = time.monotonic()
        proc = srun("true", timeout=60)
        assert proc.returncode == 1
        assert "Unable to contact slurm controller" in proc.stderr, proc.stderr
        assert time.monotonic() - start < 30
    finally:
        proc = cluster("start-controller", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert cluster("status", timeout=30).returncode == 0
    assert srun("sh", "-c", "exit 4").returncode == 4
