"""The dispatcher under faults and load (issue 8, points 2 to 5), with real processes:
a dispatcher killed under a running job, a killed call, garbage and strangers on its
socket, 1000 calls in flight, a state dir that cannot be written."""
import os
import random
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from arvwrap import paths
from conftest import (ON_CI, alive, arv_wrap, job_records, need, until as wait_until, wrapped,
                      write_tool)

ARV = [sys.executable, "-m", "arvwrap"]
NOBODY = 65534
WHITELIST = """
tools:
  - name: warm
  - name: hold
  - name: slow
  - name: mark
  - name: whoami-tool
  - name: nap
  - name: count
"""


@pytest.fixture
def env(tools, base_env, whitelist_file):
    write_tool(tools, "warm", "echo warm\n")
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(WHITELIST)
    return base_env


def call(env):
    """One redirected call that must work; the pid of the dispatcher that served it."""
    result = arv_wrap("--", "warm", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"warm\n", b"")
    [pid] = dispatcher_pids(env)
    return pid


def dispatcher_pids(env):
    sock = paths.socket_path(env)
    out = subprocess.run(["pgrep", "-f", f"arvwrap.dispatcher --socket {sock}"],
                         stdout=subprocess.PIPE, text=True).stdout
    return [int(pid) for pid in out.split()]


def stop_dispatchers(env):
    """End the dispatchers this test started (those the state_dir fixture cannot find)."""
    pids = dispatcher_pids(env)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not any(alive(p) for p in pids), 10, "the dispatcher to leave")
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def need_root():
    if os.geteuid() != 0:
        if ON_CI:
            pytest.fail("this test must run as root on CI")
        pytest.skip("needs root")


def pids_of(command):
    """Pids of the processes whose whole command line is command."""
    out = subprocess.run(["pgrep", "-xf", command], stdout=subprocess.PIPE).stdout
    return [int(pid) for pid in out.split()]


def read_line(stream, seconds=10):
    ready, _, _ = select.select([stream], [], [], seconds)
    assert ready, "no output in time"
    return stream.readline()


HOLD = """echo started > '{started}'
i=0
while [ ! -e '{go}' ]; do
    i=$((i + 1)); [ $i -lt 400 ] || {{ echo never told to go >&2; exit 1; }}
    sleep 0.05
done
echo finished
exit 7
"""


