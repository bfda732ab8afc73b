"""The fidelity contract, end to end on the local backend: a redirected tool is
indistinguishable from a local run for the process that exec'd it."""
import hashlib
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import arv_wrap, job_records, wrapped, write_tool

WHITELIST = """
tools:
  - name: probe
  - name: cat
  - name: head
"""

# argv NUL-separated, then cwd, umask, the open-files limit and one variable
PROBE = """
out="$PROBE_OUT"
if [ -n "$out" ]; then
    : > "$out"
    for a in "$0" "$@"; do printf '%s\\0' "$a" >> "$out"; done
    printf 'cwd=%s\\numask=%s\\nnofile=%s\\nvar=%s\\njob=%s\\npreload=%s\\n' \
        "$(pwd)" "$(umask)" "$(ulimit -n)" "$PROBE_VAR" "$ARV_WRAP_JOB" "$LD_PRELOAD" >> "$out"
fi
case "$1" in
    exit) exit "$2" ;;
    kill) kill -"$2" $$ ;;
    sleep) echo started; exec sleep "$2" ;;
    echo) echo "$2" ;;
esac
"""


@pytest.fixture
def env(tools, base_env, whitelist_file):
    write_tool(tools, "probe", PROBE)
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(WHITELIST)
    return base_env


def test_exit_statuses_are_exact(env):
    for status in (0, 1, 42, 255):
        result = wrapped(env, f"probe exit {status}")
        assert result.returncode == status
        assert result.stdout == result.stderr == b""
    assert sorted(r["exit_status"] for r in job_records(env)) == [0, 1, 42, 255]


def test_a_signal_death_is_the_callers_death(env):
    script = "probe kill TERM; echo status=$?"
    result = wrapped(env, script)
    direct = subprocess.run(["bash", "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert result.stdout == direct.stdout == b"status=143\n"
    assert result.stderr == direct.stderr     # bash's own "Terminated", nothing of ours
    [record] = job_records(env)
    assert (record["state"], record["signal"], record["exit_status"]) == ("signaled", 15, None)


def test_argv_bytes_cwd_env_umask_rlimits(env, tmp_path):
    out = tmp_path / "probe.out"
    work = tmp_path / "work dir"
    work.mkdir()
    env.update(PROBE_OUT=str(out), PROBE_VAR="multi\nline 'quoted'")
    args = [b"probe", b"a b", b"'q'", b"\"dq\"", b"new\nline", b"", b"\xff\xfe", b"$HOME"]
    driver = ("import os, resource, subprocess, sys\n"
              "os.umask(0o027)\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (123, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
              f"sys.exit(subprocess.run({args!r}, cwd={str(work)!r}).returncode)\n")
    assert arv_wrap("--", sys.executable, "-c", driver, env=env).returncode == 0
    argv_part, _, rest = out.read_bytes().rpartition(b"\0")
    assert argv_part.split(b"\0")[1:] == args[1:]
    lines = dict(line.split("=", 1) for line in rest.decode().split("\n") if "=" in line)
    assert lines["cwd"] == str(work)
    assert lines["umask"] == "0027"
    assert lines["nofile"] == "123"
    assert "libarvwrap" not in lines["preload"]
    [record] = job_records(env)
    assert lines["job"] == record["id"]
    assert [os.fsencode(a) for a in record["argv"]][1:] == args[1:]
    assert record["cwd"] == str(work)
    assert out.read_bytes().count(b"multi\nline 'quoted'") == 1


def test_100mb_binary_stream_through_stdin_and_stdout(env, tmp_path):
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    with open(src, "wb") as f:
        f.write(os.urandom(100 * 2**20))
    result = wrapped(env, f"cat < '{src}' | cat > '{dst}'")
    assert result.returncode == 0, result.stderr
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert digest(src) == digest(dst)
    assert len(job_records(env)) == 2


def test_stdout_and_stderr_stay_separate_and_in_order(env, tools):
    write_tool(tools, "probe2", "for i in 1 2 3; do echo out$i; echo err$i >&2; done\n")
    env["ARV_WRAP_WHITELIST"] = env["ARV_WRAP_WHITELIST"]
    with open(env["ARV_WRAP_WHITELIST"], "a") as f:
        f.write("  - name: probe2\n")
    result = wrapped(env, "probe2")
    assert result.stdout == b"out1\nout2\nout3\n"
    assert result.stderr == b"err1\nerr2\nerr3\n"


def test_stdout_is_live_to_the_byte(env):
    proc = subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "bash", "-c",
                             "probe sleep 3"], env=env, stdout=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    assert ready, "no output while the job runs"
    assert os.read(proc.stdout.fileno(), 100) == b"started\n"
    assert proc.poll() is None
    proc.wait(20)


def test_partial_line_arrives_before_the_job_ends(env, tools):
    write_tool(tools, "probe3", "printf partial; sleep 3; echo\n")
    with open(env["ARV_WRAP_WHITELIST"], "a") as f:
        f.write("  - name: probe3\n")
    proc = subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "probe3"], env=env,
                            stdout=subprocess.PIPE)
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    assert ready and os.read(proc.stdout.fileno(), 100) == b"partial"
    assert proc.poll() is None
    assert proc.wait(20) == 0


