"""The real compiled arv-wrap-client against test doubles of the dispatcher.

A "scripted dispatcher" here is a small Python server in the test, bound where the
client looks for the dispatcher (paths.socket_path), that reads the request with the
real arvwrap.protocol and then answers with scripted lines. For cold starts,
ARV_WRAP_PYTHON points to a fake dispatcher script that records how it was started.
"""
import json
import os
import re
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from arvwrap import paths, protocol
from conftest import ON_CI, poll as wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")


@pytest.fixture
def runtime():
    """A short XDG_RUNTIME_DIR (sun_path holds 107 bytes), removed afterwards."""
    path = tempfile.mkdtemp(prefix="aw-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(base_env, runtime):
    """ARV_WRAP_PYTHON fails, so a client that misses our socket never starts a real
    dispatcher."""
    env = dict(base_env, XDG_RUNTIME_DIR=runtime, ARV_WRAP_PYTHON="/bin/false")
    env.pop("LD_PRELOAD", None)
    return env


class ScriptedDispatcher:
    """Test double for the dispatcher: serves one connection with script(conn, request)."""

    def __init__(self, env, script):
        self.path = paths.socket_path(env)
        paths.private_dir(os.path.dirname(self.path))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.listener.settimeout(20)
        self.script = script
        self.request = self.error = self.state = None
        self.got_request = threading.Event()
        self.signals = []
        self.saw_eof = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
            with conn:
                self.request = protocol.read_request(conn)
                self.request.close()
                self.got_request.set()
                self.script(conn, self)
        except Exception as e:
            self.error = e

    def wait_signal(self, conn, answer=True):
        """Read control lines until a forwarded signal (or EOF); answer `signal N`."""
        reader = protocol.ControlReader(conn)
        while not reader.eof and not self.signals:
            self.signals += reader.read()
        self.saw_eof = reader.eof
        if self.signals and answer:
            protocol.send_signal(conn, self.signals[0])

    def join(self):
        self.thread.join(20)
        self.listener.close()
        os.unlink(self.path)
        if self.error:
            raise self.error


def reply(*lines):
    def script(conn, _server):
        for line in lines:
            protocol.send_line(conn, line)
    return script


def run_client(client, env, *argv, path="/bin/true", **kw):
    kw.setdefault("timeout", 30)
    return subprocess.run([client, "--shim", "0", path, *argv], env=env,
                          capture_output=True, **kw)


# ---------------------------------------------------------------- final replies

@pytest.mark.parametrize("status", [0, 1, 42, 255])
def test_client_with_scripted_dispatcher_exits_with_the_status(client, env, status):
    server = ScriptedDispatcher(env, reply("job j-123", f"exit {status}"))
    proc = run_client(client, env, "true")
    server.join()
    assert proc.returncode == status
    assert proc.stdout == proc.stderr == b""
    assert server.request.argv == [b"true"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_client_with_scripted_dispatcher_dies_of_the_signal(client, env, signum):
    server = ScriptedDispatcher(env, reply(f"signal {signum} job killed: time limit"))
    proc = run_client(client, env, "true")
    server.join()
    assert proc.returncode == -signum
    assert proc.stderr == b"arv-wrap: job killed: time limit\n"


def test_client_with_scripted_dispatcher_dies_of_signal_without_core_or_text(client, env, tmp_path):
    """SIGQUIT dumps core by default and is one the client forwards (so it has a handler):
    the client must reset it and must not dump core even where core dumps are enabled."""
    with open("/proc/sys/kernel/core_pattern") as f:
        piped = f.read().startswith("|")
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    server = ScriptedDispatcher(env, reply("signal 3"))
    proc = subprocess.Popen([client, "--shim", "0", "/bin/true", "true"], env=env, cwd=tmp_path,
                            stderr=subprocess.PIPE,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (hard, hard)))
    _, status = os.waitpid(proc.pid, 0)
    server.join()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGQUIT
    assert proc.stderr.read() == b""
    if not piped:
        assert not os.WCOREDUMP(status)
        assert not [p for p in os.listdir(tmp_path) if p.startswith("core")]


def test_client_with_scripted_dispatcher_fail_is_125_and_one_line(client, env):
    server = ScriptedDispatcher(env, reply("fail the slurm backend is unreachable"))
    proc = run_client(client, env, "true")
    server.join()
    assert proc.returncode == 125
    assert proc.stderr == b"arv-wrap: the slurm backend is unreachable\n"
    assert proc.stdout == b""


def test_client_with_scripted_dispatcher_eof_is_125(client, env):
    server = ScriptedDispatcher(env, reply())
    proc = run_client(client, env, "true")
    server.join()
    assert proc.returncode == 125
    assert proc.stderr == b"arv-wrap: lost the dispatcher\n"


def test_client_with_scripted_dispatcher_bad_final_line_is_125(client, env):
    server = ScriptedDispatcher(env, reply("some future line", "exit 256"))
    proc = run_client(client, env, "true")
    server.join()
    assert proc.returncode == 125
    assert proc.stderr == b"arv-wrap: bad reply from the dispatcher: exit 256\n"


def test_client_with_scripted_dispatcher_replies_split_across_writes(client, env):
    def script(conn, _server):
        for chunk in (b"wa", b"rn one\nwarn t", b"wo\nex", b"it 9\n"):
            conn.sendall(chunk)
            time.sleep(0.01)
    server = ScriptedDispatcher(env, script)
    proc = run_client(client, env, "true")
    server.join()
    assert (proc.returncode, proc.stderr) == (9, b"arv-wrap: one\narv-wrap: two\n")


def test_client_with_scripted_dispatcher_and_closed_stderr_writes_nothing_elsewhere(client, env):
    """With fds 1 and 2 closed, our own socket gets number 2: warnings must not go into it."""
    def script(conn, server):
        protocol.send_line(conn, "warn nobody hears this")
        protocol.send_line(conn, "exit 3")
        server.rest = b"".join(iter(lambda: conn.recv(4096), b""))
    server = ScriptedDispatcher(env, script)
    proc = subprocess.run([client, "--shim", "0", "/bin/true", "true"], env=env,
                          preexec_fn=lambda: os.closerange(1, 3), timeout=30)
    server.join()
    assert proc.returncode == 3
    assert server.rest == b""


# ---------------------------------------------------------------- local

def test_client_with_scripted_dispatcher_warn_then_local_runs_the_tool_here(client, env):
    server = ScriptedDispatcher(env, reply("warn no backend; running echo locally", "local"))
    proc = run_client(client, env, "echo", "a  b", "new\nline", "", "\xff-ish",
                      path="/bin/echo")
    server.join()
    assert proc.returncode == 0
    assert proc.stdout == "a  b new\nline  \xff-ish\n".encode()
    assert proc.stderr == b"arv-wrap: no backend; running echo locally\n"


def test_client_with_scripted_dispatcher_local_keeps_env_and_leaks_no_fd(client, env):
    server = ScriptedDispatcher(env, reply("local"))
    env = dict(env, ODD="x\ny")
    proc = run_client(client, env, "env", "-0", path="/usr/bin/env")
    server.join()
    assert proc.returncode == 0
    assert proc.stdout == b"".join(f"{k}={v}\0".encode() for k, v in env.items())
    # our socket and cwd handle are close-on-exec: ls sees fds 0-2 and its own dir fd
    server = ScriptedDispatcher(env, reply("local"))
    proc = run_client(client, env, "ls", "/proc/self/fd", path=shutil.which("ls"))
    server.join()
    assert proc.stdout.split() == [b"0", b"1", b"2", b"3"]


@pytest.mark.parametrize("make, status, why", [
    (lambda d: None, 127, "No such file or directory"),
    (lambda d: (d / "tool").write_text("#!/bin/sh\n"), 126, "Permission denied"),
])
def test_client_with_scripted_dispatcher_local_exec_failure(client, env, tmp_path, make, status, why):
    make(tmp_path)
    tool = str(tmp_path / "tool")
    server = ScriptedDispatcher(env, reply("local"))
    proc = run_client(client, env, "tool", path=tool)
    server.join()
    assert proc.returncode == status
    assert proc.stderr == f"arv-wrap: {tool}: {why}\n".encode()


# ---------------------------------------------------------------- signals

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                    signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2])
def test_client_with_scripted_dispatcher_forwards_signals(client, env, signum):
    server = ScriptedDispatcher(env, lambda conn, s: s.wait_signal(conn))
    proc = subprocess.Popen([client, "--shim", "0", "/bin/true", "true"], env=env,
                            stderr=subprocess.PIPE)
    assert server.got_request.wait(20)
    proc.send_signal(signum)            # the request was read: forwarding is in place
    assert proc.wait(20) == -signum
    server.join()
    assert server.signals == [signum]
    assert proc.stderr.read() == b""


