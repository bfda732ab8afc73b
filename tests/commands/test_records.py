"""The records through the commands: jobs, show, logs, cancel, gc."""
import os
import subprocess
import time

import pytest

from conftest import arv_wrap, jobs, write_tool


def out(*args, env, **kwargs):
    return arv_wrap(*args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.fixture
def three_levels(tools, base_env, whitelist_file):
    """run -> a nested pipeline job -> two tool jobs (one failing)."""
    write_tool(tools, "tool", 'sleep 0.1; echo "tool $1 says" >&2; exit "$1"\n')
    write_tool(tools, "pipeline", "tool 0; tool 4; exit 0\n")
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(
        "tools:\n  - name: tool\n    cpus: 1\n    memory: 64M\n"
        "  - name: pipeline\n    nested: true\n    cpus: 0.1\n")
    assert arv_wrap("--", "pipeline", env=base_env, stderr=subprocess.DEVNULL).returncode == 0
    return base_env


def test_jobs_shows_runs_and_tree_shows_three_levels(three_levels):
    runs = out("jobs", env=three_levels).stdout.decode().splitlines()
    assert runs[0].split()[:2] == ["RUN", "STATE"] and len(runs) == 2
    assert "3 exited" in runs[1]
    tree = out("jobs", "--tree", env=three_levels).stdout.decode().splitlines()
    depth = [len(line) - len(line.lstrip()) for line in tree[1:]]
    assert depth == [0, 2, 4, 4]
    assert "exit 4" in tree[4] and "1 cpu, 64.0M" in tree[4]


def test_show_puts_what_a_job_used_beside_what_it_asked(three_levels):
    [failed] = [r for r in jobs(three_levels) if r["argv"] == ["tool", "4"]]
    text = out("show", failed["id"][-8:], env=three_levels).stdout.decode()
    assert f"id              {failed['id']}" in text
    assert "exit_status     4" in text and "cpu efficiency" in text and "memory use" in text


def test_logs_of_a_local_job_says_where_its_stderr_went(three_levels):
    [job] = [r for r in jobs(three_levels) if r["argv"] == ["tool", "0"]]
    result = out("logs", job["id"], env=three_levels)
    assert result.returncode == 1 and b"caller's own stderr" in result.stderr


def test_unknown_or_ambiguous_job_ids_are_one_line(three_levels):
    for word in ("NOSUCHJOB", "01"):
        result = out("show", word, env=three_levels)
        assert result.returncode == 2 and result.stderr.count(b"\n") == 1


def test_cancel_of_a_middle_job_ends_its_subtree_only(tools, base_env, whitelist_file):
    write_tool(tools, "slow", 'touch "$1.started"; exec sleep 4311\n')
    write_tool(tools, "pipeline", 'slow "$1"; echo after\n')
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(
        "tools:\n  - name: slow\n  - name: pipeline\n    nested: true\n    cpus: 0.1\n")
    base_env["ARV_WRAP_LOCAL_CPUS"] = "4"
    here = os.path.join(base_env["ARV_WRAP_STATE_DIR"], "..")
    caller = subprocess.Popen(
        [*arv_cmd(), "--", "bash", "-c", f"pipeline {here}/a & pipeline {here}/b; wait"],
        env=base_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not all(os.path.exists(f"{here}/{x}.started") for x in "ab"):
            assert time.monotonic() < deadline, "the tools never started"
            time.sleep(0.05)
        records = jobs(base_env)
        [middle] = [r for r in records if r["argv"] == ["pipeline", f"{here}/a"]]
        result = out("cancel", middle["id"], env=base_env)
        assert result.returncode == 0 and b"and 1 below it" in result.stdout
        deadline = time.monotonic() + 20
        while True:
            states = {tuple(r["argv"]): r["state"] for r in jobs(base_env) if r["kind"] == "job"}
            if states[("pipeline", f"{here}/a")] != "running" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert states[("pipeline", f"{here}/a")] == "cancelled"
        assert states[("slow", f"{here}/a")] == "cancelled"
        assert states[("pipeline", f"{here}/b")] == "running"
        assert states[("slow", f"{here}/b")] == "running"
    finally:
        caller.kill()
        caller.wait(10)
        subprocess.run(["pkill", "-f", "sleep 4311"])


def arv_cmd():
    import sys
    return [sys.executable, "-m", "arvwrap"]


def test_gc_removes_old_finished_runs(three_levels):
    assert out("gc", env=three_levels).returncode == 2
    kept = out("gc", "--older-than", "30d", env=three_levels)
    assert kept.returncode == 0 and len(jobs(three_levels)) == 4
    gone = out("gc", "--older-than", "0s", env=three_levels)
    assert gone.returncode == 0 and b"removed 1 runs and 3 jobs" in gone.stdout
    assert jobs(three_levels) == []
