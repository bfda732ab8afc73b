"""Local jobs end to end, through the real shim, client and dispatcher: time limits,
signals, cancels, stdin and closed descriptors, and what the records say.

A local job is the client's own child; the dispatcher admits it, steers it through
a pidfd and records how it ended (src/arvwrap/backends/local.py).

In the bash scripts below, a call made in the background is started as
`(trap - INT; exec tool) &`: a non-interactive bash starts background commands with
SIGINT ignored, which the tool (redirected or not) would keep.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import alive as running, arv_wrap, job_records, until, wrapped, write_tool

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _client(client):
    """The client these tests run (rebuilt when its sources are newer)."""


def arv_cmd():
    return [sys.executable, "-m", "arvwrap"]


def direct(env, script, **kwargs):
    """The same bash script without arv-wrap."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(["bash", "-c", script], env=env, timeout=60, **kwargs)


def record_of(env, tool, state=None):
    """The newest record of tool's calls (in state, if given), or None."""
    for r in job_records(env):
        if r["argv"][0] == tool and (state is None or r["state"] == state):
            return r
    return None


def left_running(marker):
    """The pids of live processes whose command line contains marker."""
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if marker.encode() in f.read().replace(b"\0", b" ") and running(int(name)):
                    found.append(int(name))
        except (OSError, ValueError):
            pass
    return found


def nothing_left(marker):
    until(lambda: not left_running(marker), timeout=5, what=f"every {marker!r} to end")


@pytest.fixture
def strays():
    """strays(marker): after the test, kill what is still running with marker in its
    command line (the test's own tools' children, when the test failed)."""
    markers = []
    yield markers.append
    for marker in markers:
        for pid in left_running(marker):
            os.kill(pid, signal.SIGKILL)


def arv_lines(stderr):
    return [line for line in stderr.decode().splitlines() if line.startswith("arv-wrap:")]


@pytest.fixture
def popen(base_env):
    """popen(args...): a Popen of arv-wrap in its own session, killed after the test."""
    procs = []

    def start(*args, **kwargs):
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen([*arv_cmd(), *args], env=base_env, start_new_session=True,
                                **kwargs)
        procs.append(proc)
        return proc
    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- time limits ------------------------------------------------------------------

# Tools with children send their output to /dev/null, so a child left running fails
# the test's own check instead of holding the caller's pipes open.
TREE = "exec >/dev/null 2>&1\n{0} & {0}\n"


