"""Issue 12, point 3: faults on the remote backends, each ending in the job's own
result or one clear `arv-wrap:` line within a bounded time, and nothing left
running afterwards (ps, squeue, docker ps): slurmctld killed while a job runs and
started again, also with the call killed meanwhile; slurmd killed; the dispatcher
SIGKILLed with a job on Slurm and on Docker; dockerd stopped; the relay's port
unreachable from the node. (The local backend's: tests/test_dispatcher_faults.py.)

Every outage is undone in a finally, and waited for until the service answers again:
the cluster and the engine are shared.
"""
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from arvwrap import paths
from conftest import ON_CI, alive, arv_wrap, job_records, need, poll, until, write_tool

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "slurm-cluster.sh"
ENGINE = ROOT / "scripts" / "docker-engine.sh"
IMAGE = "arvwrap-test-busybox:1"

# prints "started", waits for the file $1, prints "done", exits 7
HOLD = ('echo started; i=0; while [ ! -e "$1" ]; do i=$((i+1)); [ $i -lt 1200 ] || exit 9; '
        'sleep 0.05; done; echo done; exit 7\n')


def root_only():
    if os.geteuid() != 0:
        if ON_CI:
            pytest.fail("fault tests must run as root on CI")
        pytest.skip("needs root to stop and start daemons")


def arv_lines(stderr):
    return [line for line in stderr.decode().splitlines() if line.startswith("arv-wrap:")]