def test_client_with_scripted_dispatcher_leaves_ignored_signals_ignored(client, env):
    """A caller that ignores SIGINT (e.g. `tool &` in a script): the tool would ignore
    it too, so the client must not forward it."""
    server = ScriptedDispatcher(env, lambda conn, s: s.wait_signal(conn))
    proc = subprocess.Popen([client, "--shim", "0", "/bin/true", "true"], env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert server.got_request.wait(20)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == -signal.SIGTERM
    server.join()
    assert server.signals == [signal.SIGTERM]


def status_sigsets(preexec):
    """(SigIgn, SigBlk) of a process exec'd directly after preexec, as bitmasks."""
    out = subprocess.run(["cat", "/proc/self/status"], preexec_fn=preexec,
                         capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)
    return int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)


@pytest.mark.parametrize("nice", [5, -1])
def test_client_sends_the_callers_nice_ignored_and_blocked_signals(client, env, nice):
    """What a remote backend must rebuild: nohup's SIGHUP (and another ignored one), a
    blocked SIGUSR1 and real-time signal, and nice -1, a valid value that getpriority
    also returns on failure. They are the caller's, not changed by the client's own
    handlers."""
    if nice < 0 and os.geteuid() != 0:
        pytest.skip("a negative nice needs privilege")
    rt = signal.SIGRTMIN + 3

    def preexec():
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, rt})

    ignored, blocked = status_sigsets(preexec)
    assert ignored & 1 << (signal.SIGHUP - 1) and blocked & 1 << (rt - 1)
    server = ScriptedDispatcher(env, ask_state)
    proc = subprocess.run([client, "--shim", "0", "/bin/true", "true"], env=env,
                          preexec_fn=preexec, timeout=30)
    server.join()
    assert proc.returncode == 0
    assert server.request.state_left_out     # a local job inherits it: sent only when asked
    state = server.state
    assert (state.nice, state.ignored_signals, state.blocked_signals) == (nice, ignored, blocked)
    assert dict((r, (soft, hard)) for r, soft, hard in state.rlimits) == \
        {r: resource.getrlimit(r) for r in range(resource.RLIMIT_RTTIME + 1)}


