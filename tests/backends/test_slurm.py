"""The Slurm backend, end to end on the real cluster of scripts/slurm-cluster.sh (one node
or several, each a network namespace of this machine; SLURM_CONF names the instance):
`arv-wrap -b slurm` through the shim, the client, the dispatcher and srun.

Skipped when Slurm is not installed, except on CI (CI=true) where that is a failure.
The cluster may be shared with other test runs: every squeue check filters on the
job names this backend gives (`arv-wrap:<tool>:<job id>`).
"""
import hashlib
import os
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arvwrap import paths
from conftest import (arv_wrap, job_records, jobs, need, poll as wait_for, slurm_relay, wrapped,
                      write_tool)

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts" / "slurm-cluster.sh"
IS_ROOT = os.geteuid() == 0
MIB = 1 << 20

PROBE = r"""
case "$1" in
    exit) exit "$2" ;;
    kill) kill -"$2" $$ ;;
    sleep) echo started; exec sleep "$2" ;;
    stubborn) trap '' TERM; echo started; exec sleep "$2" ;;
    fds) exec python3 -S -c "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))" ;;
    echo) echo "$2" ;;
    partial) printf partial; sleep 3; echo ;;
    streams) cat "$2"; cat "$3" >&2 ;;
    env) printf '%s\n' "cwd=$(pwd)" "umask=$(umask)" "nofile=$(ulimit -n)" "var=$PROBE_VAR" \
             "job=$ARV_WRAP_JOB" "slurm=$SLURM_JOB_ID" "shlvl=${SHLVL-unset}" ;;
    args) for a in "$@"; do printf '%s\0' "$a"; done ;;
    state) exec cat /proc/self/stat /proc/self/status ;;
    mem) exec python3 -S -c "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)" ;;
    burn) python3 -S -c "import time; t = time.process_time()
while time.process_time() - t < 0.5: pass" ;;
    touch100) python3 -S -c "b = bytearray(100 << 20); b[::4096] = b'x' * len(b[::4096])" ;;
    complain) cat "$2" >&2; echo not-in-the-log; exit 1 ;;
    drip) echo first >&2; sleep 3; echo second >&2 ;;
    count) n=0; trap 'n=$((n + 1))' "$2"; echo ready; while [ $n -lt 1 ]; do sleep 0.1; done
           sleep 1; echo "got $n" ;;
esac
"""

WHITELIST = """
tools:
  - name: probe
  - name: cat
  - name: head
"""


@pytest.fixture(scope="module")
def cluster():
    need("srun")
    if IS_ROOT:
        proc = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    elif subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True,
                        timeout=60).returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the Slurm cluster is not up and we are not root to start it")
        pytest.skip("the Slurm cluster is not up and we are not root to start it")


@pytest.fixture
def env(cluster, tools, base_env, whitelist_file, client):     # client: the relay, rebuilt if stale
    write_tool(tools, "probe", PROBE)
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(WHITELIST)
    base_env["ARV_WRAP_BACKEND"] = "slurm"
    return base_env


def add_rules(env, text):
    with open(env["ARV_WRAP_WHITELIST"], "a") as f:
        f.write(text)


