"""Shared fixtures: an isolated state dir and the environment that activates arv-wrap."""
import functools
import os
import shutil
import subprocess
import sys
import time

import pytest

from arvwrap import paths

ON_CI = os.environ.get("CI") == "true"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where the arvwrap under test is imported from (the source tree, or site-packages
# for an installed copy): what a PYTHONPATH given to a subprocess must name.
IMPORTED_FROM = os.path.dirname(os.path.dirname(os.path.abspath(paths.__file__)))


# tests/test_sanitized.py runs the exec-path and client tests again with this set to
# a directory of sanitized native programs (csrc/native.py --sanitize).
SANITIZED = os.environ.get("ARVWRAP_TEST_NATIVE")
if SANITIZED:
    paths.NATIVE = SANITIZED
    paths.SHIM = os.path.join(SANITIZED, "libarvwrap.so")
    paths.CLIENT = os.path.join(SANITIZED, "arv-wrap-client")
    paths.HELPER = os.path.join(SANITIZED, "arv-wrap-helper")


@pytest.fixture(scope="session")
def native_programs():
    """The real shim, client and helper, (re)built from csrc/ when missing or stale (a
    source checkout being edited); an installed set is newer than its sources."""
    if SANITIZED:
        return paths.CLIENT, paths.HELPER
    sys.path.insert(0, os.path.join(ROOT, "csrc"))
    import native
    newest = max(os.path.getmtime(s) for s in native.sources())
    if any(not os.path.exists(p) or os.path.getmtime(p) < newest
           for p in (paths.SHIM, paths.CLIENT, paths.HELPER)):
        native.build(paths.NATIVE)
    return paths.CLIENT, paths.HELPER


@pytest.fixture(scope="session")
def client(native_programs):
    return native_programs[0]


@pytest.fixture(scope="session")
def helper(native_programs):
    return native_programs[1]


@functools.lru_cache(maxsize=None)
def slurm_cluster_name():
    """The ClusterName of the cluster SLURM_CONF names (job ids are per cluster)."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                         timeout=30).stdout
    return next((line.split("=", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("ClusterName")), "")


def slurm_relay(slurm_id):
    """(pid, environment) of the relay that runs Slurm job slurm_id of our cluster, or
    None. Every node of the test cluster is this machine: its processes are here,
    whatever the node's network namespace."""
    mine = [f"SLURM_JOB_ID={slurm_id}".encode(),
            f"SLURM_CLUSTER_NAME={slurm_cluster_name()}".encode()]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if argv[1:2] == [b"--relay"] and all(m in environ for m in mine):
            return int(pid), dict(e.decode(errors="replace").partition("=")[::2]
                                  for e in environ if e)
    return None


def need(program):
    """Skip a test whose real component is missing, except on CI where that is a failure."""
    if shutil.which(program) is None:
        if ON_CI:
            pytest.fail(f"{program} is required on CI but is not installed")
        pytest.skip(f"{program} is not installed")


@pytest.fixture
def state_dir(tmp_path):
    path = tmp_path / "state"
    yield str(path)
    sock = paths.socket_path({"ARV_WRAP_STATE_DIR": str(path)})
    # ask a dispatcher started for this test to leave (it would after its idle timeout)
    subprocess.run(["pkill", "-f", f"arvwrap.dispatcher --socket {sock}"], check=False)


@pytest.fixture
def base_env(state_dir):
    """os.environ plus an isolated state dir and a short dispatcher idle timeout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARV_WRAP_")}
    env["ARV_WRAP_STATE_DIR"] = state_dir
    env["ARV_WRAP_IDLE_TIMEOUT"] = "20"
    return env


def arv_wrap(*args, env, **kwargs):
    """Run the arv-wrap command (as `python -m arvwrap`, so no install step is assumed)."""
    import sys
    kwargs.setdefault("timeout", 120)
    return subprocess.run([sys.executable, "-m", "arvwrap", *args], env=env, **kwargs)


def jobs(env, run=None):
    """The job records of the state dir in env, newest first."""
    import json
    args = ["jobs", "--json"] + (["--run", run] if run else [])
    out = arv_wrap(*args, env=env, stdout=subprocess.PIPE, check=True).stdout
    return json.loads(out)


def wrapped(env, script, **kwargs):
    """Run a bash pipeline under arv-wrap, capturing its output, stdin from /dev/null."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return arv_wrap("--", "bash", "-c", script, env=env, **kwargs)


def job_records(env):
    """The records of redirected calls (not of runs), newest first."""
    return [r for r in jobs(env) if r["kind"] == "job"]


def until(predicate, timeout=10, what="the condition", step=0.02):
    """Poll predicate until it returns something true, and return that; fail the test
    after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(step)


def poll(predicate, timeout=5, step=0.02):
    """Poll predicate until it returns something true or timeout seconds pass; its
    last value either way (for the caller to assert on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def alive(pid):
    """pid exists and is not a zombie (this machine's init does not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def write_tool(directory, name, body):
    """An executable stand-in tool (a shell script) in directory."""
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def tools(tmp_path, base_env):
    """A bin dir at the front of PATH for stand-in tools, and base_env using it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    base_env["PATH"] = f"{bin_dir}:{base_env['PATH']}"
    return str(bin_dir)


@pytest.fixture
def whitelist_file(tmp_path):
    """Write a whitelist YAML from text and return its path."""
    def write(text, name="w.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return str(path)
    return write


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a real disk that fills (tests run as root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                             stderr=subprocess.PIPE, text=True)
    if mounted.returncode:
        if ON_CI:
            pytest.fail(f"cannot mount a tmpfs on CI: {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The Slurm of scripts/slurm-cluster.sh (the instance SLURM_CONF names), found up,
    or brought up as it is configured (root)."""
    need("srun")
    script = os.path.join(ROOT, "scripts", "slurm-cluster.sh")
    proc = subprocess.run(["bash", script, "status"], capture_output=True, text=True, timeout=60)
    if proc.returncode and os.geteuid() == 0:
        proc = subprocess.run(["bash", script, "up"], capture_output=True, text=True,
                              timeout=900)
    if proc.returncode:
        if ON_CI:
            pytest.fail(f"the Slurm cluster is not up: {proc.stdout}{proc.stderr}")
        pytest.skip("the Slurm cluster is not up and we are not root to start it")


@pytest.fixture(scope="session")
def docker_engine():
    """A dockerd with the test image (scripts/docker-engine.sh, started when root)."""
    need("dockerd")
    if os.geteuid() == 0:
        proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "docker-engine.sh")],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        import docker
        docker.APIClient(version="auto", **docker.utils.kwargs_from_env()).inspect_image(
            "arvwrap-test-busybox:1")
    except Exception as e:
        if ON_CI:
            pytest.fail(f"the docker engine or its test image is not there: {e}")
        pytest.skip(f"the docker engine or its test image is not there: {e}")