def ask_state(conn, server):
    """Ask for the caller's process state, as the dispatcher does for a remote job."""
    conn.sendall(protocol.STATE_QUERY)
    reader = protocol.ControlReader(conn)
    while not reader.eof and server.state is None:
        server.state = next((m for m in reader.read() if isinstance(m, protocol.ProcessState)),
                            None)
    protocol.send_exit(conn, 0)


def test_client_with_scripted_dispatcher_sees_eof_when_client_is_killed(client, env):
    server = ScriptedDispatcher(env, lambda conn, s: s.wait_signal(conn))
    proc = subprocess.Popen([client, "--shim", "0", "/bin/true", "true"], env=env)
    assert server.got_request.wait(20)
    proc.kill()
    proc.wait(20)
    server.join()
    assert server.saw_eof and server.signals == []


# ---------------------------------------------------------------- cold start

FAKE_DISPATCHER = r'''#!{python}
"""Fake dispatcher: records how it was started, then answers `exit 7` to every call."""
import json, os, signal, socket, sys, time
sys.path.insert(0, {src!r})
from arvwrap import protocol
args = sys.argv[1:]
open_fds = []
for fd in range(256):
    try:
        os.fstat(fd)
        open_fds.append(fd)
    except OSError:
        pass
record = dict(args=args, pid=os.getpid(), sid=os.getsid(0), fds=open_fds,
              stdio=[os.readlink(f"/proc/self/fd/{{i}}") for i in range(3)],
              ld_preload=os.environ.get("LD_PRELOAD"), cwd=os.getcwd(),
              sigint=str(signal.getsignal(signal.SIGINT)),
              blocked=sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
with open({log!r}, "a") as f:
    f.write(json.dumps(record) + "\n")
if {die!r}:
    sys.exit(1)
time.sleep(0.3)                     # let concurrent clients pile up on the lock
sock = args[args.index("--socket") + 1]
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sock)
listener.listen(64)
listener.settimeout(3)
while True:
    try:
        conn, _ = listener.accept()
    except socket.timeout:
        break
    with conn:
        protocol.read_request(conn).close()
        protocol.send_line(conn, "exit 7")
os.unlink(sock)
'''


@pytest.fixture
def fake_dispatcher(tmp_path):
    """make(die=False) -> (script path, log path); kills what it started afterwards."""
    logs = []

    def make(die=False):
        log = tmp_path / f"starts{len(logs)}.jsonl"
        script = tmp_path / f"fake-python{len(logs)}"
        script.write_text(FAKE_DISPATCHER.format(python=sys.executable, src=SRC,
                                                 log=str(log), die=die))
        script.chmod(0o755)
        logs.append(log)
        return str(script), log

    yield make
    for log in logs:
        for record in read_log(log):
            try:
                os.kill(record["pid"], signal.SIGTERM)
            except ProcessLookupError:
                pass


