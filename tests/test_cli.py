"""The arv-wrap command as a user types it."""
import json
import os
import subprocess

import pytest

from arvwrap import __version__, paths
from conftest import arv_wrap, jobs, write_tool

RULES = "tools:\n  - name: step\n    cpus: {flag: -t, default: 1}\n    memory: 1G\n"


@pytest.fixture
def env(tools, base_env, whitelist_file):
    write_tool(tools, "step", 'echo "step $*"\n')
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(RULES)
    return base_env


def out(*args, env, **kwargs):
    return arv_wrap(*args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_version_and_help_on_every_command(base_env):
    assert out("--version", env=base_env).stdout.decode().strip() == f"arv-wrap {__version__}"
    for command in ([], ["env"], ["check"], ["jobs"], ["doctor"], ["preload-path"], ["cancel"]):
        result = out(*command, "--help", env=base_env)
        assert result.returncode == 0, command
        assert result.stdout.startswith(b"usage: arv-wrap"), command


def test_preload_path_is_the_installed_shim(base_env):
    path = out("preload-path", env=base_env).stdout.decode().strip()
    assert path == paths.SHIM and os.path.isabs(path) and os.path.exists(path)


def test_the_top_level_command_is_matched_like_any_exec(env):
    result = out("--", "step", "-t", "2", "x", env=env)
    assert (result.returncode, result.stdout) == (0, b"step -t 2 x\n")
    [job] = [r for r in jobs(env) if r["kind"] == "job"]
    assert job["argv"] == ["step", "-t", "2", "x"]
    assert (job["cpus"], job["memory"]) == (2, 2**30)


def test_exit_status_and_signal_of_the_command(env):
    assert out("--", "bash", "-c", "exit 7", env=env).returncode == 7
    assert out("--", "bash", "-c", "kill -TERM $$", env=env).returncode == -15
    killed = out("--", "bash", "-c", "kill -KILL $$", env=env)
    assert (killed.returncode, killed.stderr) == (-9, b"")
    runs = [r for r in jobs(env) if r["kind"] == "run"]
    assert {(r["state"], r["exit_status"], r["signal"]) for r in runs} == {
        ("exited", 7, None), ("signaled", None, 15), ("signaled", None, 9)}


def test_a_missing_command_says_so(env):
    result = out("--", "no-such-program-here", env=env)
    assert result.returncode == 127
    assert result.stderr.decode().strip() == ("arv-wrap: no-such-program-here: "
                                              "No such file or directory")


def test_a_program_named_like_a_subcommand_needs_dashdash(env, tools):
    write_tool(tools, "jobs", "echo i-am-the-jobs-program\n")
    assert out("--", "jobs", env=env).stdout == b"i-am-the-jobs-program\n"


def test_no_whitelist_is_refused_with_how_to_name_one(base_env, tmp_path):
    result = out("--", "true", env=base_env, cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("arv-wrap: ") and "-w" in line
    assert out("jobs", env=base_env, cwd=tmp_path).returncode == 0


def test_arv_wrap_yaml_in_the_cwd_is_the_fallback(base_env, tools, tmp_path):
    write_tool(tools, "step", "echo hi\n")
    (tmp_path / "arv-wrap.yaml").write_text(RULES)
    assert out("--", "step", env=base_env, cwd=tmp_path).stdout == b"hi\n"
    assert len([r for r in jobs(base_env) if r["kind"] == "job"]) == 1


def test_bad_yaml_exits_2_naming_file_line_and_key(base_env, whitelist_file):
    bad = whitelist_file("tools:\n  - name: step\n    cpus: lots\n", name="bad.yaml")
    result = out("-w", bad, "--", "true", env=base_env)
    assert result.returncode == 2
    [line] = result.stderr.decode().splitlines()
    assert bad in line and ":3:" in line and "cpus" in line
    assert jobs(base_env) == []


def test_env_activates_programs_started_after_it(env):
    script = 'eval "$(arv-wrap env)" && bash -c "step one; step two"'
    shell_env = dict(env, PATH=f"{os.path.dirname(paths.CLIENT)}:{env['PATH']}")
    result = subprocess.run(["bash", "-c", script.replace(
        "arv-wrap env", f"{' '.join(arv_cmd())} env")], env=shell_env,
        stdout=subprocess.PIPE, timeout=60)
    assert result.stdout == b"step one\nstep two\n"
    records = jobs(env)
    [run] = [r for r in records if r["kind"] == "run"]
    assert sorted(r["argv"][1] for r in records if r["kind"] == "job") == ["one", "two"]
    assert all(r["parent"] == run["id"] for r in records if r["kind"] == "job")


def test_disable_passes_everything_through(env):
    env["ARV_WRAP_DISABLE"] = "1"
    assert out("--", "bash", "-c", "step a", env=env).stdout == b"step a\n"
    assert [r for r in jobs(env) if r["kind"] == "job"] == []
    del env["ARV_WRAP_DISABLE"]
    result = out("--", "bash", "-c", "ARV_WRAP_DISABLE=1 step b; step c", env=env)
    assert result.stdout == b"step b\nstep c\n"
    assert [r["argv"][1] for r in jobs(env) if r["kind"] == "job"] == ["c"]


def test_check_explains_the_decision_without_running(env):
    result = out("check", "--", "step", "-t", "4", env=env)
    assert result.returncode == 0
    text = result.stdout.decode()
    assert "redirected" in text and "w.yaml:2" in text and "cpus: 4" in text
    assert jobs(env) == []
    text = out("check", "--", "ls", env=env).stdout.decode()
    assert "runs locally" in text
    env["ARV_WRAP_LOCAL_CPUS"] = "2"
    text = out("check", "--", "step", "-t", "16", env=env).stdout.decode()
    assert "note: larger than the local backend offers (16 CPUs > 2): clamped" in text


def test_check_says_what_process_state_crosses_to_the_backend(env):
    def state_lines(*args):
        text = out("check", *args, "--", "step", env=env).stdout.decode()
        return [line for line in text.splitlines() if line.startswith("process state: ")]
    [local] = state_lines()
    assert "as a plain exec" in local and "every descriptor" in local and "nice" in local
    crosses, stays, streams = state_lines("-b", "slurm")
    assert crosses.startswith("process state: crosses to the node: argv, environment")
    for what in ("umask", "soft rlimits", "nice", "ignored signals", "signal mask"):
        assert what in crosses, what
    assert stays.startswith("process state: does not cross: descriptors other than 0-2")
    for what in ("/dev/fd argument runs the call on the local backend", "groups",
                 "hard rlimits", "CPU affinity", "cgroup", "namespaces", "oom_score_adj",
                 "no_new_privs"):
        assert what in stays, what
    assert "stdout and stderr are sockets" in streams
    # no job, no note: a call that is not redirected keeps everything
    assert "process state" not in out("check", "--", "ls", env=env).stdout.decode()


def test_jobs_json_and_run_filter(env):
    out("--", "step", env=env)
    out("--", "step", env=env)
    records = jobs(env)
    runs = [r for r in records if r["kind"] == "run"]
    assert len(runs) == 2
    one = json.loads(out("jobs", "--json", "--run", runs[0]["id"], env=env).stdout)
    assert {r["run"] for r in one} == {runs[0]["id"]} and len(one) == 2
    for field in ("id", "run", "parent", "argv", "cwd", "backend", "backend_id", "state",
                  "exit_status", "signal", "started", "ended", "cpus", "memory", "reason"):
        assert field in one[0]
    table = out("jobs", env=env).stdout.decode().splitlines()     # the runs
    assert table[0].startswith("RUN") and len(table) == 3
    assert "1 exited" in table[1] and "1 exited" in table[2]
    tree = out("jobs", "--tree", env=env).stdout.decode().splitlines()
    assert tree[0].startswith("JOB") and len(tree) == 5
    assert [line.startswith("  ") for line in tree[1:]] == [False, True, False, True]


def test_doctor_checks_the_chain(env):
    result = out("doctor", env=env)
    assert result.returncode == 0, result.stdout
    assert b"intercepts" in result.stdout
    assert b"a redirected `true` ran as job" in result.stdout
    [run] = [r for r in jobs(env) if r["kind"] == "run"]      # its probe's run has ended
    assert (run["argv"], run["state"], run["exit_status"]) == (["arv-wrap", "doctor"],
                                                               "exited", 0)


def test_doctor_says_which_link_is_broken(base_env):
    result = out("doctor", "-b", "nosuchbackend", env=base_env)
    assert result.returncode == 1
    assert b"FAIL  backend nosuchbackend: unknown backend" in result.stdout


def arv_cmd():
    import sys
    return [sys.executable, "-m", "arvwrap"]
