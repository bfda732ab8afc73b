"""The dispatcher's policy, through the real shim, client and local backend."""
import datetime
import os
import signal
import subprocess
import threading
import time

import pytest

from arvwrap import paths
from conftest import arv_wrap, jobs, write_tool


def iso(stamp):
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ")


def test_pipe_between_two_cpu_jobs_on_a_two_cpu_budget_does_not_deadlock(tools, base_env,
                                                                          whitelist_file):
    """bwa-like | samtools-like, each asking for 2 CPUs, more than 64 KiB between them."""
    write_tool(tools, "bwa-like", "head -c 5000000 /dev/zero\n")
    write_tool(tools, "samtools-like", "wc -c\n")
    base_env["ARV_WRAP_LOCAL_CPUS"] = "2"
    rules = whitelist_file("tools:\n"
                           "  - name: bwa-like\n    cpus: {flag: -t, default: 1}\n"
                           "  - name: samtools-like\n    cpus: {flag: '-@', default: 1}\n")
    result = arv_wrap("-w", rules, "--", "bash", "-c", "bwa-like -t 2 | samtools-like -@ 2",
                      env=base_env, stdout=subprocess.PIPE, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, b"5000000")
    assert sorted(r["cpus"] for r in jobs(base_env) if r["kind"] == "job") == [2, 2]


def test_two_pipelines_share_one_budget(tools, base_env, whitelist_file):
    write_tool(tools, "step", "sleep 0.5\n")
    base_env["ARV_WRAP_LOCAL_CPUS"] = "1"
    rules = whitelist_file("tools:\n  - name: step\n")
    # the dispatcher reads its budget when it starts: start it with the first pipeline
    arv_wrap("-w", rules, "--", "step", env=base_env, check=True)
    runs = [threading.Thread(target=arv_wrap, args=("-w", rules, "--", "bash", "-c",
                                                     "step; step"), kwargs={"env": base_env})
            for _ in range(2)]
    for r in runs:
        r.start()
    for r in runs:
        r.join()
    spans = sorted((iso(r["started"]), iso(r["ended"])) for r in jobs(base_env)
                   if r["kind"] == "job")
    assert len(spans) == 5
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - datetime.timedelta(milliseconds=50), "two jobs overlapped"
    assert len({r["run"] for r in jobs(base_env)}) == 3