def read_log(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def empty_libs(tmp_path):
    """Two harmless preloadable libraries: a stand-in shim (libarvwrap.so) and another."""
    (tmp_path / "empty.c").write_text("int arvwrap_test_empty;\n")
    libs = []
    for name in ("libarvwrap.so", "libother.so"):
        path = tmp_path / "lib" / name
        path.parent.mkdir(exist_ok=True)
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(path), str(tmp_path / "empty.c")],
                       check=True)
        libs.append(str(path))
    return libs


def state_env(kind, base, tmp_path):
    """Each way the state dir can be given; returns (env, the state dir paths.py computes)."""
    env = {k: v for k, v in base.items() if k not in ("ARV_WRAP_STATE_DIR", "XDG_STATE_HOME")}
    if kind == "state-dir":
        env["ARV_WRAP_STATE_DIR"] = f"{tmp_path}//st/./x/../dir/"
    elif kind == "relative":
        env["ARV_WRAP_STATE_DIR"] = "rel/state"
        return env, paths.state_dir({"ARV_WRAP_STATE_DIR": f"{tmp_path}/rel/state"})
    elif kind == "xdg":
        env["XDG_STATE_HOME"] = f"{tmp_path}/xdg/"
    else:
        env["HOME"] = f"{tmp_path}/home"
    return env, paths.state_dir(env)


