"""Issue 20, point 4: anyone who can reach the Slurm backend's listener may connect to
it. 10,000 connections that bring no valid token (silent, slow-loris, garbage, a
wrong token, an instant close), half from inside the node where the Slurm calls run
and half from this host, against a real dispatcher on the real cluster, while real
calls go on: each call gets its exact bytes and status in bounded time, the
dispatcher's descriptors stay bounded, every stranger is dropped, and the refusals
are logged in a bounded number of lines. (The listener's parts, one by one:
tests/backends/test_remote_listener.py.)

To add a kind of call (the pool's pooled calls), add it to CALLS.
"""
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ON_CI, arv_wrap, until, write_tool

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm-cluster.sh"
FLOOD = Path(__file__).resolve().parent / "strangers_flood.py"
STRANGERS = 5000           # from each of the two places
FLOOD_SECONDS = 8
CALL_BOUND = 30            # s any one call may take, flood or not
HANDSHAKE = 2              # ARV_WRAP_SLURM_HANDSHAKE for this test

# The calls that go on during the flood: name -> the head of the whitelist file that
# sends its tool (talk-<name>) there. The Slurm calls run on partition solo, whose one
# node the flood comes from. Pooled calls join with, e.g.,
# "pooled": "backend: slurm\nslurm: {partition: solo, pool_cores: 2}\n".
CALLS = {
    "local": "backend: local\n",
    "slurm": "backend: slurm\nslurm: {partition: solo}\n",
}

# talk N STATUS: N numbered lines on stdout, one on stderr, exit STATUS
TALK = 'seq 1 "$1"; echo "to stderr $1" >&2; exit "$2"\n'


def expected(n, status):
    return ("".join(f"{i}\n" for i in range(1, n + 1)).encode(),
            f"to stderr {n}\n".encode(), status)


@pytest.fixture
def env(slurm_cluster, client, tools, base_env, tmp_path):
    if os.geteuid() != 0:
        if ON_CI:
            pytest.fail("the strangers test must run as root on CI")
        pytest.skip("needs root to enter a node's namespace")
    files = []
    for name, head in CALLS.items():
        write_tool(tools, f"talk-{name}", TALK)
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"{head}tools:\n  - name: talk-{name}\n")
        files.append(str(path))
    base_env["ARV_WRAP_WHITELIST"] = ":".join(files)
    base_env["ARV_WRAP_SLURM_HANDSHAKE"] = str(HANDSHAKE)
    base_env["ARV_WRAP_IDLE_TIMEOUT"] = "60"
    return base_env


def call(env, name, i):
    """One call; (what it gave, what it should have, seconds)."""
    n, status = 1 + i * 37 % 500, i % 7
    start = time.monotonic()
    result = arv_wrap("--", f"talk-{name}", str(n), str(status), env=env,
                      capture_output=True, stdin=subprocess.DEVNULL, timeout=CALL_BOUND * 4)
    took = time.monotonic() - start
    return (result.stdout, result.stderr, result.returncode), expected(n, status), took


def dispatcher_pid(env):
    from arvwrap import paths
    out = subprocess.run(["pgrep", "-f", f"arvwrap.dispatcher --socket {paths.socket_path(env)}"],
                         capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


def listening(pid):
    """(address, port) of the dispatcher's one TCP listener."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    [where] = [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]
    host, port = where.rsplit(":", 1)
    return host, int(port)


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def node_addr(node):
    out = subprocess.run(["scontrol", "-o", "show", "node", node], capture_output=True,
                         text=True, timeout=30).stdout
    return re.search(r"NodeAddr=(\S+)", out).group(1)


class Calls(threading.Thread):
    """Calls of one kind, one after another, until told to stop (at least `least`)."""

    def __init__(self, env, name, stop, least=3):
        super().__init__(daemon=True)
        self.env, self.name, self.stop, self.least = env, name, stop, least
        self.results = []

    def run(self):
        i = 0
        while not self.stop.is_set() or i < self.least:
            self.results.append(call(self.env, self.name, i))
            i += 1


def test_ten_thousand_strangers_harm_no_call(env):
    for name in CALLS:                      # the dispatcher, its relay, and a first call
        got, want, _ = call(env, name, 0)
        assert got == want, (name, got)
    pid = dispatcher_pid(env)
    host, port = listening(pid)
    assert host != "0.0.0.0"
    solo = subprocess.run(["sinfo", "-h", "-p", "solo", "-o", "%N"], capture_output=True,
                          text=True, timeout=30).stdout.strip()
    baseline = open_fds(pid)

    flood = [sys.executable, "-S", str(FLOOD), host, str(port), str(STRANGERS),
             str(FLOOD_SECONDS), "400"]
    floods = {"this host": subprocess.Popen(flood, stdout=subprocess.PIPE, text=True),
              f"node {solo}": subprocess.Popen(["bash", str(SCRIPT), "exec", solo, "--", *flood],
                                               stdout=subprocess.PIPE, text=True)}
    stop, peak = threading.Event(), [baseline]
    runners = [Calls(env, name, stop) for name in CALLS]
    for r in runners:
        r.start()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], open_fds(pid))
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        reports = {where: json.loads(p.communicate(timeout=FLOOD_SECONDS + 90)[0])
                   for where, p in floods.items()}
    finally:
        stop.set()
        for p in floods.values():
            if p.poll() is None:
                p.kill()
        for r in runners:
            r.join(CALL_BOUND * 10)
        sampler.join(5)

    # every stranger was opened, and dropped by the dispatcher
    for where, report in reports.items():
        assert report["opened"] == STRANGERS and report["left_open"] == 0, (where, report)
        assert not report["failed"], (where, report)
    # every call got its exact bytes and status, in bounded time
    for r in runners:
        assert len(r.results) >= r.least
        for got, want, took in r.results:
            assert got == want, (r.name, got[2], want[2], got[1][-200:])
            assert took < CALL_BOUND, (r.name, took)
    # the descriptors: the strangers kept at most (the default cap), and the calls'
    from arvwrap.backends.slurm.settings import Settings
    assert peak[0] <= baseline + Settings.strangers_max + 100, (baseline, peak[0])
    until(lambda: open_fds(pid) <= baseline + 10, HANDSHAKE + 5, "the strangers' descriptors closed")
    # the refusals are in the log, from both places, in a bounded number of lines
    log = Path(env["ARV_WRAP_STATE_DIR"], "dispatcher.log").read_text()
    refused = [line for line in log.splitlines() if "slurm relay: refused" in line]
    assert any(f"from {host}" in line for line in refused), refused[:10]
    assert any(f"from {node_addr(solo)}" in line for line in refused), refused[:10]
    assert len(refused) < 200, len(refused)
    # and the dispatcher goes on serving
    for name in CALLS:
        got, want, _ = call(env, name, 1)
        assert got == want, (name, got)
