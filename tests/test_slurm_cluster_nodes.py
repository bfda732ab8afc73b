"""The nodes of the Slurm test cluster (scripts/slurm-cluster/nodes.sh): each its own
host (network namespace, hostname) on this machine's filesystem, reaching the
controller's bridge and nothing else; the node-loss commands (kill-node,
kill-slurmd, node-down, start-node); a second instance beside the first.

Skipped when Slurm is not installed, except on CI (CI=true) where that is a failure.
Every outage is undone in a finally: the cluster may be shared.
"""
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ON_CI, poll, until

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm-cluster.sh"


def run(args, timeout=60, **kwargs):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{args} did not finish within {timeout}s (stdout={exc.stdout!r})")


def cluster(*args, timeout=120, env=None):
    return run(["bash", str(SCRIPT), *args], timeout=timeout, env=env)


@pytest.fixture(scope="module")
def nodes(slurm_cluster):
    if os.geteuid() != 0:
        if ON_CI:
            pytest.fail("the node tests must run as root on CI")
        pytest.skip("needs root to enter and kill nodes")
    names = cluster("nodes").stdout.split()
    assert names, "the cluster has no node"
    return names


def job_state(job_id):
    out = run(["scontrol", "-o", "show", "job", str(job_id)], timeout=20).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m and m.group(1)


def node_of(job_name):
    out = run(["squeue", "-h", "-n", job_name, "-o", "%i %N"], timeout=20).stdout.split()
    return out if len(out) == 2 else None


def test_each_node_is_a_host_of_its_own_on_the_shared_filesystem(nodes, tmp_path):
    n = len(nodes)
    proc = run(["srun", f"-N{n}", f"-n{n}", "sh", "-c",
                f'h=$(hostname); echo "$h $SLURMD_NODENAME" > "{tmp_path}/$h"; echo "$h"'])
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(nodes)
    # what a job wrote is on this machine's filesystem at the same path
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        node: f"{node} {node}\n" for node in nodes}


def test_a_node_reaches_the_controllers_bridge_and_nothing_else(nodes):
    """No default route: this machine's other addresses (and its loopback, which in a
    namespace is the node's own) cannot be reached from a node."""
    config = run(["scontrol", "show", "config"], timeout=20).stdout
    controller = re.search(r"^SlurmctldHost\[0\]\s*=\s*\S+\((\S+)\)", config, re.M).group(1)
    port = re.search(r"^SlurmctldPort\s*=\s*(\d+)", config, re.M).group(1)
    own = run(["ip", "-4", "-o", "addr"]).stdout
    others = [a for a in re.findall(r"inet (\S+)/", own) if a not in (controller, "127.0.0.1")]
    probe = ("import socket, sys\n"
             "for host in sys.argv[2:]:\n"
             "    try:\n"
             "        socket.create_connection((host, int(sys.argv[1])), timeout=3).close()\n"
             "        print(host, 'reached')\n"
             "    except OSError as e:\n"
             "        print(host, type(e).__name__)\n")
    with socket.create_server(("127.0.0.1", 0)) as loopback_only:
        lo_port = loopback_only.getsockname()[1]
        result = cluster("exec", nodes[-1], "--", sys.executable, "-S", "-c", probe, port,
                         controller, *others)
        assert result.returncode == 0, result.stderr
        seen = dict(line.split() for line in result.stdout.splitlines())
        assert seen.pop(controller) == "reached"
        assert seen and all(v != "reached" for v in seen.values()), seen
        result = cluster("exec", nodes[-1], "--", sys.executable, "-S", "-c", probe,
                         str(lo_port), "127.0.0.1")
        assert result.stdout.split() == ["127.0.0.1", "ConnectionRefusedError"]
    routes = cluster("exec", nodes[-1], "--", "ip", "route").stdout
    assert "default" not in routes and routes.strip(), routes


def started_job(name, node, command):
    proc = subprocess.Popen(["srun", "-J", name, "-w", node, "sh", "-c", command],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "started\n"
    job_id, where = until(lambda: node_of(name), 20, "the job in squeue")
    assert where == node
    return proc, job_id


def pids_of(pattern):
    return run(["pgrep", "-f", pattern]).stdout.split()


def test_a_killed_node_set_down_fails_its_job_and_comes_back(nodes):
    node = nodes[-1]
    marker = f"sleep 42{os.getpid() % 1000:03d}"
    proc, job_id = started_job(f"arvwrap-test-lost-{os.getpid()}", node,
                               f"echo started; exec {marker}")
    try:
        start = time.monotonic()
        killed = cluster("kill-node", node)
        assert killed.returncode == 0, killed.stderr
        assert not pids_of(f"^{marker}$")          # the job's processes went with the node
        assert job_state(job_id) == "RUNNING"      # the controller has not noticed yet
        down = cluster("node-down", node, "test")
        assert (down.returncode, down.stdout) == (0, f"node {node}: down\n"), down.stderr
        _, err = proc.communicate(timeout=30)
        # srun says "Node failure" and exits 0: only the job's state tells
        assert proc.returncode == 0 and f"Node failure on {node}" in err, err
        assert poll(lambda: job_state(job_id) == "NODE_FAIL", 10), job_state(job_id)
        assert time.monotonic() - start < 10
    finally:
        back = cluster("start-node", node)
    assert (back.returncode, back.stdout) == (0, f"node {node}: idle\n"), back.stderr
    assert run(["srun", "-w", node, "hostname"]).stdout == f"{node}\n"


def test_a_killed_slurmd_leaves_its_jobs_running(nodes, tmp_path):
    node, go = nodes[-1], tmp_path / "go"
    proc, job_id = started_job(f"arvwrap-test-slurmd-{os.getpid()}", node,
                               f'echo started; while [ ! -e "{go}" ]; do sleep 0.05; done; exit 3')
    try:
        assert cluster("kill-slurmd", node).returncode == 0
        status = cluster("status")
        assert status.returncode == 1 and f"slurmd of {node}: not running" in status.stdout
        go.touch()
        # slurmstepd runs the step and tells srun; the controller hears once slurmd is back
        assert proc.wait(30) == 3
    finally:
        back = cluster("start-node", node)
    assert back.returncode == 0, back.stderr
    assert poll(lambda: job_state(job_id) == "FAILED", 30), job_state(job_id)


def test_a_second_instance_runs_beside_this_one(nodes):
    """Its own config, ports, bridge and node names; up and down in well under seconds
    each, leaving this cluster as it was."""
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    env.update(SLURM_CLUSTER_INSTANCE="t2", SLURM_CLUSTER_INDEX="250")
    try:
        start = time.monotonic()
        up = cluster("up", "--nodes", "2", env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        up_seconds = time.monotonic() - start
        assert up.stdout.startswith("slurm cluster up: 2 node(s) t2-node1 t2-node2 ")
        there = dict(env, SLURM_CONF="/etc/slurm-t2/slurm.conf")
        assert sorted(run(["srun", "-N2", "hostname"], env=there).stdout.split()) == [
            "t2-node1", "t2-node2"]
        assert sorted(run(["srun", f"-N{len(nodes)}", "hostname"]).stdout.split()) == sorted(nodes)
    finally:
        down = cluster("down", env=env)
    assert down.returncode == 0, down.stderr
    links = run(["ip", "-o", "link"]).stdout
    assert "sw250" not in links and "slurm-t2-" not in run(["ip", "netns", "list"]).stdout
    assert cluster("status").returncode == 0
    assert up_seconds < 10, up_seconds