def tool_running(marker):
    """Pids of processes whose command line names marker (the test's own go file)."""
    out = subprocess.run(["pgrep", "-f", str(marker)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def dispatcher_pids(env):
    out = subprocess.run(["pgrep", "-f", f"arvwrap.dispatcher --socket {paths.socket_path(env)}"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def start(env, *argv):
    return subprocess.Popen([sys.executable, "-m", "arvwrap", "--", *argv], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def finished(proc, timeout):
    """(status, stdout, stderr) of a call that must end within timeout seconds."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# -- Slurm ------------------------------------------------------------------------

def cluster_cmd(*args):
    return subprocess.run(["bash", str(CLUSTER), *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def slurm_env(slurm_cluster, client, tools, base_env, whitelist_file):
    root_only()
    write_tool(tools, "hold", HOLD)
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file("backend: slurm\ntools:\n  - name: hold\n")
    base_env["ARV_WRAP_SLURM_TIMEOUT"] = "3"
    base_env["ARV_WRAP_SLURM_POLL"] = "0.5"
    return base_env


def in_squeue(job_id):
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %j"], capture_output=True, text=True,
                         timeout=30).stdout
    return [line for line in out.splitlines() if line.endswith(":" + job_id)]


def srun_running(marker, of=None):
    """The sruns running the job of marker (those whose parent is in `of`)."""
    def is_srun(pid):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        return os.path.basename(argv0) == b"srun" and (of is None or ppid in of)
    return [p for p in tool_running(marker) if is_srun(p)]


def on_a_node(marker):
    """Those of tool_running(marker) in a network namespace other than ours (a node's)."""
    def elsewhere(pid):
        try:
            return os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        except OSError:
            return False
    return [p for p in tool_running(marker) if elsewhere(p)]


def node_of(slurm_id):
    out = subprocess.run(["squeue", "-h", "-j", str(slurm_id), "-o", "%N"],
                         capture_output=True, text=True, timeout=30).stdout.strip()
    assert out, f"Slurm job {slurm_id} is not running on any node"
    return out


@contextmanager
def killed(daemon, node=None):
    """slurmctld stopped, or the slurmd of a node killed (SIGKILL); started again (and
    waited for until every node is usable) on leaving, whatever happened. slurmctld
    gets SIGTERM: one killed with SIGKILL forgets what it had not saved yet and gives
    the ids of the newest jobs again, which on a cluster shared with other test runs
    leaves their jobs behind as ghosts (to arv-wrap, either is a controller that does
    not answer)."""
    proc = cluster_cmd("stop-controller") if daemon == "slurmctld" else \
        cluster_cmd("kill-slurmd", node)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        yield
    finally:
        # starts what is missing and waits for it (once more if a start raced another's)
        proc = cluster_cmd("start-controller")
        if proc.returncode != 0:
            proc = cluster_cmd("start-controller")
        assert proc.returncode == 0, proc.stdout + proc.stderr


def seconds(iso):
    import datetime
    return datetime.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def running_record(env):
    return until(lambda: [r for r in job_records(env) if r["state"] == "running"], 20,
                 "the job to run")[0]


def test_a_job_outlives_slurmctld_stopped_and_started_again(slurm_env, tmp_path):
    go = tmp_path / "go"
    proc = start(slurm_env, "hold", str(go))
    assert proc.stdout.readline() == b"started\n"
    record = running_record(slurm_env)
    with killed("slurmctld"):
        assert tool_running(go)           # the job runs on while the controller is away
    go.touch()
    status, out, err = finished(proc, 60)
    assert (status, out, err) == (7, b"done\n", b"")
    [final] = job_records(slurm_env)
    assert (final["state"], final["exit_status"]) == ("exited", 7)
    assert poll(lambda: not in_squeue(record["id"]), 10), in_squeue(record["id"])


def test_a_call_killed_while_slurmctld_is_down_leaves_no_job_once_it_is_back(slurm_env, tmp_path):
    """srun ends while the controller cannot take the cancel: the job is cancelled
    once the controller answers again."""
    go = tmp_path / "go"
    proc = start(slurm_env, "hold", str(go))
    assert proc.stdout.readline() == b"started\n"
    record = running_record(slurm_env)
    with killed("slurmctld"):
        client = [p for p in tool_running(go)
                  if Path(f"/proc/{p}/cmdline").read_bytes().startswith(paths.CLIENT.encode())]
        for pid in client:
            os.kill(pid, signal.SIGKILL)
        assert proc.wait(10) != 0
        # no controller takes the cancel (nor srun's): srun is ended at once
        # (srun's own shepherd, which Slurm leaves to cancel the job, is not ours)
        until(lambda: not srun_running(go, of=dispatcher_pids(slurm_env)), 3 + 5,
              "srun to end while the controller is down")
    # once it is back, the job is cancelled, and its tool ends with it
    assert poll(lambda: all(" RUNNING " not in l for l in in_squeue(record["id"])), 15), \
        in_squeue(record["id"])
    assert poll(lambda: not tool_running(go), 20), tool_running(go)


def test_a_job_outlives_slurmd_killed(slurm_env, tmp_path):
    go = tmp_path / "go"
    proc = start(slurm_env, "hold", str(go))
    assert proc.stdout.readline() == b"started\n"
    record = running_record(slurm_env)
    with killed("slurmd", node_of(record["backend_id"])):
        go.touch()
        status, out, err = finished(proc, 60)
    # slurmstepd, not slurmd, runs the step: the job's own result
    assert (status, out, err) == (7, b"done\n", b"")
    assert poll(lambda: not in_squeue(record["id"]), 15), in_squeue(record["id"])
    assert not tool_running(go)


@pytest.mark.parametrize("how", ["node-down", "kill-node, then node-down"])
def test_a_job_whose_node_is_lost_ends_125_with_one_line_naming_it(slurm_env, tmp_path, how):
    """Set down by an admin (which kills its jobs), or gone at once with every process
    on it and then found down: srun says "Node failure" and exits 0 without the task's
    status, which only arv-wrap's line may stand for."""
    go = tmp_path / "go"
    proc = start(slurm_env, "hold", str(go))
    assert proc.stdout.readline() == b"started\n"
    record = running_record(slurm_env)
    node = node_of(record["backend_id"])
    try:
        assert on_a_node(go)                    # the tool runs in the node's namespace
        if how.startswith("kill-node"):
            assert cluster_cmd("kill-node", node).returncode == 0
            assert not on_a_node(go)
        assert cluster_cmd("node-down", node, "test_faults").returncode == 0
        status, out, err = finished(proc, 30)
    finally:
        back = cluster_cmd("start-node", node)
    assert back.returncode == 0, back.stdout + back.stderr
    assert (status, out) == (125, b""), (status, out, err)
    assert arv_lines(err) == [f"arv-wrap: job {record['backend_id']} (hold): its node {node} "
                              f"was lost (Slurm: Node failure); what the tool did there is "
                              f"unknown"], err
    # and nothing of Slurm's (Slurm may SIGTERM the job first: hold's sh then says so)
    assert set(err.decode().splitlines()) - set(arv_lines(err)) <= {"Terminated"}, err
    [final] = job_records(slurm_env)
    assert final["state"] == "failed" and node in final["reason"]
    assert poll(lambda: not in_squeue(record["id"]), 10), in_squeue(record["id"])
    assert poll(lambda: not tool_running(go), 10), tool_running(go)


def test_a_dispatcher_killed_under_a_slurm_job_leaves_no_job(slurm_env, tmp_path):
    go = tmp_path / "go"
    proc = start(slurm_env, "hold", str(go))
    assert proc.stdout.readline() == b"started\n"
    record = running_record(slurm_env)
    [pid] = dispatcher_pids(slurm_env)
    os.kill(pid, signal.SIGKILL)
    status, out, err = finished(proc, 30)
    assert (status, out) == (125, b"")
    assert arv_lines(err) == ["arv-wrap: lost the dispatcher"]
    # the next dispatcher (started by the next call, on any backend) records it failed
    # (srun's own shepherd cancels the job if the controller takes it; else the next
    # dispatcher does)
    go.touch()
    assert arv_wrap("-b", "local", "--", "hold", str(go), env=slurm_env).returncode == 7
    assert poll(lambda: not in_squeue(record["id"]), 15), in_squeue(record["id"])
    assert poll(lambda: not tool_running(go), 10), tool_running(go)
    final = [r for r in job_records(slurm_env) if r["id"] == record["id"]][0]
    assert final["state"] == "failed" and "dispatcher died" in final["reason"]


@contextmanager
def relay_port_blocked(env, how):
    """An iptables rule that drops (or rejects) what is sent to the dispatcher's relay
    port, removed on leaving."""
    [pid] = dispatcher_pids(env)
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    ports = [line.split()[3].rsplit(":", 1)[1] for line in out.splitlines()
             if f"pid={pid}," in line]
    assert len(ports) == 1, out
    rule = ["INPUT", "-p", "tcp", "--dport", ports[0], "-j", how]
    if how == "REJECT":
        rule += ["--reject-with", "tcp-reset"]
    subprocess.run(["iptables", "-I", *rule], check=True, timeout=30)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True, timeout=30)


@pytest.mark.parametrize("how", ["DROP", "REJECT"])
def test_a_relay_port_the_node_cannot_reach_is_one_line_in_bounded_time(slurm_env, tmp_path, how):
    need("iptables")
    slurm_env["ARV_WRAP_SLURM_CONNECT_TIMEOUT"] = "3"
    go = tmp_path / "go"
    go.touch()
    assert finished(start(slurm_env, "hold", str(go)), 60)[0] == 7   # the relay listens
    with relay_port_blocked(slurm_env, how):
        status, out, err = finished(start(slurm_env, "hold", str(go)), 120)
    record = job_records(slurm_env)[0]
    assert (status, out) == (125, b""), (status, out, err, record)
    [line] = arv_lines(err)
    assert "cannot connect to" in line, line
    # bounded from the job's start (it may first wait its turn on a shared cluster)
    assert seconds(record["ended"]) - seconds(record["started"]) < 3 + 10, record
    assert record["state"] == "failed" and "cannot connect" in record["reason"]
    assert poll(lambda: not in_squeue(record["id"]), 10)


def test_a_job_that_ends_while_slurmctld_is_down_is_not_left_running(slurm_env, tmp_path):
    """srun ends, and cannot tell the controller: the job would stay RUNNING there for
    ever. It is cancelled once the controller answers again (slurmstepd then takes up
    to a minute to report the step: COMPLETING until then, so this test comes last of
    the Slurm ones)."""
    slurm_env["ARV_WRAP_IDLE_TIMEOUT"] = "1"
    go = tmp_path / "go"
    proc = start(slurm_env, "hold", str(go))
    assert proc.stdout.readline() == b"started\n"
    record = running_record(slurm_env)
    with killed("slurmctld"):
        go.touch()
        status, out, err = finished(proc, 30)
        # the outage outlasts the dispatcher's idle timeout (1 s, ticks of 1 s): it
        # must stay for the job it still has to cancel (this wait is the fault's length)
        time.sleep(3)
        assert dispatcher_pids(slurm_env)
        assert (status, out, err) == (7, b"done\n", b"")
    assert poll(lambda: all(" RUNNING " not in l for l in in_squeue(record["id"])), 15), \
        in_squeue(record["id"])
    assert not tool_running(go)


# -- Docker -----------------------------------------------------------------------

def engine_answers():
    return subprocess.run(["docker", "-H", "unix:///var/run/docker.sock", "version"],
                          capture_output=True, timeout=30).returncode == 0


@pytest.fixture(scope="module")
def api():
    need("dockerd")
    root_only()
    proc = subprocess.run(["bash", str(ENGINE)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    import docker
    return docker.APIClient(version="auto", base_url="unix:///var/run/docker.sock")


@pytest.fixture
def docker_env(api, client, tools, base_env, whitelist_file):
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(
        f"backend: docker\ntools:\n  - name: sleep\n    image: {IMAGE}\n"
        f"  - name: sh\n    image: {IMAGE}\n")
    return base_env


def containers_of(api, job_id):
    return api.containers(all=True, filters={"label": f"arv-wrap.job={job_id}"})


def test_a_dispatcher_killed_under_a_docker_job_leaves_no_container(docker_env, api):
    proc = start(docker_env, "sleep", "4246")
    record = running_record(docker_env)
    assert containers_of(api, record["id"])
    [pid] = dispatcher_pids(docker_env)
    os.kill(pid, signal.SIGKILL)
    status, out, err = finished(proc, 30)
    assert (status, out, arv_lines(err)) == (125, b"", ["arv-wrap: lost the dispatcher"])
    # the next dispatcher, whatever backend its first call uses, removes the container
    assert arv_wrap("-b", "local", "--", "sh", "-c", "true", env=docker_env).returncode == 0
    assert poll(lambda: not containers_of(api, record["id"]), 15), containers_of(api, record["id"])
    final = [r for r in job_records(docker_env) if r["id"] == record["id"]][0]
    assert final["state"] == "failed"


@contextmanager
def engine_stopped():
    pid = int(subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True,
                             text=True).stdout.split()[0])
    os.kill(pid, signal.SIGTERM)
    try:
        until(lambda: not alive(pid), 30, "dockerd to stop")
        yield
    finally:
        subprocess.run(["bash", str(ENGINE)], capture_output=True, timeout=600)
        until(engine_answers, 30, "dockerd to answer again")


def test_dockerd_stopped_under_a_job_and_before_one(docker_env, api):
    proc = start(docker_env, "sh", "-c", "echo started; exec sleep 4247")
    assert proc.stdout.readline() == b"started\n"
    record = running_record(docker_env)
    with engine_stopped():
        status, out, err = finished(proc, 40)
        # the engine stops the container (SIGTERM to its init): the call dies of it, as
        # of any signal someone sent the tool; or, if the engine went first, 125 and
        # one line
        assert (status, len(arv_lines(err))) in ((-signal.SIGTERM, 0), (125, 1)), (status, err)
        begin = time.monotonic()
        status, out, err = finished(start(docker_env, "sh", "-c", "echo no"), 60)
        assert (status, out) == (125, b"")
        [line] = arv_lines(err)
        assert "docker" in line.lower(), line
        assert time.monotonic() - begin < 30
    assert poll(lambda: not containers_of(api, record["id"]), 15)


# -- a backend that cannot load ------------------------------------------------------

def test_a_backend_that_cannot_load_fails_the_call_instead_of_hanging_it():
    """Stand-in dispatcher (RemoteJobs alone): a backend whose module raises anything
    but BackendError when it loads used to kill the job's thread, leaving its caller
    waiting for ever."""
    from types import SimpleNamespace
    from arvwrap.remote_jobs import RemoteJobs

    class StandIn(RemoteJobs):
        def backend(self, name):
            raise RuntimeError("the module is broken")

        def post(self, callback):
            callback()

        def _remote_done(self, call, outcome):
            self.outcome = outcome

    dispatcher = StandIn()
    dispatcher._run_remote(SimpleNamespace(job=SimpleNamespace(backend="slurm", id="J")))
    assert dispatcher.outcome.state == "failed"
    assert dispatcher.outcome.message == "the slurm backend cannot start: the module is broken"