def test_a_time_limit_kills_the_tool_with_sigterm_and_says_so_once(tools, base_env,
                                                                   whitelist_file, strays):
    strays("sleep 4301")
    write_tool(tools, "slow", TREE.format("sleep 4301"))
    rules = whitelist_file("tools:\n  - name: slow\n    time: 1s\n")
    start = time.monotonic()
    result = arv_wrap("-w", rules, "--", "slow", env=base_env, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    elapsed = time.monotonic() - start
    assert (result.returncode, result.stdout) == (-signal.SIGTERM, b"")
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("arv-wrap:") and "time limit of 1s" in line
    assert 1 <= elapsed < 4
    record = record_of(base_env, "slow")
    assert (record["state"], record["signal"]) == ("signaled", signal.SIGTERM)
    assert "time limit" in record["reason"]
    nothing_left("sleep 4301")                       # the tool's children too


def test_a_tool_that_ignores_the_time_limits_sigterm_is_killed_after_the_grace(
        tools, base_env, whitelist_file):
    write_tool(tools, "stubborn", "trap '' TERM\nexec sleep 4302 >/dev/null 2>&1\n")
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(
        "tools:\n  - name: stubborn\n    time: 1s\n")
    start = time.monotonic()
    result = wrapped(base_env, "stubborn; echo status=$?")   # bash adds its "Killed" line
    elapsed = time.monotonic() - start
    assert result.stdout == b"status=137\n"
    [line] = arv_lines(result.stderr)
    assert line.startswith("arv-wrap:") and "time limit" in line
    assert 1 + 5 <= elapsed < 1 + 5 + 4
    record = record_of(base_env, "stubborn")
    assert (record["state"], record["signal"]) == ("signaled", signal.SIGKILL)


# -- signals and cancels --------------------------------------------------------------

CATCHER = """trap 'echo got-INT; n=$((n+1))' INT
n=0 i=0
: > "$1"
while [ $n -eq 0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
sleep 0.3
exit 3
"""   # prints got-INT once per INT it gets (waiting at most 10 s for one), exits 3


def test_a_signal_the_caller_sends_reaches_the_tool_exactly_once(tools, base_env,
                                                                 whitelist_file, tmp_path):
    """kill -INT of the redirected call's pid: the tool's trap runs once, as directly."""
    write_tool(tools, "catcher", CATCHER)
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file("tools:\n  - name: catcher\n")
    script = """(trap - INT; exec catcher ready) & pid=$!
                while [ ! -e ready ]; do sleep 0.02; done
                kill -INT $pid; wait $pid; echo status=$?; rm ready"""
    redirected = wrapped(base_env, script, cwd=tmp_path, timeout=30)
    plain = direct(base_env, script, cwd=tmp_path)
    assert plain.stdout == b"got-INT\nstatus=3\n"
    assert (redirected.stdout, redirected.stderr) == (plain.stdout, plain.stderr)
    record = record_of(base_env, "catcher")
    assert (record["state"], record["exit_status"]) == ("exited", 3)


HOG = """: > hog-running
while [ ! -e stop ]; do sleep 0.05; done
"""


def test_ctrl_c_on_a_queued_call_ends_it_silently_as_sigint_would(tools, base_env,
                                                                  whitelist_file, tmp_path,
                                                                  popen):
    write_tool(tools, "hog", HOG)
    write_tool(tools, "later", "echo should-not-run\n")
    base_env["ARV_WRAP_LOCAL_CPUS"] = "1"
    rules = whitelist_file("tools:\n  - name: hog\n    cpus: 1\n  - name: later\n    cpus: 1\n")
    script = """hog & hog=$!
                while [ ! -e hog-running ]; do sleep 0.02; done
                (trap - INT; exec later) & pid=$!
                while [ ! -e go ]; do sleep 0.02; done
                kill -INT $pid; wait $pid; echo status=$?
                : > stop; wait $hog; echo hog=$?"""
    proc = popen("-w", rules, "--", "bash", "-c", script, cwd=tmp_path)
    until(lambda: record_of(base_env, "later", "queued"), what="the second call to queue")
    (tmp_path / "go").touch()
    out, err = proc.communicate(timeout=30)
    assert (out, err) == (b"status=130\nhog=0\n", b"")
    assert record_of(base_env, "later")["state"] == "cancelled"
    assert record_of(base_env, "hog")["state"] == "exited"


def test_arv_wrap_cancel_ends_a_queued_and_a_running_job(tools, base_env, whitelist_file,
                                                         popen, strays):
    strays("sleep 4303")
    write_tool(tools, "slow", TREE.format("sleep 4303"))
    base_env["ARV_WRAP_LOCAL_CPUS"] = "1"
    rules = whitelist_file("tools:\n  - name: slow\n    cpus: 1\n")
    first = popen("-w", rules, "--", "slow")
    running_record = until(lambda: record_of(base_env, "slow", "running"),
                           what="the first call to run")
    second = popen("-w", rules, "--", "slow")
    queued_record = until(lambda: record_of(base_env, "slow", "queued"),
                          what="the second call to queue")

    cancel = subprocess.run([*arv_cmd(), "cancel", queued_record["id"]], env=base_env,
                            stdout=subprocess.PIPE, timeout=30)
    assert cancel.returncode == 0
    assert second.wait(15) == -signal.SIGTERM
    [line] = second.stderr.read().decode().splitlines()
    assert line.startswith("arv-wrap:") and "cancelled while queued" in line
    assert first.poll() is None               # the running job is untouched

    cancel = subprocess.run([*arv_cmd(), "cancel", running_record["id"]], env=base_env,
                            stdout=subprocess.PIPE, timeout=30)
    assert cancel.returncode == 0
    assert first.wait(15) == -signal.SIGTERM
    [line] = first.stderr.read().decode().splitlines()
    assert line.startswith("arv-wrap:") and "cancelled" in line
    nothing_left("sleep 4303")

    states = {r["id"]: r["state"] for r in job_records(base_env)}
    assert states == {running_record["id"]: "cancelled", queued_record["id"]: "cancelled"}


# -- descriptors ------------------------------------------------------------------------

@pytest.mark.parametrize("mode, as_if", [("none", "{ reader </dev/null; cat; }"),
                                         ("auto", "{ reader; cat; }")], ids=["none", "auto"])
def test_stdin_none_gives_the_tool_dev_null_and_leaves_the_callers_stdin_unread(
        tools, base_env, whitelist_file, mode, as_if):
    write_tool(tools, "reader", "cat; echo read-done\n")
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(
        f"tools:\n  - name: reader\n    stdin: {mode}\n")
    feed = "printf 'for the caller\\n' | "
    redirected = wrapped(base_env, feed + "{ reader; cat; }")
    plain = direct(base_env, feed + as_if)
    assert (redirected.stdout, redirected.stderr) == (plain.stdout, plain.stderr)
    if mode == "none":
        assert redirected.stdout == b"read-done\nfor the caller\n"
    assert record_of(base_env, "reader")["state"] == "exited"


FDS = """s=""
for fd in 0 1 2; do
  if [ -e /proc/$$/fd/$fd ]; then s="$s $fd:open"; else s="$s $fd:closed"; fi
done
echo "$s" > "$1"
"""


@pytest.mark.parametrize("closing, fd", [(">&-", 1), ("<&-", 0), ("2>&-", 2)],
                         ids=["stdout", "stdin", "stderr"])
def test_a_descriptor_the_caller_closed_is_closed_in_the_tool_as_directly(
        tools, base_env, whitelist_file, tmp_path, closing, fd):
    write_tool(tools, "fds", FDS)
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file("tools:\n  - name: fds\n")
    redirected = wrapped(base_env, f"fds {tmp_path}/redirected {closing}; echo rc=$? >&2")
    plain = direct(base_env, f"fds {tmp_path}/direct {closing}; echo rc=$? >&2")
    assert (redirected.returncode, redirected.stderr) == (plain.returncode, plain.stderr)
    assert plain.stderr == b"rc=0\n"
    seen = (tmp_path / "redirected").read_text()
    assert seen == (tmp_path / "direct").read_text()
    assert f"{fd}:closed" in seen
    assert record_of(base_env, "fds")["state"] == "exited"


# -- records ------------------------------------------------------------------------------

def test_a_finished_jobs_record_has_its_cpu_seconds_and_max_rss(tools, base_env,
                                                                 whitelist_file):
    write_tool(tools, "idle", "exit 0\n")
    write_tool(tools, "burn", "exec python3 -c 'import time\n"
                              "while time.process_time() < 0.3: pass'\n")
    write_tool(tools, "alloc", "exec python3 -c 'x = bytearray(50 << 20)'\n")
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(
        "tools:\n  - name: idle\n  - name: burn\n  - name: alloc\n")
    result = wrapped(base_env, "idle && burn && alloc")
    assert (result.returncode, result.stderr) == (0, b"")
    idle, burn, alloc = (record_of(base_env, t) for t in ("idle", "burn", "alloc"))
    for r in (idle, burn, alloc):
        assert r["state"] == "exited"
        assert isinstance(r["cpu_seconds"], (int, float)) and r["cpu_seconds"] >= 0
        assert isinstance(r["max_rss"], int) and r["max_rss"] > 0
        assert isinstance(r["queued_seconds"], (int, float)) and r["queued_seconds"] >= 0
    assert burn["cpu_seconds"] >= 0.25 > idle["cpu_seconds"]
    assert alloc["max_rss"] >= 50 * MIB > idle["max_rss"]
    assert alloc["max_rss"] > MIB


def test_queued_seconds_is_the_time_a_call_waited_for_its_cpus(tools, base_env,
                                                                whitelist_file, tmp_path):
    write_tool(tools, "nap", ': > "$2"\nsleep "$1"\n')
    base_env["ARV_WRAP_LOCAL_CPUS"] = "1"
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file("tools:\n  - name: nap\n    cpus: 1\n")
    script = """nap 1 first & first=$!
                while [ ! -e first ]; do sleep 0.02; done
                nap 0 second; wait $first"""
    result = wrapped(base_env, script, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, b"")
    waited = {r["argv"][2]: r["queued_seconds"] for r in job_records(base_env)}
    assert waited["first"] < 0.5
    assert 0.5 <= waited["second"] < 3