def test_unreadable_rules_at_exec_time_run_locally_with_one_warning(tools, base_env,
                                                                     whitelist_file):
    write_tool(tools, "step", "echo ran\n")
    rules = whitelist_file("tools:\n  - name: step\n")
    script = f"echo 'tools: [' > {rules}; step"   # break the file under the running pipeline
    result = arv_wrap("-w", rules, "--", "bash", "-c", script, env=base_env,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert result.returncode == 0
    assert result.stdout == b"ran\n"
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("arv-wrap: cannot read the rules")
    assert [r for r in jobs(base_env) if r["kind"] == "job"] == []


def test_oversize_refused_exits_125_with_one_line(tools, base_env, whitelist_file):
    write_tool(tools, "big", "echo should-not-run\n")
    base_env["ARV_WRAP_LOCAL_CPUS"] = "2"
    rules = whitelist_file("on_oversize: refuse\ntools:\n  - name: big\n    cpus: 64\n")
    result = arv_wrap("-w", rules, "--", "big", env=base_env,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert result.returncode == 125
    assert result.stdout == b""
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("arv-wrap: ") and "64 CPUs" in line
    [record] = [r for r in jobs(base_env) if r["kind"] == "job"]
    assert record["state"] == "failed"


def test_oversize_clamped_is_noted_in_the_record(tools, base_env, whitelist_file):
    write_tool(tools, "big", "true\n")
    base_env["ARV_WRAP_LOCAL_CPUS"] = "2"
    rules = whitelist_file("tools:\n  - name: big\n    cpus: 64\n")
    assert arv_wrap("-w", rules, "--", "big", env=base_env).returncode == 0
    [record] = [r for r in jobs(base_env) if r["kind"] == "job"]
    assert record["cpus"] == 2 and "clamped" in record["reason"]


def test_arv_wrap_cancel_kills_the_job_and_the_caller_dies_of_it(tools, base_env,
                                                                 whitelist_file):
    write_tool(tools, "slow", "exec sleep 4217\n")
    rules = whitelist_file("tools:\n  - name: slow\n")
    proc = subprocess.Popen([*arv_cmd(), "-w", rules, "--", "slow"], env=base_env,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running = [r for r in jobs(base_env) if r["kind"] == "job" and r["state"] == "running"]
        if running:
            break
        time.sleep(0.1)
    result = arv_wrap("cancel", running[0]["id"], env=base_env, stdout=subprocess.PIPE)
    assert result.returncode == 0
    assert proc.wait(15) == -15
    assert proc.stderr.read().decode().count("arv-wrap:") == 1
    [record] = [r for r in jobs(base_env) if r["id"] == running[0]["id"]]
    assert record["state"] == "cancelled"


def dispatcher_pids(env):
    sock = paths.socket_path(env)
    out = subprocess.run(["pgrep", "-f", f"arvwrap.dispatcher --socket {sock}"],
                         stdout=subprocess.PIPE, text=True).stdout
    return [int(pid) for pid in out.split()]


def wait_running(env, count=1):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running = [r for r in jobs(env) if r["kind"] == "job" and r["state"] == "running"]
        if len(running) >= count:
            return running
        time.sleep(0.1)
    raise AssertionError("the jobs never ran")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stopped_dispatcher_cancels_its_jobs_answers_their_callers_and_leaves(
        tools, base_env, whitelist_file, signum):
    write_tool(tools, "slow", "exec sleep 4219\n")
    rules = whitelist_file("tools:\n  - name: slow\n    cpus: 1\n")
    base_env["ARV_WRAP_LOCAL_CPUS"] = "1"      # the second call waits in the queue
    script = "slow & slow; echo fg=$?; wait $!; echo bg=$?"
    proc = subprocess.Popen([*arv_cmd(), "-w", rules, "--", "bash", "-c", script],
                            env=base_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_running(base_env)
        time.sleep(0.5)
        [pid] = dispatcher_pids(base_env)
        os.kill(pid, signum)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.stdout.read() == b"fg=143\nbg=143\n"    # both died of SIGTERM
    lines = [line for line in proc.stderr.read().decode().splitlines() if "arv-wrap:" in line]
    assert len(lines) == 2 and all("dispatcher was stopped" in line for line in lines)
    assert not subprocess.run(["pgrep", "-f", "sleep 4219"], stdout=subprocess.PIPE).stdout
    assert not os.path.exists(paths.socket_path(base_env))
    deadline = time.monotonic() + 5
    while dispatcher_pids(base_env) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not dispatcher_pids(base_env)
    records = [r for r in jobs(base_env) if r["kind"] == "job"]
    assert [r["state"] for r in records] == ["cancelled", "cancelled"]


def test_records_name_their_run_and_parent(tools, base_env, whitelist_file):
    write_tool(tools, "step", "true\n")
    rules = whitelist_file("tools:\n  - name: step\n")
    arv_wrap("-w", rules, "--", "bash", "-c", "step; step", env=base_env, check=True)
    records = jobs(base_env)
    [run] = [r for r in records if r["kind"] == "run"]
    assert run["parent"] is None and run["state"] == "exited" and run["exit_status"] == 0
    children = [r for r in records if r["kind"] == "job"]
    assert len(children) == 2
    assert all(c["run"] == run["id"] and c["parent"] == run["id"] for c in children)
    assert all(c["backend"] == "local" and c["backend_id"] for c in children)


def test_nested_job_is_the_parent_of_the_calls_it_makes(tools, base_env, whitelist_file):
    write_tool(tools, "inner", "true\n")
    write_tool(tools, "driver", "inner; inner\n")
    rules = whitelist_file("tools:\n  - name: inner\n  - name: driver\n    nested: true\n")
    arv_wrap("-w", rules, "--", "driver", env=base_env, check=True)
    records = [r for r in jobs(base_env) if r["kind"] == "job"]
    [driver] = [r for r in records if r["argv"][0] == "driver"]
    inner = [r for r in records if r["argv"][0] == "inner"]
    assert len(inner) == 2 and all(r["parent"] == driver["id"] for r in inner)


def test_not_nested_job_runs_its_children_locally(tools, base_env, whitelist_file):
    write_tool(tools, "inner", "true\n")
    write_tool(tools, "driver", "inner; inner\n")
    rules = whitelist_file("tools:\n  - name: inner\n  - name: driver\n")
    arv_wrap("-w", rules, "--", "driver", env=base_env, check=True)
    assert [r["argv"][0] for r in jobs(base_env) if r["kind"] == "job"] == ["driver"]


def test_dispatcher_socket_is_private_and_leaves_when_idle(tools, base_env, whitelist_file):
    write_tool(tools, "step", "true\n")
    base_env["ARV_WRAP_IDLE_TIMEOUT"] = "1"
    rules = whitelist_file("tools:\n  - name: step\n")
    arv_wrap("-w", rules, "--", "step", env=base_env, check=True)
    sock = paths.socket_path(base_env)
    assert os.stat(os.path.dirname(sock)).st_mode & 0o077 == 0
    deadline = time.monotonic() + 10
    while os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(sock)
    arv_wrap("-w", rules, "--", "step", env=base_env, check=True)   # starts again


def arv_cmd():
    import sys
    return [sys.executable, "-m", "arvwrap"]


def test_an_unknown_backend_fails_125_or_runs_locally_as_the_rule_says(tools, base_env,
                                                                       whitelist_file):
    write_tool(tools, "step", "echo ran\n")
    strict = whitelist_file("tools:\n  - name: step\n", name="strict.yaml")
    result = arv_wrap("-w", strict, "-b", "nosuch", "--", "step", env=base_env,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert (result.returncode, result.stdout) == (125, b"")
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("arv-wrap: unknown backend 'nosuch'")
    lenient = whitelist_file("on_backend_error: local\ntools:\n  - name: step\n",
                             name="lenient.yaml")
    result = arv_wrap("-w", lenient, "-b", "nosuch", "--", "step", env=base_env,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"ran\n", b"")
    failed, ran = sorted((r for r in jobs(base_env) if r["kind"] == "job"),
                         key=lambda r: r["state"] != "failed")
    assert failed["state"] == "failed" and failed["backend"] == "nosuch"
    assert ran["state"] == "exited" and ran["backend"] == "local"
    assert "on_backend_error: local" in ran["reason"]