def test_a_tool_that_does_not_read_stdin_leaves_it_unconsumed(env, tmp_path):
    listing = tmp_path / "list"
    listing.write_text("".join(f"line{i}\n" for i in range(20)))
    result = wrapped(env, f"while read f; do probe echo \"$f\"; done < '{listing}'")
    assert result.stdout.decode().split() == [f"line{i}" for i in range(20)]
    result = wrapped(env, f"cat '{listing}' | while read f; do probe echo \"$f\"; done")
    assert result.stdout.decode().split() == [f"line{i}" for i in range(20)]


def test_a_tool_that_reads_stdin_gets_all_of_it(env):
    result = wrapped(env, "seq 1 100000 | cat | head -c 20; seq 5 | cat")
    assert result.stdout == b"1\n2\n3\n4\n5\n6\n7\n8\n9\n10" + b"1\n2\n3\n4\n5\n"


def test_dev_fd_arguments_keep_working(env):
    result = wrapped(env, "cat <(echo from-a-process-substitution) /dev/stdin <<< here")
    assert result.stdout == b"from-a-process-substitution\nhere\n"
    assert result.returncode == 0
    assert len(job_records(env)) == 1


def running(command):
    """Pids of processes whose whole command line is command."""
    return subprocess.run(["pgrep", "-f", f"^{command}$"], stdout=subprocess.PIPE).stdout.split()


def wait_gone(marker, seconds=10):
    deadline = time.monotonic() + seconds
    while running(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not running(marker)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_killing_the_redirected_call_cancels_the_job(env, signum):
    marker = f"{4000 + signum}.5"
    driver = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys; p = subprocess.Popen(['probe', 'sleep', "
                               f"'{marker}'], stdout=subprocess.DEVNULL); print(p.pid, flush=True); print(p.wait())"],
                              env={**env, **activation(env)}, stdout=subprocess.PIPE)
    client_pid = int(driver.stdout.readline())
    deadline = time.monotonic() + 10
    while not running(f"sleep {marker}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running(f"sleep {marker}"), "the job never started"
    os.kill(client_pid, signum)
    assert int(driver.stdout.readline()) == -signum
    driver.wait(15)
    assert wait_gone(f"sleep {marker}", 10), "the job is still running"
    deadline = time.monotonic() + 10
    while job_records(env)[0]["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job_records(env)[0]["state"] in ("signaled", "cancelled")


def activation(env):
    """The variables of `arv-wrap env`, to activate a driver with no arv-wrap above it."""
    out = arv_wrap("env", env=env, stdout=subprocess.PIPE, check=True).stdout.decode()
    pairs = subprocess.run(["bash", "-c", out + "\nenv -0"], stdout=subprocess.PIPE,
                           env={"PATH": env["PATH"]}, check=True).stdout.split(b"\0")
    return {k: v for k, _, v in (p.decode().partition("=") for p in pairs if p)
            if k.startswith("ARV_WRAP_") or k == "LD_PRELOAD"}