@pytest.mark.parametrize("kind", ["state-dir", "relative", "xdg", "home"])
def test_client_cold_start_launches_a_clean_daemon_at_the_computed_socket(
        client, env, tmp_path, fake_dispatcher, empty_libs, kind):
    script, log = fake_dispatcher()
    shim, other = empty_libs
    env, state = state_env(kind, env, tmp_path)
    env.update(ARV_WRAP_PYTHON=script, ARV_WRAP_SHIM=shim, LD_PRELOAD=f"{shim} {other}")
    proc = run_client(client, env, "true", cwd=tmp_path,
                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert (proc.returncode, proc.stderr) == (7, b"")
    [record] = read_log(log)
    assert record["args"][:6] == ["-m", "arvwrap.dispatcher", "--socket",
                                  paths.socket_path(dict(env, ARV_WRAP_STATE_DIR=state)),
                                  "--state-dir", state]
    assert record["args"][6] == "--report-fd"    # the one descriptor it inherits
    assert record["sid"] != os.getsid(0)
    assert record["stdio"] == ["/dev/null"] * 3
    assert record["fds"] == [0, 1, 2, int(record["args"][7])]
    assert record["ld_preload"] == other
    assert record["cwd"] == "/"
    assert "default_int_handler" in record["sigint"]     # not inherited SIG_IGN
    assert record["blocked"] == []
    runtime_dir = os.path.dirname(record["args"][3])
    assert stat.S_IMODE(os.stat(runtime_dir).st_mode) == 0o700


def test_client_cold_start_removes_ld_preload_holding_only_the_shim(
        client, env, fake_dispatcher, empty_libs):
    script, log = fake_dispatcher()
    env.update(ARV_WRAP_PYTHON=script, ARV_WRAP_SHIM=empty_libs[0], LD_PRELOAD=empty_libs[0])
    assert run_client(client, env, "true").returncode == 7
    assert read_log(log)[0]["ld_preload"] is None


def test_client_concurrent_cold_starts_start_one_dispatcher(client, env, fake_dispatcher):
    script, log = fake_dispatcher()
    env["ARV_WRAP_PYTHON"] = script
    procs = [subprocess.Popen([client, "--shim", "0", "/bin/true", "true"], env=env,
                              stderr=subprocess.PIPE) for _ in range(5)]
    assert [p.wait(30) for p in procs] == [7] * 5
    assert [p.stderr.read() for p in procs] == [b""] * 5
    assert len(read_log(log)) == 1


def test_client_cold_start_replaces_a_stale_socket(client, env, fake_dispatcher):
    script, log = fake_dispatcher()
    env["ARV_WRAP_PYTHON"] = script
    stale = paths.socket_path(env)
    paths.private_dir(os.path.dirname(stale))
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()                                   # the file stays: ECONNREFUSED
    assert run_client(client, env, "true").returncode == 7
    assert len(read_log(log)) == 1


def test_client_cold_start_fails_fast_when_python_cannot_run(client, env):
    env["ARV_WRAP_PYTHON"] = "/nonexistent/python3"
    started = time.monotonic()
    proc = run_client(client, env, "true")
    assert time.monotonic() - started < 5
    assert proc.returncode == 125
    assert proc.stderr == b"arv-wrap: cannot run /nonexistent/python3: No such file or directory\n"


def test_client_cold_start_fails_fast_when_the_dispatcher_dies(client, env, fake_dispatcher):
    script, log = fake_dispatcher(die=True)
    env["ARV_WRAP_PYTHON"] = script
    started = time.monotonic()
    proc = run_client(client, env, "true")
    assert time.monotonic() - started < 5
    assert proc.returncode == 125
    assert proc.stderr.startswith(b"arv-wrap: the dispatcher (") and proc.stderr.count(b"\n") == 1


def test_client_refuses_a_runtime_dir_others_can_enter(client, env):
    runtime_dir = os.path.dirname(paths.socket_path(env))
    os.mkdir(runtime_dir, 0o755)
    os.chmod(runtime_dir, 0o755)
    proc = run_client(client, env, "true")
    assert proc.returncode == 125
    assert proc.stderr.startswith(b"arv-wrap: refusing " + runtime_dir.encode())


# ---------------------------------------------------------------- probe, --exec, usage

def test_client_probe_mode_appends_records_without_a_dispatcher(client, env, tmp_path):
    probe = tmp_path / "probe"
    env["ARV_WRAP_PROBE"] = str(probe)
    for args in (["true", "a b", ""], ["x\ny"]):
        proc = subprocess.run([client, "--shim", "3", "/bin/true", *args], env=env,
                              capture_output=True, timeout=10)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    assert probe.read_bytes() == b"3\0/bin/true\0true\0a b\0\0\n3\0/bin/true\0x\ny\0\n"
    assert not os.path.exists(paths.socket_path(env))


def test_client_exec_mode_runs_the_command(helper, env):
    proc = subprocess.run([helper, "--exec", "echo", "hi  there"], env=env, capture_output=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"hi  there\n", b"")


def test_client_exec_mode_enoent_is_127(helper, env):
    proc = subprocess.run([helper, "--exec", "no-such-arvwrap-cmd"], env=env, capture_output=True)
    assert proc.returncode == 127
    assert proc.stderr == b"arv-wrap: no-such-arvwrap-cmd: No such file or directory\n"


def test_client_exec_mode_eacces_is_126(helper, env, tmp_path):
    tool = tmp_path / "not-executable"
    tool.write_text("#!/bin/sh\n")
    proc = subprocess.run([helper, "--exec", str(tool)], env=env, capture_output=True)
    assert proc.returncode == 126
    assert proc.stderr == f"arv-wrap: {tool}: Permission denied\n".encode()


@pytest.mark.parametrize("args", [[], ["--shim"], ["--shim", "0"], ["--shim", "x", "/bin/true"],
                                  ["--exec", "true"], ["--bogus", "a", "b"]])
def test_client_usage_errors_exit_2(client, env, args):
    proc = subprocess.run([client, *args], env=env, capture_output=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(b"usage: arv-wrap-")


@pytest.mark.parametrize("args", [[], ["--exec"], ["--relay", "a"], ["--shim", "0", "/bin/true"]])
def test_helper_usage_errors_exit_2(helper, env, args):
    proc = subprocess.run([helper, *args], env=env, capture_output=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(b"usage: arv-wrap-helper")


def test_the_client_is_static_where_the_system_allows_and_the_helper_dynamic(client, helper):
    """The client runs once per call (no dynamic loading); the helper needs the shim."""
    def interpreter(path):
        with open(path, "rb") as f:
            return b".interp" in f.read()   # the section naming ld.so, in dynamic programs
    assert interpreter(helper)
    static_libc = subprocess.run(["cc", "-print-file-name=libc.a"], capture_output=True,
                                 text=True).stdout.strip()
    if os.path.isabs(static_libc) or shutil.which("musl-gcc"):
        assert not interpreter(client)


def test_the_client_is_linked_with_musl_where_it_is_installed(client):
    """A static glibc program probes the CPU at every start (about 0.28 ms here:
    bench/bench_start.py); musl's start does not. The setup installs musl-tools."""
    if not shutil.which("musl-gcc"):
        if ON_CI:
            pytest.fail("musl-gcc is missing on CI (scripts/test-setup.sh installs musl-tools)")
        pytest.skip("musl-gcc is not installed")
    with open(client, "rb") as f:
        assert b"GLIBC_TUNABLES" not in f.read()    # glibc's start reads this variable


# -- --relay: the Slurm task on the node ----------------------------------------------

class RelayListener:
    """Stands for the Slurm backend's TCP listener: records what each connection sends."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.received = []
        self.readers = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                index = len(self.conns)
                self.conns.append(conn)
                self.received.append(b"")
                reader = threading.Thread(target=self._read, args=(conn, index), daemon=True)
                self.readers.append(reader)
            reader.start()

    def _read(self, conn, index):
        acked = False
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.received[index] += data
                line_done = b"\n" in self.received[index]
            if line_done and not acked:         # taken, as the backend's listener says
                conn.sendall(b"+")
                acked = True

    def close(self):
        # wake accept() before the fd goes: a new listener could get the same fd number
        self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        self.sock.close()
        for conn, reader in zip(self.conns, self.readers):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            reader.join(5)
            conn.close()


@pytest.fixture
def listener():
    server = RelayListener()
    yield server
    server.close()


def relay(helper, argv0, path, *args):
    """The helper's --relay argv for a tool, as the Slurm backend writes it: a word
    that is ":" or starts with "+" gets a "+" in front (srun reads ":" itself)."""
    return [helper, "--relay", path,
            *("+" + a if a == ":" or a.startswith("+") else a for a in (argv0, *args))]


def relay_env(env, listener, token="0123abcd", **extra):
    env = dict(env, ARV_WRAP_SLURM_HOST="127.0.0.1", ARV_WRAP_SLURM_PORT=str(listener.port),
               ARV_WRAP_SLURM_TOKEN=token)
    env.update(extra)
    return env


def test_client_relay_sends_tokens_and_carries_the_streams(helper, env, listener):
    script = "printf out; printf err >&2; exit 3"
    proc = subprocess.run(relay(helper, "sh", "/bin/sh", "-c", script),
                          env=relay_env(env, listener), capture_output=True, timeout=10)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, b"", b"")
    assert wait_for(lambda: listener.received == [b"o0123abcd\nout", b"e0123abcd\nerr"])


def test_client_relay_execs_with_argv0_and_args_exactly(helper, env, listener):
    code = "import sys; sys.stdout.buffer.write(open('/proc/self/cmdline', 'rb').read())"
    args = ["two words", "", "quote'\"", "new\nline", "-x", ":", "+", "+x"]  # ":": see relay()
    proc = subprocess.run(relay(helper, "my argv0", sys.executable, "-S", "-c", code,
                           *args), env=relay_env(env, listener), capture_output=True, timeout=10)
    assert (proc.returncode, proc.stderr) == (0, b"")
    expected = b"\0".join(a.encode() for a in ["my argv0", "-S", "-c", code, *args]) + b"\0"
    assert wait_for(lambda: listener.received[:1] == [b"o0123abcd\n" + expected])


def test_client_relay_gives_the_tool_the_callers_env(helper, env, listener):
    base = {"PATH": "/usr/bin:/bin", "KEEP": "kept"}
    renv = relay_env(base, listener, ARV_WRAP_SLURM_PWD="=/caller dir",
                     ARV_WRAP_SLURM_SHLVL="=007", ARV_WRAP_SLURM_DISABLE="=",
                     ARV_WRAP_SLURM_BASH_ENV="=/some/rc", ARV_WRAP_SLURM_OTHER="x",
                     PWD="/node", SHLVL="1", ARV_WRAP_DISABLE="1", BASH_ENV="/srun")
    proc = subprocess.run(relay(helper, "env", "/usr/bin/env", "-0"), env=renv,
                          capture_output=True, timeout=10)
    assert (proc.returncode, proc.stderr) == (0, b"")
    assert wait_for(lambda: len(listener.received) == 2 and b"KEEP" in listener.received[0])
    time.sleep(0.2)
    head, body = listener.received[0].split(b"\n", 1)
    assert head == b"o0123abcd"
    # SHLVL exactly as the caller had it (no shell arithmetic), ARV_WRAP_SLURM_* all gone
    assert sorted(body.split(b"\0")[:-1]) == sorted([
        b"PATH=/usr/bin:/bin", b"KEEP=kept", b"PWD=/caller dir", b"SHLVL=007",
        b"ARV_WRAP_DISABLE=", b"BASH_ENV=/some/rc"])


def test_client_relay_argv0_is_exact(helper, env, listener, tmp_path):
    out = tmp_path / "cmdline"
    proc = subprocess.run(relay(helper, "custom-name", "/bin/sh", "-c",
                           f"cat /proc/$$/cmdline > '{out}'"),
                          env=relay_env(env, listener), capture_output=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes().split(b"\0")[:2] == [b"custom-name", b"-c"]


def test_client_relay_unsets_what_the_caller_did_not_have(helper, env, listener, tmp_path):
    renv = relay_env({"PATH": "/usr/bin:/bin", "BASH_ENV": "/from/srun"}, listener,
                     PWD="/node", SHLVL="4", ARV_WRAP_DISABLE="1")
    proc = subprocess.run(relay(helper, "env", "/usr/bin/env"), env=renv,
                          capture_output=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert wait_for(lambda: len(listener.received) == 2 and b"BASH_ENV" in listener.received[0])
    time.sleep(0.2)
    lines = set(listener.received[0].split(b"\n", 1)[1].decode().splitlines())
    # BASH_ENV stays as srun gave it when the caller's is not saved
    assert lines == {"PATH=/usr/bin:/bin", "BASH_ENV=/from/srun"}


def test_client_relay_gives_the_tool_the_callers_nice_and_signal_state(helper, env, listener,
                                                                      tmp_path):
    """What slurmstepd does not pass on: nice 7, SIGHUP ignored (and SIGINT, which the
    relay's own parent ignores, not), SIGUSR2 and signal 64 blocked."""
    out = tmp_path / "state"
    hup, blk = 1 << (signal.SIGHUP - 1), 1 << (signal.SIGUSR2 - 1) | 1 << 63
    renv = relay_env(env, listener, ARV_WRAP_SLURM_NICE="7", ARV_WRAP_SLURM_SIGIGN=f"{hup:x}",
                     ARV_WRAP_SLURM_SIGBLK=f"{blk:x}")
    proc = subprocess.run(relay(helper, "sh", "/bin/sh", "-c",
                           f"exec cat /proc/self/stat /proc/self/status > '{out}'"),
                          env=renv, capture_output=True, timeout=10,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 0, proc.stderr
    stat, status = out.read_text().split("\n", 1)
    fields = dict(line.split(":\t", 1) for line in status.splitlines())
    assert int(stat.rsplit(")", 1)[1].split()[16]) == 7          # field 19: nice
    assert (int(fields["SigIgn"], 16), int(fields["SigBlk"], 16)) == (hup, blk)


@pytest.mark.parametrize("make, status, why", [
    (None, 127, "No such file or directory"),
    ("noexec", 126, "Permission denied"),
])
def test_client_relay_exec_failure(helper, env, listener, tmp_path, make, status, why):
    tool = tmp_path / "tool"
    if make:
        tool.write_text("#!/bin/sh\n")
    proc = subprocess.run(relay(helper, "tool", str(tool)), env=relay_env(env, listener),
                          capture_output=True, timeout=10)
    assert proc.returncode == status
    assert proc.stdout == b""
    assert proc.stderr == f"arv-wrap-relay: {tool}: {why}\n".encode()
    # the caller sees it too, on the tool's stderr
    expected = f"e0123abcd\narv-wrap: {tool}: {why}\n".encode()
    assert wait_for(lambda: expected in listener.received), listener.received


def test_client_relay_cannot_connect_is_125_and_one_line(helper, env):
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    port = spare.getsockname()[1]
    spare.close()                                   # nobody listens there
    renv = dict(env, ARV_WRAP_SLURM_HOST="127.0.0.1", ARV_WRAP_SLURM_PORT=str(port),
                ARV_WRAP_SLURM_TOKEN="t")
    proc = subprocess.run(relay(helper, "true", "/bin/true"), env=renv,
                          capture_output=True, timeout=10)
    assert (proc.returncode, proc.stdout) == (125, b"")
    assert proc.stderr == (f"arv-wrap-relay: cannot connect to 127.0.0.1:{port}: "
                           "Connection refused\n").encode()


class DroppingListener(RelayListener):
    """Drops the first `drops` connections after reading their token line, unanswered
    (as the backend's listener drops strangers under a flood), then takes the rest."""

    def __init__(self, drops):
        self.drops = drops
        self.dropped = 0
        super().__init__()

    def _read(self, conn, index):
        with self.lock:
            drop = self.dropped < self.drops
            self.dropped += drop
        if drop:
            conn.recv(100)
            conn.close()
            return
        super()._read(conn, index)


def test_client_relay_connects_again_when_its_connection_is_dropped_unanswered(helper, env):
    server = DroppingListener(3)
    try:
        proc = subprocess.run(relay(helper, "sh", "/bin/sh", "-c", "printf out; printf err >&2"),
                              env=relay_env(env, server), capture_output=True, timeout=10)
        assert (proc.returncode, proc.stderr) == (0, b"")
        assert wait_for(lambda: [r for r in server.received if r] == [b"o0123abcd\nout",
                                                                       b"e0123abcd\nerr"])
        assert server.dropped == 3
    finally:
        server.close()


def test_client_relay_always_dropped_is_125_and_one_line_in_bounded_time(helper, env):
    server = DroppingListener(10 ** 6)
    try:
        start = time.monotonic()
        proc = subprocess.run(relay(helper, "true", "/bin/true"), capture_output=True,
                              env=relay_env(env, server, ARV_WRAP_SLURM_CONNECT_TIMEOUT="1"),
                              timeout=10)
        assert time.monotonic() - start < 3
        assert (proc.returncode, proc.stdout) == (125, b"")
        [line] = proc.stderr.decode().splitlines()
        assert re.fullmatch(rf"arv-wrap-relay: cannot connect to 127.0.0.1:{server.port}: it "
                            r"dropped the connection \d+ times before taking it \(too many "
                            r"connections without a token\?\)", line), line
    finally:
        server.close()


def test_client_relay_without_its_variables_is_125(helper, env):
    proc = subprocess.run(relay(helper, "true", "/bin/true"), env=env,
                          capture_output=True, timeout=10)
    assert proc.returncode == 125
    assert proc.stderr.startswith(b"arv-wrap-relay: ") and proc.stderr.count(b"\n") == 1


# -- --launch: what the Slurm backend puts in front of srun ----------------------------

def launch(helper, env, *opts, cmd, **kw):
    return subprocess.run([helper, "--launch", str(os.getpid()), *opts, "--", *cmd], env=env,
                          capture_output=True, timeout=10, **kw)


def test_client_launch_sets_limits_and_umask(helper, env):
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = min(nofile[0], 321)
    core = resource.getrlimit(resource.RLIMIT_CORE)
    core_soft = 0 if core[1] != resource.RLIM_INFINITY else 4096
    cmd = ["/bin/sh", "-c", "umask; ulimit -Sn; ulimit -Hn; ulimit -Sc"]
    proc = launch(helper, env, "-u", "27", "-l", f"{resource.RLIMIT_NOFILE}:{soft}:{soft}",
                  "-l", f"{resource.RLIMIT_CORE}:{core_soft // 512 * 512}:"
                  f"{'u' if core[1] == resource.RLIM_INFINITY else core[1]}", cmd=cmd)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().split()
    assert lines[:3] == ["0027", str(soft), str(soft)]
    assert int(lines[3]) * 1024 == core_soft // 512 * 512 or int(lines[3]) * 512 == core_soft


def test_client_launch_sets_pdeathsig_and_keeps_argv_env(helper, env):
    proc = launch(helper, dict(env, LAUNCH_VAR="v"), cmd=[
        "/usr/bin/python3", "-S", "-c",
        "import ctypes, signal, sys, os; libc = ctypes.CDLL(None); s = ctypes.c_int(); "
        "libc.prctl(2, ctypes.byref(s)); print(s.value, sys.argv[1:], os.environ['LAUNCH_VAR'])",
        "a b", ""])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode() == f"{int(signal.SIGKILL)} ['a b', ''] v\n"


def test_client_launch_child_dies_with_its_parent(helper, env, tmp_path):
    pidfile = tmp_path / "pid"
    # a middle process starts the launcher, then exits: the launched sleep must die too
    middle = (f"import os, subprocess, time; p = subprocess.Popen(['{helper}', '--launch', "
              f"str(os.getpid()), '--', '/bin/sh', '-c', 'echo $$ > {pidfile}; exec sleep 60']); "
              f"time.sleep(1)")
    subprocess.run([sys.executable, "-S", "-c", middle], env=env, timeout=20)
    pid = int(pidfile.read_text())
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}")
                    or open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z")


def test_client_launch_gone_parent_and_exec_failure(helper, env):
    proc = subprocess.run([helper, "--launch", "1", "--", "/bin/true"], env=env,
                          capture_output=True, timeout=10)
    assert proc.returncode == 125           # its parent is not pid 1: the parent is gone
    proc = launch(helper, env, cmd=["/no/such/srun"])
    assert proc.returncode == 127
    assert proc.stderr == b"arv-wrap: /no/such/srun: No such file or directory\n"


@pytest.mark.parametrize("opts", [[], ["-u", "9"], ["-l", "7"], ["-l", "7:1"], ["-l", "x:1:1"],
                                  ["-z", "1"]])
def test_client_launch_usage_errors_exit_2(helper, env, opts):
    proc = subprocess.run([helper, "--launch", str(os.getpid()), *opts, "--"], env=env,
                          capture_output=True, timeout=10)
    assert proc.returncode == 2 and proc.stderr.startswith(b"usage: arv-wrap-helper")