def in_squeue(job_ids):
    """Lines of squeue for jobs named after any of these arv-wrap job ids."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %j"], capture_output=True, text=True,
                         timeout=30).stdout
    return [line for line in out.splitlines() if any(j in line for j in job_ids)]


def running_job(env):
    def find():
        return [r for r in job_records(env) if r["state"] == "running"]
    found = wait_for(find, 20)
    assert found, "the job never ran"
    return found[0]


def cluster_cmd(cmd, timeout=120):
    return subprocess.run(["bash", str(CLUSTER), cmd], capture_output=True, text=True,
                          timeout=timeout)


# -- exit statuses and streams ------------------------------------------------------

def test_exit_statuses_are_exact_and_the_slurm_id_is_the_backend_id(env):
    for status in (0, 1, 42, 255):
        result = wrapped(env, f"probe exit {status}")
        assert result.returncode == status
        assert result.stdout == result.stderr == b""
    records = job_records(env)
    assert sorted(r["exit_status"] for r in records) == [0, 1, 42, 255]
    assert all(r["backend"] == "slurm" and r["backend_id"].isdigit() for r in records)
    table = arv_wrap("jobs", "--tree", env=env, stdout=subprocess.PIPE, check=True).stdout.decode()
    assert all(r["backend_id"] in table for r in records)


def test_a_signal_death_is_the_callers_death(env):
    script = "probe kill TERM; echo status=$?"
    result = wrapped(env, script)
    direct = subprocess.run(["bash", "-c", script], env=env, capture_output=True)
    assert result.stdout == direct.stdout == b"status=143\n"
    assert result.stderr == direct.stderr       # bash's own "Terminated", nothing of Slurm's
    [record] = job_records(env)
    assert (record["state"], record["signal"]) == ("signaled", 15)


def test_a_cwd_named_like_a_slurm_message_is_not_read_as_one(env, tmp_path):
    # srun -v echoes its --chdir among its options; only its own messages count
    work = tmp_path / "srun: error: exceeded memory limit"
    work.mkdir()
    result = wrapped(env, "probe kill KILL; echo status=$?", cwd=str(work))
    assert result.stdout == b"status=137\n"
    assert b"arv-wrap" not in result.stderr and b"memory" not in result.stderr


def test_binary_stdout_and_stderr_are_exact_and_separate(env, tmp_path):
    out, err = tmp_path / "out.bin", tmp_path / "err.bin"
    out.write_bytes(os.urandom(3 << 20) + b"no newline at the end")
    err.write_bytes(b"err line\n" + os.urandom(200_000))
    result = wrapped(env, f"probe streams '{out}' '{err}'; probe exit 1")
    assert result.returncode == 1
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(out.read_bytes()).digest()
    assert result.stderr == err.read_bytes()       # no srun: / slurmstepd: line at all


def test_a_partial_line_arrives_live(env):
    proc = subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "probe", "partial"],
                            env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    assert ready and os.read(proc.stdout.fileno(), 100) == b"partial"
    assert proc.poll() is None, "the job had ended: the output was not live"
    assert proc.wait(30) == 0


def test_argv_cwd_env_umask_and_rlimits(env, tmp_path):
    work = tmp_path / "work dir"
    work.mkdir()
    env["PROBE_VAR"] = "va lue"
    args = ["two words", "", "quote'\"", "new\nline", "-t"]
    result = arv_wrap("--", "probe", "args", *args, env=env, cwd=str(work),
                      stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert result.stdout.split(b"\0")[:-1] == [b"args", *(a.encode() for a in args)]
    script = "umask 027; ulimit -n 777; probe env"
    result = wrapped(env, script, cwd=str(work))
    lines = dict(line.split("=", 1) for line in result.stdout.decode().splitlines())
    assert lines["cwd"] == str(work) and lines["umask"] == "0027" and lines["nofile"] == "777"
    assert lines["var"] == "va lue" and lines["slurm"].isdigit()
    direct = subprocess.run(["bash", "-c", script], cwd=str(work), capture_output=True,
                            env={k: v for k, v in env.items() if not k.startswith("ARV_")})
    assert f"shlvl={lines['shlvl']}\n" in direct.stdout.decode()
    [record] = [r for r in job_records(env) if r["argv"][1] == "env"]
    assert lines["job"] == record["id"] and lines["slurm"] == record["backend_id"]


def test_the_relay_gives_back_exactly_the_callers_env(env):
    add_rules(env, "  - name: env\n")
    # the caller of the redirected `env` has no SHLVL and no PWD, and an odd SHLVL-like text
    result = arv_wrap("--", "env", "-i", "A=1", "BASH_FUNC_f%%=() {  echo  x\n}",
                      "ARV_WRAP_DISABLE=", "env", env=env, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    lines = [v for v in result.stdout.decode().split("\n")
             if v and not v.startswith(("SLURM_", "SLURMD_", " ", "}"))]
    assert sorted(lines) == ["A=1", "ARV_WRAP_DISABLE=", "BASH_FUNC_f%%=() {  echo  x"]
    assert "BASH_FUNC_f%%=() {  echo  x\n}\n" in result.stdout.decode()
    assert [r["backend"] for r in job_records(env)] == ["slurm"]


# -- process state the relay rebuilds on the node (slurmstepd does not pass it on) ----

def process_state(stdout):
    """(nice, SigIgn, SigBlk) from the probe's `state`: /proc/self/stat, then .../status."""
    stat, status = stdout.decode().split("\n", 1)
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    nice = int(stat.rsplit(")", 1)[1].split()[16])      # field 19 of stat
    return nice, int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)


def bit(signum):
    return 1 << (signum - 1)


# a caller that blocks SIGUSR1 and a real-time signal (and, as Python does, ignores SIGPIPE)
BLOCKING_CALLER = ("import os, signal; signal.pthread_sigmask(signal.SIG_BLOCK, "
                   "{signal.SIGUSR1, signal.SIGRTMIN + 2}); os.execvp('probe', ['probe', 'state'])")


