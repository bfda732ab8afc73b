"""Starting runs: `arv-wrap --as-job`, `-v`, `arv-wrap env` runs that end, and what
the top-level command inherits."""
import shlex
import subprocess
import sys
import time

from conftest import arv_wrap, jobs, need, write_tool


def tree_of(env):
    records = jobs(env)
    [run] = [r for r in records if r["kind"] == "run"]
    below = {r["id"]: [c for c in records if c["parent"] == r["id"]] for r in records}
    return run, below


def test_as_job_makes_the_driver_a_job_with_its_tools_below_it(tools, base_env, whitelist_file):
    write_tool(tools, "step", 'echo "step $1"\n')
    base_env["ARV_WRAP_LOCAL_CPUS"] = "1"      # 0.1 for the driver + 1 per step: lent
    rules = whitelist_file("tools:\n  - name: step\n    cpus: 1\n")
    script = "step one; step two; exit 3"
    plain = subprocess.run(["bash", "-c", script], env=base_env, stdout=subprocess.PIPE)
    result = arv_wrap("-w", rules, "--as-job", "--", "bash", "-c", script, env=base_env,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (3, plain.stdout, b"")
    run, below = tree_of(base_env)
    [driver] = below[run["id"]]
    assert (driver["argv"], driver["cpus"], driver["state"], driver["exit_status"]) == (
        ["bash", "-c", script], 0.1, "exited", 3)
    steps = below[driver["id"]]
    assert sorted(s["argv"][1] for s in steps) == ["one", "two"]
    assert all(s["state"] == "exited" and s["run"] == run["id"] for s in steps)
    assert (run["state"], run["exit_status"]) == ("exited", 3)


def test_as_job_takes_the_cpus_it_is_given(tools, base_env, whitelist_file):
    rules = whitelist_file("tools:\n  - name: step\n")
    result = arv_wrap("-w", rules, "--as-job", "--cpus", "0.5", "--", "true", env=base_env)
    assert result.returncode == 0
    _, below = tree_of(base_env)
    [driver] = [r for r in jobs(base_env) if r["kind"] == "job"]
    assert driver["cpus"] == 0.5
    bad = arv_wrap("-w", rules, "--as-job", "--cpus", "none", "--", "true", env=base_env,
                   stderr=subprocess.PIPE)
    assert bad.returncode == 2 and bad.stderr.startswith(b"arv-wrap: --cpus")


def test_as_job_of_a_missing_program_is_127(base_env, whitelist_file):
    rules = whitelist_file("tools:\n  - name: step\n")
    result = arv_wrap("-w", rules, "--as-job", "--", "no-such-program-x", env=base_env,
                      stderr=subprocess.PIPE)
    assert result.returncode == 127
    assert result.stderr == b"arv-wrap: no-such-program-x: No such file or directory\n"


def test_verbose_prints_one_line_as_each_job_starts_and_ends(tools, base_env, whitelist_file):
    write_tool(tools, "step", "echo out\n")
    rules = whitelist_file("tools:\n  - name: step\n")
    result = arv_wrap("-w", rules, "-v", "--", "bash", "-c", "step; step", env=base_env,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert result.stdout == b"out\nout\n"
    lines = result.stderr.decode().splitlines()
    assert [line.split()[1] for line in lines] == ["started", "ended", "started", "ended"]
    quiet = arv_wrap("-w", rules, "--", "step", env=base_env, stderr=subprocess.PIPE)
    assert quiet.stderr == b""


def test_an_env_run_ends_when_its_shell_is_gone(tools, base_env, whitelist_file):
    write_tool(tools, "step", "true\n")
    rules = whitelist_file("tools:\n  - name: step\n")
    base_env["ARV_WRAP_WHITELIST"] = rules
    subprocess.run(["bash", "-c", 'eval "$(python3 -m arvwrap env)"; step'], env=base_env,
                   check=True)
    deadline = time.monotonic() + 10
    while True:       # the commands that show records close it (so does the dispatcher)
        [run] = [r for r in jobs(base_env) if r["kind"] == "run"]
        if run["state"] != "running" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert run["state"] == "exited" and run["ended"] and "shell ended" in run["reason"]


def test_the_run_of_a_killed_arv_wrap_is_ended_once_its_jobs_are(tools, base_env,
                                                                   whitelist_file, tmp_path):
    """SIGKILL leaves arv-wrap no moment to record its run's end: the next look at the
    records does it, once the run's last job has ended, and says so."""
    go = tmp_path / "go"
    write_tool(tools, "step", f'while [ ! -e "{go}" ]; do sleep 0.05; done\n')
    rules = whitelist_file("tools:\n  - name: step\n")
    wrapped = subprocess.Popen([sys.executable, "-m", "arvwrap", "-w", rules, "--", "step"],
                               env=base_env)

    def records(kind):
        return [r for r in jobs(base_env) if r["kind"] == kind]
    deadline = time.monotonic() + 20
    while not [r for r in records("job") if r["state"] == "running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    wrapped.kill()
    wrapped.wait()
    [run] = records("run")
    assert run["state"] == "running"           # its job still runs (the client is alive)
    go.touch()
    deadline = time.monotonic() + 20
    while records("job")[0]["state"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [run] = records("run")
    assert (run["state"], run["reason"]) == (
        "failed", "arv-wrap ended before it recorded the run's end (killed?)")
    assert run["ended"] == records("job")[0]["ended"]


def test_an_env_run_stays_running_while_its_shell_lives(tools, base_env, whitelist_file):
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file("tools:\n  - name: step\n")
    shell = subprocess.Popen(["bash", "-c", 'eval "$(python3 -m arvwrap env)"; read x'],
                             env=base_env, stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not [r for r in jobs(base_env) if r["kind"] == "run"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        [run] = [r for r in jobs(base_env) if r["kind"] == "run"]
        assert run["state"] == "running" and run["shell_pid"] == shell.pid
    finally:
        shell.communicate(b"\n", timeout=10)
    [run] = [r for r in jobs(base_env) if r["kind"] == "run"]
    assert run["state"] == "exited"


def test_the_command_inherits_every_descriptor_and_signal_disposition_of_a_direct_run(
        tmp_path, base_env, whitelist_file):
    """What arv-wrap was given goes on to COMMAND: a descriptor not named anywhere,
    and the ignored signals (none that Python or glibc's posix_spawn add)."""
    rules = whitelist_file("tools:\n  - name: step\n")
    wrap = shlex.join([sys.executable, "-m", "arvwrap", "-w", rules, "--"])
    show = "ls /proc/self/fd >&5; grep SigIgn /proc/self/status >&5"
    outputs = {}
    for how, prefix in (("direct", ""), ("wrapped", wrap)):
        out = tmp_path / how
        script = f"exec 5>'{out}'; trap '' HUP; {prefix} sh -c '{show}'"
        assert subprocess.run(["bash", "-c", script], env=base_env).returncode == 0
        outputs[how] = out.read_text()
    fds, sigign = outputs["direct"].split("SigIgn:")
    assert "5" in fds.split() and int(sigign, 16) & 1    # fd 5 and SIGHUP ignored
    assert outputs["wrapped"] == outputs["direct"]


# a and b each wait (up to 5 s) for the other to have started
SUB_MK = """all: a b
a:
\ttouch a.started; for i in $$(seq 250); do [ -e b.started ] && break; sleep 0.02; done; echo a ran
b:
\ttouch b.started; for i in $$(seq 250); do [ -e a.started ] && break; sleep 0.02; done; echo b ran
"""


def test_a_make_recipe_running_arv_wrap_gives_its_sub_make_the_jobserver(
        tmp_path, base_env, whitelist_file):
    """`+arv-wrap -- make` in an outer make -j: the sub-make runs a and b at once,
    which it can only do with the outer make's jobserver descriptors."""
    need("make")
    rules = whitelist_file("tools:\n  - name: step\n")
    wrap = shlex.join([sys.executable, "-m", "arvwrap", "-w", rules, "--"])
    (tmp_path / "sub.mk").write_text(SUB_MK)
    (tmp_path / "outer.mk").write_text(f"all:\n\t+{wrap} $(MAKE) -s -f sub.mk\n")
    result = subprocess.run(["make", "-s", "-j2", "-f", "outer.mk"], cwd=tmp_path, env=base_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert b"jobserver unavailable" not in result.stderr, result.stderr
    assert (result.returncode, result.stderr) == (0, b"")
    assert sorted(result.stdout.split(b"\n")) == [b"", b"a ran", b"b ran"]
    assert (tmp_path / "a.started").exists() and (tmp_path / "b.started").exists()
