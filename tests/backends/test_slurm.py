"""The Slurm backend, end to end on the real one-node cluster of scripts/slurm-cluster.sh:
`arv-wrap -b slurm` through the shim, the client, the dispatcher and srun.

Skipped when Slurm is not installed, except on CI (CI=true) where that is a failure.
The cluster may be shared with other test runs: every squeue check filters on the
job names this backend gives (`arv-wrap:<tool>:<job id>`).
"""
import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from arvwrap import paths
from conftest import arv_wrap, job_records, need, wrapped, write_tool

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts" / "slurm-cluster.sh"
IS_ROOT = os.geteuid() == 0

PROBE = r"""
case "$1" in
    exit) exit "$2" ;;
    kill) kill -"$2" $$ ;;
    sleep) echo started; exec sleep "$2" ;;
    echo) echo "$2" ;;
    partial) printf partial; sleep 3; echo ;;
    streams) cat "$2"; cat "$3" >&2 ;;
    env) printf '%s\n' "cwd=$(pwd)" "umask=$(umask)" "nofile=$(ulimit -n)" "var=$PROBE_VAR" \
             "job=$ARV_WRAP_JOB" "slurm=$SLURM_JOB_ID" "shlvl=${SHLVL-unset}" ;;
    args) for a in "$@"; do printf '%s\0' "$a"; done ;;
    mem) exec python3 -S -c "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(30)" ;;
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
def env(cluster, tools, base_env, whitelist_file):
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


def wait_for(predicate, seconds, step=0.1):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


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
    table = arv_wrap("jobs", env=env, stdout=subprocess.PIPE, check=True).stdout.decode()
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


def test_a_node_that_cannot_run_the_relay_is_a_clear_failure():
    from types import SimpleNamespace
    from arvwrap import paths
    from arvwrap.backends import slurm
    job = SimpleNamespace(tool="bwa", id="01J", fds={})
    live = slurm.Live(SimpleNamespace(timeout=20), job, None, None, None)
    for line in ["srun: jobid 77: nodes(1):`vm', cpu counts: 1(x1)",
                 f"slurmstepd-vm: error: execve(): {paths.CLIENT}: No such file or directory",
                 "srun: launch/slurm: _task_finish: Received task exit notification for 1 task "
                 "of StepId=77.0 (status=0x0200)."]:
        live.attempt.read(line)
    outcome = live.outcome(0, None, False)
    assert outcome.state == "failed" and outcome.exit_status is None
    assert outcome.message.startswith("job 77 (bwa): the node cannot run arv-wrap's relay (")
    # the tool's own exec failure stays the tool's status
    live = slurm.Live(SimpleNamespace(timeout=20), job, None, None, None)
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


def test_the_nodes_are_told_this_hosts_address_on_the_route_to_the_controller(cluster):
    from arvwrap.backends import slurm
    assert slurm.route_address("127.0.0.1", 6817) == "127.0.0.1"
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                            timeout=30).stdout
    host, port = slurm.controller_address(config)
    backend = slurm.Backend({})
    assert backend.own_address() == slurm.route_address(host, port)


def test_doctor_says_where_the_nodes_send_the_streams(env):
    result = arv_wrap("-b", "slurm", "doctor", env=env, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"is UP" in result.stdout and b"nodes send the streams to 127.0.0.1" in result.stdout
    assert b"a redirected `true` ran as job" in result.stdout