@pytest.mark.parametrize("caller, expect", [
    (["nohup", "probe", "state"], lambda nice, ign, blk: ign & bit(signal.SIGHUP)),
    (["nice", "-n", "5", "probe", "state"], lambda nice, ign, blk: nice == os.nice(0) + 5),
    ([sys.executable, "-c", BLOCKING_CALLER],
     lambda nice, ign, blk: blk & bit(signal.SIGUSR1) and blk & bit(signal.SIGRTMIN + 2)),
], ids=["nohup", "nice", "blocked"])
def test_nice_ignored_signals_and_the_mask_reach_the_tool_as_directly(env, caller, expect):
    result = arv_wrap("--", *caller, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    plain_env = {k: v for k, v in env.items() if not k.startswith("ARV_")}
    direct = subprocess.run(caller, env=plain_env, stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, check=True)
    assert expect(*process_state(direct.stdout))
    assert process_state(result.stdout) == process_state(direct.stdout)
    assert [r["backend"] for r in job_records(env)] == ["slurm"]


def test_a_node_that_cannot_run_the_relay_is_a_clear_failure():
    from types import SimpleNamespace
    from arvwrap import paths
    from arvwrap.backends import slurm
    job = SimpleNamespace(tool="bwa", id="01J", fds={})
    live = slurm.Live(SimpleNamespace(timeout=20, log_dir="/nonexistent"), job, None, None, None)
    for line in ["srun: jobid 77: nodes(1):`vm', cpu counts: 1(x1)",
                 f"slurmstepd-vm: error: execve(): {paths.HELPER}: No such file or directory",
                 "srun: launch/slurm: _task_finish: Received task exit notification for 1 task "
                 "of StepId=77.0 (status=0x0200)."]:
        live.attempt.read(line)
    outcome = live.outcome(0, None, False)
    assert outcome.state == "failed" and outcome.exit_status is None
    assert outcome.message.startswith("job 77 (bwa): the node cannot run arv-wrap's relay (")
    # the tool's own exec failure stays the tool's status
    live = slurm.Live(SimpleNamespace(timeout=20, log_dir="/nonexistent"), job, None, None, None)
    for line in ["srun: jobid 78: nodes(1):`vm', cpu counts: 1(x1)",
                 "arv-wrap-relay: /x/bwa: No such file or directory",
                 "srun: launch/slurm: _task_finish: Received task exit notification for 1 task "
                 "of StepId=78.0 (status=0x7f00)."]:
        live.attempt.read(line)
    outcome = live.outcome(0, None, False)
    assert (outcome.state, outcome.exit_status) == ("exited", 127)


# -- stdin --------------------------------------------------------------------------

def test_a_tool_that_reads_stdin_gets_all_of_it(env):
    result = wrapped(env, "seq 1 100000 | cat | head -c 20; echo; seq 5 | cat")
    assert result.stdout == b"1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n" + b"1\n2\n3\n4\n5\n"


def test_a_tool_that_does_not_read_stdin_leaves_it_unconsumed(env, tmp_path):
    listing = tmp_path / "list"
    listing.write_text("".join(f"line{i}\n" for i in range(5)))
    result = wrapped(env, f"while read f; do probe echo \"$f\"; done < '{listing}'")
    assert result.stdout.decode().split() == [f"line{i}" for i in range(5)]


def test_dev_fd_arguments_run_on_the_local_backend(env):
    result = wrapped(env, "cat <(echo from-a-process-substitution)")
    assert result.returncode == 0 and result.stdout == b"from-a-process-substitution\n"
    [record] = job_records(env)
    assert record["backend"] == "local" and "/dev/fd" in record["reason"]


# -- pipes --------------------------------------------------------------------------

def test_pipe_between_two_cpu_jobs_on_the_full_node_does_not_deadlock(env, tools):
    """bwa -t 2 | samtools -@ 2 on the 2-CPU node, more than a pipe buffer between
    them, whichever of the two reaches the dispatcher first."""
    write_tool(tools, "bwa-like", "head -c 5000000 /dev/zero\n")
    write_tool(tools, "samtools-like", "wc -c\n")
    add_rules(env, "  - name: bwa-like\n    cpus: {flag: -t, default: 1}\n"
                   "  - name: samtools-like\n    cpus: {flag: '-@', default: 1}\n")
    cpus = os.cpu_count()
    for script in (f"bwa-like -t {cpus} | samtools-like -@ {cpus}",
                   f"(sleep 1; bwa-like -t {cpus}) | samtools-like -@ {cpus}"):
        result = wrapped(env, script, timeout=90)
        assert (result.returncode, result.stdout.strip()) == (0, b"5000000"), result.stderr
    assert sorted(r["cpus"] for r in job_records(env)) == [cpus] * 4


def test_a_driver_holding_an_unwritten_stdin_pipe_does_not_stall_its_tool(env, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text("import subprocess\n"
                      "p = subprocess.Popen(['probe', 'exit', '4'], stdin=subprocess.PIPE)\n"
                      "print(p.wait())\n")
    result = arv_wrap("--", sys.executable, str(driver), env=env, stdout=subprocess.PIPE,
                      timeout=60)
    assert result.stdout == b"4\n"


# -- cancel -------------------------------------------------------------------------

def activation(env):
    out = arv_wrap("env", env=env, stdout=subprocess.PIPE, check=True).stdout.decode()
    pairs = subprocess.run(["bash", "-c", out + "\nenv -0"], stdout=subprocess.PIPE,
                           env={"PATH": env["PATH"]}, check=True).stdout.split(b"\0")
    return {k: v for k, _, v in (p.decode().partition("=") for p in pairs if p)
            if k.startswith("ARV_WRAP_") or k == "LD_PRELOAD"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_signalling_the_redirected_call_cancels_the_slurm_job(env, signum):
    driver = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess; p = subprocess.Popen(['probe', 'sleep', '4242'], "
         "stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL); print(p.pid, flush=True); "
         "print(p.wait())"],
        env={**env, **activation(env)}, stdout=subprocess.PIPE)
    client_pid = int(driver.stdout.readline())
    record = running_job(env)
    assert in_squeue([record["id"]])
    os.kill(client_pid, signum)
    assert int(driver.stdout.readline()) == -signum
    driver.wait(15)
    start = time.monotonic()
    assert wait_for(lambda: not in_squeue([record["id"]]), 5), in_squeue([record["id"]])
    assert time.monotonic() - start < 5
    final = wait_for(lambda: [r for r in job_records(env) if r["state"] != "running"], 10)
    assert final and final[0]["state"] in ("signaled", "cancelled")


def test_arv_wrap_cancel_cancels_the_slurm_job(env):
    proc = subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "probe", "sleep", "4243"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    record = running_job(env)
    assert arv_wrap("cancel", record["id"], env=env, stdout=subprocess.PIPE).returncode == 0
    assert proc.wait(15) == -signal.SIGTERM
    assert proc.stderr.read().decode().count("arv-wrap:") == 1
    assert wait_for(lambda: not in_squeue([record["id"]]), 5)
    [final] = job_records(env)
    assert final["state"] == "cancelled"


def test_a_stopped_dispatcher_leaves_no_slurm_job_behind(env):
    proc = subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "probe", "sleep", "4244"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    record = running_job(env)
    sock = paths.socket_path(env)
    out = subprocess.run(["pgrep", "-f", f"arvwrap.dispatcher --socket {sock}"],
                         stdout=subprocess.PIPE, text=True).stdout
    os.kill(int(out.split()[0]), signal.SIGTERM)
    start = time.monotonic()
    assert wait_for(lambda: not in_squeue([record["id"]]), 5), in_squeue([record["id"]])
    assert time.monotonic() - start < 5
    assert proc.wait(15) == -signal.SIGTERM
    assert "dispatcher was stopped" in proc.stderr.read().decode()
    [final] = job_records(env)
    assert final["state"] == "cancelled"


# -- Slurm's own kills ----------------------------------------------------------------

def test_a_memory_kill_is_the_callers_death_with_slurms_reason(env, tools):
    add_rules(env, "  - name: hog\n    memory: 50M\n")
    write_tool(tools, "hog", 'exec probe mem\n')
    result = wrapped(env, "hog; echo status=$?", timeout=90)
    assert result.stdout == b"status=137\n"
    lines = [l for l in result.stderr.decode().splitlines() if l.startswith("arv-wrap:")]
    assert len(lines) == 1 and "memory limit" in lines[0], result.stderr
    [record] = job_records(env)
    assert (record["state"], record["signal"]) == ("signaled", 9)


def test_a_time_limit_kill_is_the_callers_death_with_slurms_reason(env, tools):
    """Slurm rounds the limit up to a minute and checks every 30 s: 60-90 s."""
    add_rules(env, "  - name: slow\n    time: 1m\n    slurm: {partition: short}\n")
    write_tool(tools, "slow", "exec sleep 300\n")
    start = time.monotonic()
    result = wrapped(env, "slow; echo status=$?", timeout=150)
    assert time.monotonic() - start < 120
    assert result.stdout == b"status=143\n"
    lines = [l for l in result.stderr.decode().splitlines() if "arv-wrap" in l]
    assert len(lines) == 1, result.stderr        # (and bash's own "Terminated")
    assert lines[0].startswith("arv-wrap: job ") and "DUE TO TIME LIMIT" in lines[0]
    [record] = job_records(env)
    assert (record["state"], record["signal"]) == ("signaled", 15)


# -- refusals and faults --------------------------------------------------------------

def test_refusals_exit_125_with_slurms_reason(env, tools, whitelist_file):
    write_tool(tools, "misplaced", "echo should-not-run\n")
    write_tool(tools, "huge", "echo should-not-run\n")
    add_rules(env, "  - name: misplaced\n    slurm: {partition: no-such-partition}\n")
    result = wrapped(env, "misplaced")
    assert (result.returncode, result.stdout) == (125, b"")
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("arv-wrap: slurm refused the job: ")
    assert "Invalid partition name specified" in line
    refuse = whitelist_file("on_oversize: refuse\ntools:\n  - name: huge\n    cpus: 64\n",
                            name="refuse.yaml")
    result = arv_wrap("-w", refuse, "--", "huge", env=env, capture_output=True,
                      stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stdout) == (125, b"")
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("arv-wrap: huge asks for 64 CPUs")
    clamp = whitelist_file("tools:\n  - name: huge\n    cpus: 64\n", name="clamp.yaml")
    result = arv_wrap("-w", clamp, "--", "huge", env=env, capture_output=True,
                      stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"should-not-run\n", b"")
    record = job_records(env)[0]
    assert record["cpus"] == os.cpu_count() and "clamped" in record["reason"]


@pytest.mark.skipif(not IS_ROOT, reason="stopping slurmctld needs root")
def test_controller_down_fails_after_a_bounded_wait_or_runs_locally(env, tools,
                                                                    whitelist_file):
    env["ARV_WRAP_SLURM_TIMEOUT"] = "4"
    write_tool(tools, "step", "echo ran; exit 3\n")
    fail = whitelist_file("tools:\n  - name: step\n", name="fail.yaml")
    local = whitelist_file("on_backend_error: local\ntools:\n  - name: step\n",
                           name="local.yaml")
    assert arv_wrap("-w", fail, "--", "probe", "exit", "0", env=env).returncode == 0
    try:
        assert cluster_cmd("stop-controller").returncode == 0
        start = time.monotonic()
        result = arv_wrap("-w", fail, "--", "step", env=env, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=60)
        elapsed = time.monotonic() - start
        assert (result.returncode, result.stdout) == (125, b"")
        [line] = result.stderr.decode().splitlines()
        assert line.startswith("arv-wrap: ") and "controller" in line
        assert elapsed < 4 + 10, elapsed
        result = arv_wrap("-w", local, "--", "step", env=env, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=60)
        assert (result.returncode, result.stdout, result.stderr) == (3, b"ran\n", b"")
    finally:
        proc = cluster_cmd("start-controller")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = job_records(env)
    assert records[0]["backend"] == "local" and "controller" in records[0]["reason"]
    assert records[1]["state"] == "failed"


# -- nested ---------------------------------------------------------------------------

def test_a_nested_job_submits_new_jobs_that_name_it_as_parent(env, tools):
    write_tool(tools, "driver", "probe env; probe env\n")
    add_rules(env, "  - name: driver\n    nested: true\n")
    result = wrapped(env, "driver", timeout=60)
    assert result.returncode == 0, result.stderr
    records = job_records(env)
    [driver] = [r for r in records if r["argv"][0] == "driver"]
    inner = [r for r in records if r["argv"][0] == "probe"]
    assert len(inner) == 2 and all(r["parent"] == driver["id"] for r in inner)
    slurm_ids = {r["backend_id"] for r in inner} | {driver["backend_id"]}
    assert len(slurm_ids) == 3       # three jobs, not steps of the driver's allocation
    seen = [line.split("=", 1)[1] for line in result.stdout.decode().splitlines()
            if line.startswith("slurm=")]
    assert sorted(seen) == sorted(r["backend_id"] for r in inner)


# -- where the nodes connect ------------------------------------------------------------

def test_the_controller_address_is_read_from_scontrol_show_config():
    from arvwrap.backends import slurm
    assert slurm.controller_address("SlurmctldHost[0]        = vm(10.0.0.5)\n"
                                    "SlurmctldPort           = 6817\n") == ("10.0.0.5", 6817)
    assert slurm.controller_address("SlurmctldHost[0] = ctl01\nSlurmctldPort = 7000-7003\n"
                                    ) == ("ctl01", 7000)
    assert slurm.controller_address("ClusterName = x\n") is None


def controller_route():
    """This host's address on the route to the cluster's controller."""
    from arvwrap.backends import slurm
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                            timeout=30).stdout
    return slurm.route_address(*slurm.controller_address(config))


def test_the_nodes_are_told_this_hosts_address_on_the_route_to_the_controller(cluster):
    from arvwrap.backends import slurm
    assert slurm.route_address("127.0.0.1", 6817) == "127.0.0.1"
    backend = slurm.Backend({})
    assert backend.own_address() == controller_route()
    # the listeners bind that one address, not every address of the host
    assert backend.where() == (controller_route(), controller_route())
    assert slurm.Backend({"listen": "0.0.0.0"}).where() == ("0.0.0.0", controller_route())
    assert slurm.Backend({"listen": "0.0.0.0", "host": "h"}).where() == ("0.0.0.0", "h")


def test_doctor_says_where_the_nodes_send_the_streams(env):
    result = arv_wrap("-b", "slurm", "doctor", env=env, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    assert result.returncode == 0, result.stdout + result.stderr
    where = controller_route()
    assert b"is UP" in result.stdout
    assert f"nodes send the streams to {where} (listening on {where})".encode() in result.stdout
    assert b"a redirected `true` ran as job" in result.stdout


# -- what each job used, measured on the node by the relay -----------------------------

def test_cpu_time_and_peak_memory_are_measured_on_the_node(env):
    """The probe runs python3 as a child of sh: the tool's children count too."""
    for what in ("burn", "touch100"):
        result = wrapped(env, f"probe {what}", timeout=60)
        assert result.returncode == 0, result.stderr
    used = {r["argv"][1]: r for r in job_records(env)}
    assert 0.4 <= used["burn"]["cpu_seconds"] <= 2, used["burn"]
    assert used["burn"]["max_rss"] < 100 * MIB
    assert 100 * MIB <= used["touch100"]["max_rss"] < 200 * MIB, used["touch100"]


def test_the_tool_has_the_descriptors_of_a_plain_srun_task_and_no_more(env):
    """The relay's own copies (srun's stderr, the sockets) do not reach the tool."""
    code = "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"
    plain = subprocess.run(["srun", "python3", "-S", "-c", code], capture_output=True,
                           timeout=60, check=True)
    result = wrapped(env, "probe fds")
    assert result.stdout == plain.stdout == b"[0, 1, 2, 3]\n"      # 3: listdir's own


def relay_of(record):
    """The pid of the relay that runs this job (the node is this host)."""
    found = slurm_relay(record["backend_id"])
    assert found, f"no relay for job {record['backend_id']}"
    return found[0]


@pytest.mark.parametrize("sender", ["scancel", "another process"])
def test_a_signal_reaches_the_tool_once(env, sender):
    """Slurm signals every process of the step, the tool too: the relay passes on only
    what others send it."""
    proc = subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "probe", "count", "USR1"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    record = running_job(env)
    if sender == "scancel":
        subprocess.run(["scancel", "--signal=USR1", record["backend_id"]], check=True, timeout=30)
    else:
        os.kill(relay_of(record), signal.SIGUSR1)
    assert proc.stdout.read() == b"got 1\n"
    assert proc.wait(30) == 0


@pytest.mark.parametrize("killed", ["the step", "the relay alone"])
def test_a_sigkill_leaves_nothing_running(env, killed):
    """A tool that ignores SIGTERM: Slurm's scancel ends the step with SIGKILL after
    KillWait, to every process of the step; a relay killed alone takes the tool along."""
    proc = subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "probe", "stubborn", "4245"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"started\n"
    record = running_job(env)
    if killed == "the step":
        subprocess.run(["scancel", record["backend_id"]], check=True, timeout=30)
    else:
        os.kill(relay_of(record), signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    sleeping = lambda: subprocess.run(["pgrep", "-f", "^sleep 4245$"],
                                      stdout=subprocess.PIPE).stdout
    assert wait_for(lambda: not sleeping(), 5), sleeping()
    assert wait_for(lambda: not in_squeue([record["id"]]), 5)


# -- stderr kept per job ---------------------------------------------------------------

def test_stderr_is_kept_capped_and_shown_for_a_failed_job(env, tmp_path):
    noise = tmp_path / "noise"
    data = b"".join(b"%09d %s\n" % (i, b"x" * 54) for i in range(3 << 14)) + b"the end\n"
    noise.write_bytes(data)                        # 3 MiB and a last line
    result = wrapped(env, f"probe complain '{noise}'", timeout=60)
    assert (result.returncode, result.stdout) == (1, b"not-in-the-log\n")
    assert result.stderr == data                   # the caller's copy is whole
    [record] = job_records(env)
    log = Path(env["ARV_WRAP_STATE_DIR"]) / "logs" / f"{record['id']}.stderr"
    kept = log.read_bytes()
    assert MIB <= len(kept) <= 2 * MIB and data.endswith(kept)     # its tail, stdout not in it
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
    shown = arv_wrap("logs", record["id"], env=env, stdout=subprocess.PIPE, check=True)
    assert shown.stdout == kept
    show = arv_wrap("show", record["id"], env=env, stdout=subprocess.PIPE, check=True)
    assert show.stdout.decode().rstrip().endswith("the end")


def test_logs_follow_shows_a_running_jobs_stderr_as_it_comes(env):
    call = subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "probe", "drip"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    record = running_job(env)
    log = Path(env["ARV_WRAP_STATE_DIR"]) / "logs" / f"{record['id']}.stderr"
    assert log.exists()                # from the moment the record says running
    follow = subprocess.Popen([sys.executable, "-m", "arvwrap", "logs", record["id"], "--follow"],
                              env=env, stdout=subprocess.PIPE)
    ready, _, _ = select.select([follow.stdout], [], [], 10)
    assert ready and os.read(follow.stdout.fileno(), 100) == b"first\n"
    assert call.poll() is None, "the job had ended: the log was not live"
    assert follow.wait(30) == 0 and follow.stdout.read() == b"second\n"
    assert call.wait(30) == 0 and call.stderr.read() == b"first\nsecond\n"


# -- the driver as a Slurm job (--as-job) ------------------------------------------------

def test_as_job_the_driver_is_a_slurm_job_and_its_tools_its_children(env, tools):
    write_tool(tools, "driver", "probe env; probe env; exit 7\n")
    result = arv_wrap("-b", "slurm", "--as-job", "--", "driver", env=env, capture_output=True,
                      stdin=subprocess.DEVNULL, timeout=90)
    assert result.returncode == 7, result.stderr
    records = jobs(env)
    [run] = [r for r in records if r["kind"] == "run"]
    [driver] = [r for r in records if r["argv"][0] == "driver" and r["kind"] == "job"]
    inner = [r for r in records if r["argv"][0] == "probe"]
    assert (driver["parent"], driver["backend"], driver["state"], driver["exit_status"]) == (
        run["id"], "slurm", "exited", 7)
    assert len(inner) == 2
    assert all(r["parent"] == driver["id"] and r["backend"] == "slurm" for r in inner)
    # each tool is a Slurm job of its own, submitted from inside the driver's
    seen = [line.split("=", 1)[1] for line in result.stdout.decode().splitlines()
            if line.startswith("slurm=")]
    assert sorted(seen) == sorted(r["backend_id"] for r in inner)
    assert driver["backend_id"].isdigit() and driver["backend_id"] not in seen


ON_SOLO = "slurm: {partition: solo}\ntools:\n  - name: driver\n  - name: probe\n"


def test_a_tool_that_could_never_start_beside_its_driver_fails_at_once(env, tools,
                                                                        whitelist_file):
    """The driver holds both CPUs of the only node of the partition (a rule naming the
    driver gives its partition) and waits for its tool."""
    write_tool(tools, "driver", "probe exit 0; echo status=$?\n")
    env["ARV_WRAP_WHITELIST"] = whitelist_file(ON_SOLO, name="solo.yaml")
    result = arv_wrap("-b", "slurm", "--as-job", "--cpus", str(os.cpu_count()), "--",
                      "driver", env=env, capture_output=True, stdin=subprocess.DEVNULL,
                      timeout=60)
    assert (result.returncode, result.stdout) == (0, b"status=125\n")
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("arv-wrap: probe would wait for ever: Slurm job "), line
    assert line.endswith("of the only node of partition solo"), line
    [driver] = [r for r in job_records(env) if r["argv"] == ["driver"]]
    assert driver["backend"] == "slurm" and driver["state"] == "exited"
    shown = subprocess.run(["scontrol", "-o", "show", "job", driver["backend_id"]],
                           capture_output=True, text=True, timeout=30).stdout
    assert " Partition=solo " in shown, shown      # the driver's rule gave its partition


def test_ctrl_c_cancels_the_whole_as_job_tree(env, tools):
    write_tool(tools, "driver", "probe sleep 4246\n")
    proc = subprocess.Popen([sys.executable, "-m", "arvwrap", "-b", "slurm", "--as-job", "--",
                             "driver"], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline() == b"started\n"
    ids = [r["id"] for r in job_records(env)]
    assert len(in_squeue(ids)) == 2, in_squeue(ids)
    os.killpg(proc.pid, signal.SIGINT)         # what the terminal does on Ctrl-C
    start = time.monotonic()
    assert wait_for(lambda: not in_squeue(ids), 5), in_squeue(ids)
    assert time.monotonic() - start < 5
    assert proc.wait(30) == -signal.SIGINT
    final = wait_for(lambda: all(r["state"] not in ("queued", "running")
                                 for r in job_records(env)), 10)
    assert final, job_records(env)


def test_the_align_pipeline_gives_the_same_results_plainly_wrapped_and_as_a_job(env, tmp_path):
    """examples/align/driver.py with whitelists/bcbio.yaml on the one-node partition:
    bwa mem -t 2 and samtools sort -@ 2 ask for both CPUs of its node, where the
    driver holds one: they get the CPU it leaves (with a note), rather than waiting
    for ever."""
    for program in ("bwa", "samtools", "bcftools"):
        need(program)
    from test_align import BCBIO, HEAVY, calls, command, outputs, summary_lines
    # bcbio.yaml's tools on partition solo (a file's block is its tools'), and the
    # driver too when it is a job (a rule naming it gives its partition)
    solo = "slurm: {partition: solo}\n" + Path(BCBIO).read_text()
    rules = {"wrapped": tmp_path / "solo.yaml", "as a job": tmp_path / "solo-driver.yaml"}
    rules["wrapped"].write_text(solo)
    rules["as a job"].write_text(solo + "  - name: driver.py\n")
    plain_env = {k: v for k, v in env.items() if not k.startswith("ARV_WRAP_")}
    got = {}
    for how, wrap in [("plain", None), ("wrapped", ["-b", "slurm"]),
                      ("as a job", ["-b", "slurm", "--as-job"])]:
        cwd = tmp_path / how.replace(" ", "-")
        cwd.mkdir()
        if wrap is None:
            result = subprocess.run(command("python", None), cwd=cwd, env=plain_env,
                                    capture_output=True, timeout=300)
        else:
            result = arv_wrap("-w", str(rules[how]), *wrap, "--", *command("python", None),
                              cwd=cwd, env=env, capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=300)
        assert result.returncode == 0, f"{how}: {result.stderr.decode()}"
        got[how] = (outputs(cwd), summary_lines(result.stdout))
    assert got["wrapped"] == got["plain"] and got["as a job"] == got["plain"]

    records = jobs(env)
    as_job_run, wrapped_run = [r for r in records if r["kind"] == "run"]     # newest first
    [driver] = [r for r in records if r["parent"] == as_job_run["id"]]
    inner = [r for r in records if r["run"] == as_job_run["id"] and r["kind"] == "job"
             and r is not driver]
    assert driver["argv"][0].endswith("driver.py") and driver["backend"] == "slurm"
    assert (driver["state"], driver["exit_status"]) == ("exited", 0)
    assert calls(inner) == HEAVY, calls(inner)
    assert all(r["parent"] == driver["id"] and r["backend"] == "slurm" and
               (r["state"], r["exit_status"]) == ("exited", 0) for r in inner), inner
    bwa = next(r for r in inner if r["argv"][:2] == ["bwa", "mem"])
    assert bwa["cpus"] == 1 and f"beside Slurm job {driver['backend_id']}" in bwa["reason"]
    plainly = [r for r in records if r["run"] == wrapped_run["id"] and r["kind"] == "job"]
    assert calls(plainly) == HEAVY
    assert next(r for r in plainly if r["argv"][:2] == ["bwa", "mem"])["cpus"] == 2


# -- arv-wrap's own machinery failing ---------------------------------------------------

def test_fault_injecting_stream_copy_fails_the_job_with_one_line(env, tmp_path):
    """A crash in the thread that copies the job's stdout: the job is failed (125), the
    caller gets one line saying so, and the dispatcher serves the next call."""
    from fault_injection import inject
    inject(env, tmp_path, "arvwrap.backends.remote.streams.Stream._keep")
    result = wrapped(env, "probe echo BOOM", timeout=90)
    assert (result.returncode, result.stdout) == (125, b"")
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("arv-wrap: job ") and line.endswith(
        "the copy of the stdout of job " + job_records(env)[0]["id"]
        + " failed (RuntimeError: injected; see dispatcher.log)"), line
    assert job_records(env)[0]["state"] == "failed"
    again = wrapped(env, "probe echo fine", timeout=90)
    assert (again.returncode, again.stdout) == (0, b"fine\n")



def test_a_backend_whose_machinery_gave_up_fails_its_next_jobs_at_once():
    """A thread that kept crashing stops the backend: each later job fails with one line,
    as a backend error (on_backend_error: local would run it here)."""
    need("srun")
    from types import SimpleNamespace
    from arvwrap.backends import slurm
    backend = slurm.Backend({})
    backend.stop("the slurm status poller failed (ValueError: x; see dispatcher.log)")
    outcome = backend.run(SimpleNamespace(tool="bwa", id="01J"), None)
    assert (outcome.state, outcome.run_locally) == ("failed", True)
    assert outcome.message == ("the slurm backend stopped: the slurm status poller failed "
                               "(ValueError: x; see dispatcher.log)")