def test_a_running_job_outlives_a_killed_dispatcher_and_its_caller_gets_its_status(
        env, tools, tmp_path):
    started, go = tmp_path / "started", tmp_path / "go"
    write_tool(tools, "hold", HOLD.format(started=started, go=go))
    first = call(env)
    proc = subprocess.Popen([*ARV, "--", "hold"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_until(started.exists, what="the job to start")
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: not alive(first), what="the dispatcher to die")
        go.touch()
        out, err = proc.communicate(timeout=30)
    finally:
        go.touch()
        if proc.poll() is None:
            proc.kill()
    assert (proc.returncode, out, err) == (7, b"finished\n", b"")
    assert call(env) != first                    # the next call started a new dispatcher


def test_sigkill_of_the_call_leaves_nothing_running_and_spares_the_caller(env, tools):
    write_tool(tools, "slow", "exec sleep 4243.5\n")
    call(env)
    script = 'slow & echo "call=$!"; wait $!; echo "status=$?"'
    proc = subprocess.Popen([*ARV, "--", "bash", "-c", script], env=env, bufsize=0,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        call_pid = int(read_line(proc.stdout).split(b"=")[1])
        wait_until(lambda: pids_of("sleep 4243.5"), what="the tool to start")
        os.kill(call_pid, signal.SIGKILL)
        assert read_line(proc.stdout) == b"status=137\n"
        assert proc.wait(15) == 0                # the caller itself was not hit
        wait_until(lambda: not pids_of("sleep 4243.5"), what="the tool to go")
    finally:
        for pid in pids_of("sleep 4243.5"):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


GARBAGE = {
    "random-bytes": b"\xff" + random.Random(8).randbytes(4095),
    "truncated-header": b"AWR1\x10\x00",
    "huge-length": b"AWR1" + struct.pack("<Q", 2**63),
    "header-then-close": b"AWR1" + struct.pack("<Q", 100) + b"R0\0",
}
ABOUT_IT = re.compile(r"request|connection|protocol|header|magic|payload|peer|uid", re.I)


def closed_by_peer(sock, seconds=10):
    """Read until the other end closes; what it sent."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def new_log_lines(log, before):
    wait_until(lambda: log.stat().st_size > before, 5, "a line in dispatcher.log")
    with open(log, "rb") as f:
        f.seek(before)
        return f.read().decode(errors="replace")


@pytest.mark.parametrize("what", GARBAGE)
def test_garbage_on_the_socket_is_logged_and_dropped_and_the_dispatcher_serves_on(env, what):
    pid = call(env)
    log = Path(paths.state_dir(env)) / "dispatcher.log"
    before = log.stat().st_size
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(paths.socket_path(env))
        try:
            s.sendall(GARBAGE[what])
            if what != "header-then-close":
                s.shutdown(socket.SHUT_WR)
                closed_by_peer(s)                # the dispatcher hangs up
        except (BrokenPipeError, ConnectionResetError):
            pass                                 # it hung up before we were done
    assert ABOUT_IT.search(new_log_lines(log, before))
    assert call(env) == pid


def request(path, argv, environ, cwd):
    """A request as docs/internals.md (section 4) describes it, without descriptors."""
    fields = [b"R0", b"P" + path, *(b"A" + a for a in argv), *(b"E" + e for e in environ),
              b"C" + cwd, b"U18", b"I%d" % os.getpid()]
    payload = b"".join(f + b"\0" for f in fields)
    return b"AWR1" + struct.pack("<Q", len(payload)) + payload


def as_nobody(sock_path, data):
    """Connect as uid and gid 65534 with no groups, send data and read until closed:
    b"closed " + what came back, or the error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(sock_path)
                try:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass        # it hung up before we were done (refused at accept)
                os.write(w, b"closed " + closed_by_peer(s))
        except BaseException as e:
            os.write(w, repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as answer:
        got = answer.read()
    os.waitpid(pid, 0)
    return got


@pytest.fixture
def runtime_dir(env):
    """An XDG_RUNTIME_DIR of our own that uid 65534 may pass through."""
    xdg = tempfile.mkdtemp(prefix="arvwrap-xdg-")
    os.chmod(xdg, 0o711)
    env["XDG_RUNTIME_DIR"] = xdg
    yield xdg
    stop_dispatchers(env)
    shutil.rmtree(xdg, ignore_errors=True)


def test_a_strangers_connection_is_refused_and_logged_and_the_dispatcher_serves_on(
        env, tools, tmp_path, runtime_dir):
    need_root()
    marker = tmp_path / "marker"
    tool = write_tool(tools, "mark", f"touch '{marker}'\n")
    pid = call(env)
    log = Path(paths.state_dir(env)) / "dispatcher.log"
    before = log.stat().st_size
    sock = paths.socket_path(env)
    environ = [os.fsencode(f"{k}={env[k]}") for k in ("PATH", "ARV_WRAP_WHITELIST",
                                                       "ARV_WRAP_STATE_DIR")]
    mode = os.stat(sock).st_mode & 0o777
    try:
        os.chmod(os.path.dirname(sock), 0o711)
        os.chmod(sock, 0o777)
        answer = as_nobody(sock, request(os.fsencode(tool), [b"mark"], environ, b"/"))
    finally:
        os.chmod(sock, mode)
        os.chmod(os.path.dirname(sock), 0o700)
    assert answer.startswith(b"closed "), answer
    assert not re.search(rb"^(exit|job|signal|local)\b", answer[7:], re.M), answer
    assert ABOUT_IT.search(new_log_lines(log, before))
    assert not marker.exists()
    assert [r["argv"][0] for r in job_records(env)] == ["warm"]
    assert call(env) == pid


def test_a_caller_that_became_another_user_runs_its_tool_as_that_user_with_one_warning(env):
    """The dispatcher is the caller's identity: root's does not serve uid 65534, who has
    no usable state dir here, so the tool runs locally, as 65534, with one warning."""
    need_root()
    need("setpriv")
    public = tempfile.mkdtemp(prefix="arvwrap-public-")   # a PATH dir 65534 can search
    had_runtime = os.path.exists(f"/tmp/arv-wrap-{NOBODY}")
    try:
        os.chmod(public, 0o755)
        write_tool(public, "whoami-tool", "id -u\nexit 4\n")
        env["PATH"] = f"{public}:{env['PATH']}"
        call(env)
        script = f"setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups whoami-tool"
        result = wrapped(env, script)
        plain = subprocess.run(["bash", "-c", script], env=env, stdout=subprocess.PIPE)
    finally:
        shutil.rmtree(public)
        if not had_runtime:
            shutil.rmtree(f"/tmp/arv-wrap-{NOBODY}", ignore_errors=True)
    assert (plain.returncode, plain.stdout) == (4, b"65534\n")
    assert (result.returncode, result.stdout) == (plain.returncode, plain.stdout)
    # ld.so's own complaint, when the new uid cannot read arv-wrap's install dir
    # (root's 0700 home here), that it cannot preload the shim into our client
    [line] = [line for line in result.stderr.decode().splitlines()
              if "cannot be preloaded" not in line]
    assert line.startswith("arv-wrap: ")
    assert [r["argv"][0] for r in job_records(env)] == ["warm"]


@pytest.fixture
def many_files():
    """Enough descriptors for 1000 calls in flight (the dispatcher inherits them)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def zombies_of(pid):
    found = []
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state == "Z" and int(ppid) == pid:
            found.append(int(name))
    return found


def threads_of(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(re.search(r"^Threads:\s+(\d+)", f.read(), re.M)[1])
    except (OSError, TypeError):
        return 0


THOUSAND = """pids=()
for i in $(seq 1000); do nap & pids+=($!); done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
echo "failed=$failed"
"""


def test_a_thousand_calls_in_flight_each_run_once_and_succeed(env, tools, tmp_path, many_files):
    counter = tmp_path / "counter"
    write_tool(tools, "nap", f"echo $$ >> '{counter}'\nsleep 1.5\n")
    env["ARV_WRAP_LOCAL_CPUS"] = "2000"          # read when the dispatcher starts
    pid = call(env)
    stderr = open(tmp_path / "stderr", "w+b")
    proc = subprocess.Popen([*ARV, "--", "bash", "-c", THOUSAND], env=env,
                            stdout=subprocess.PIPE, stderr=stderr, start_new_session=True)
    threads, deadline = 0, time.monotonic() + 180
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            threads = max(threads, threads_of(pid))
            time.sleep(0.1)
        out, _ = proc.communicate(timeout=1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stderr.seek(0)
    assert (proc.returncode, out, stderr.read()[:2000]) == (0, b"failed=0\n", b"")
    assert len(counter.read_text().splitlines()) == 1000      # each ran exactly once
    naps = [r for r in job_records(env) if r["argv"][0] == "nap"]
    assert len(naps) == 1000
    assert {(r["state"], r["exit_status"]) for r in naps} == {("exited", 0)}
    assert threads < 50, f"{threads} dispatcher threads for 1000 calls"
    wait_until(lambda: not zombies_of(pid), 5, "the zombies under the dispatcher to go")
    assert dispatcher_pids(env) == [pid]


def activation(env):
    """The variables `arv-wrap env` exports (it writes the run record)."""
    out = arv_wrap("env", env=env, stdout=subprocess.PIPE, check=True).stdout.decode()
    return dict(shlex.split(line)[1].split("=", 1) for line in out.splitlines())


def fill(mnt):
    subprocess.run(["dd", "if=/dev/zero", f"of={mnt}/filler", "bs=4k"],
                   stderr=subprocess.DEVNULL)
    assert shutil.disk_usage(mnt).free == 0


def read_only(mnt):
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)


THE_PROBLEM = re.compile(r"no space|full|read-only|readonly|not writable|cannot write", re.I)


@pytest.mark.parametrize("breakage", ["full", "read-only"])
def test_a_state_dir_that_cannot_be_written_gives_one_line_and_never_runs_the_tool_twice(
        env, tools, tmp_path, small_tmpfs, breakage):
    """full: the disk fills under a running dispatcher; read-only: a dispatcher must
    start on a state dir that became read-only (a tmpfs with files open for writing
    cannot be remounted read-only)."""
    env["ARV_WRAP_STATE_DIR"] = str(small_tmpfs / "state")
    counter = tmp_path / "counter"
    write_tool(tools, "count", f"echo ran >> '{counter}'\nexit 3\n")
    active = {**env, **activation(env)}
    run = lambda command: subprocess.run(["bash", "-c", command], env=active,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, timeout=60)
    try:
        if breakage == "full":
            assert run("warm").stdout == b"warm\n" and dispatcher_pids(env)
            fill(small_tmpfs)
        else:
            read_only(small_tmpfs)
        result = run("count")
    finally:
        stop_dispatchers(env)
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr
    [line] = stderr.splitlines()
    assert line.startswith("arv-wrap: ") and THE_PROBLEM.search(line), line
    ran = len(counter.read_text().splitlines()) if counter.exists() else 0
    assert ran in (0, 1)
    assert result.returncode == (125 if ran == 0 else 3)


def test_arv_wrap_on_a_full_state_dir_says_so_in_one_line(env, small_tmpfs):
    """The run record cannot be written: nothing runs, one line, exit 125."""
    env["ARV_WRAP_STATE_DIR"] = str(small_tmpfs / "state")
    fill(small_tmpfs)
    result = arv_wrap("--", "true", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    [line] = result.stderr.decode().splitlines()
    assert result.returncode == 125
    assert line.startswith("arv-wrap: ") and THE_PROBLEM.search(line), line
