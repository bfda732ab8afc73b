"""The Docker backend, end to end on a real dockerd (scripts/docker-engine.sh starts it
and builds the busybox image): `arv-wrap` through the shim, the client, the dispatcher
and the engine, with busybox's tools in the container and the host's of the same name
as what the shim sees.

Skipped when dockerd is not installed or does not answer, except on CI (CI=true),
where that is a failure.
"""
import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import arv_wrap, job_records, need, ON_CI, poll as wait_for, wrapped

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "scripts" / "docker-engine.sh"
IMAGE = "arvwrap-test-busybox:1"
TOOLS = {"sh": {}, "cat": {}, "touch": {}, "id": {}, "sleep": {}, "yes": {}, "dd": {},
         "wc": {"stdin": "none"}}


def whitelist(head="backend: docker\n", **changes):
    """The tests' whitelist, with changes: a tool's keys replaced (None: no such rule)."""
    tools = {**TOOLS, **changes}
    return head + "tools:\n" + "".join(
        f"  - name: '{name}'\n" + "".join(f"    {k}: {v}\n" for k, v in
                                          {"image": IMAGE, **keys}.items() if v is not None)
        for name, keys in tools.items() if keys is not None)


def absent(why):
    if ON_CI:
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def api():
    """The engine (started and its image built first when we are root)."""
    need("dockerd")
    if os.geteuid() == 0:
        proc = subprocess.run(["bash", str(ENGINE)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        import docker
        client = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
        client.inspect_image(IMAGE)
    except ImportError:
        absent("the docker Python SDK is not installed")
    except Exception as e:
        absent(f"the docker engine does not answer or has no {IMAGE} "
               f"(bash scripts/docker-engine.sh): {e}")
    return client


@pytest.fixture
def env(api, tools, base_env, whitelist_file, client):
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(whitelist())
    return base_env


def set_rules(env, **changes):
    with open(env["ARV_WRAP_WHITELIST"], "w") as f:
        f.write(whitelist(**changes))


def containers_of(api, job_id):
    return api.containers(all=True, filters={"label": f"arv-wrap.job={job_id}"})


def running_job(env):
    found = wait_for(lambda: [r for r in job_records(env) if r["state"] == "running"], 20)
    assert found, "the job never ran"
    return found[0]


def arv_lines(stderr):
    return [line for line in stderr.decode().splitlines() if "arv-wrap" in line]


# -- exit statuses, signals, streams ---------------------------------------------------

def test_exit_statuses_are_exact_and_the_container_is_the_backend_id(env, api):
    for status in (0, 1, 42, 255):
        result = wrapped(env, f"sh -c 'exit {status}'")
        assert (result.returncode, result.stdout, result.stderr) == (status, b"", b"")
    records = job_records(env)
    assert sorted(r["exit_status"] for r in records) == [0, 1, 42, 255]
    assert all(r["backend"] == "docker" and len(r["backend_id"]) == 12 for r in records)
    assert all(not containers_of(api, r["id"]) for r in records)      # each one removed


def test_a_signal_death_is_the_callers_death(env):
    script = "sh -c 'kill -TERM $$'; echo status=$?"
    result = wrapped(env, script)
    direct = subprocess.run(["bash", "-c", script], capture_output=True,
                            env={k: v for k, v in env.items() if not k.startswith("ARV_")})
    assert result.stdout == direct.stdout == b"status=143\n"
    assert result.stderr == direct.stderr
    [record] = job_records(env)
    assert (record["state"], record["signal"]) == ("signaled", 15)


def test_binary_stdout_and_stderr_are_exact_and_separate(env, tmp_path):
    (tmp_path / "out.bin").write_bytes(os.urandom(3 << 20) + b"no newline at the end")
    (tmp_path / "err.bin").write_bytes(b"err line\n" + os.urandom(200_000))
    result = wrapped(env, "sh -c 'cat out.bin; cat err.bin >&2; exit 1'", cwd=str(tmp_path))
    assert result.returncode == 1
    assert result.stdout == (tmp_path / "out.bin").read_bytes()
    assert result.stderr == (tmp_path / "err.bin").read_bytes()


def test_its_stderr_is_kept_for_arv_wrap_logs(env):
    result = wrapped(env, "sh -c 'echo out; echo kept-line >&2; exit 3'")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"kept-line\n")
    [record] = job_records(env)
    logs = arv_wrap("logs", record["id"], env=env, stdout=subprocess.PIPE)
    assert (logs.returncode, logs.stdout) == (0, b"kept-line\n")


def test_5mb_of_binary_stdin_through_cat_and_its_eof(env, tmp_path):
    data = os.urandom(5_000_000)
    (tmp_path / "big.bin").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    with open(tmp_path / "big.bin", "rb") as f:       # a regular file, from its offset
        f.seek(1000)
        result = wrapped(env, "cat", stdin=f, timeout=60)
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(data[1000:]).hexdigest()
    # a pipe: cat sees its end, and the shell goes on
    result = wrapped(env, "dd if=big.bin bs=65536 status=none | cat; echo end >&2",
                     cwd=str(tmp_path), timeout=60)
    assert hashlib.sha256(result.stdout).hexdigest() == digest
    assert (result.returncode, result.stderr) == (0, b"end\n")


def test_a_tool_that_does_not_read_a_stdin_file_leaves_it_unconsumed(env, tmp_path):
    listing = tmp_path / "list"
    listing.write_text("".join(f"line{i}\n" for i in range(4)))
    result = wrapped(env, f"while read f; do sh -c 'echo $0' \"$f\"; done < '{listing}'")
    assert result.stdout.decode().split() == [f"line{i}" for i in range(4)]


def test_stdin_none_gives_the_tool_no_stdin(env):
    result = wrapped(env, "echo hello | wc -c")
    assert result.stdout.strip() == b"0"


def test_a_partial_line_arrives_live(env):
    proc = subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "sh", "-c",
                             "printf partial; sleep 2; echo"],
                            env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    assert ready and os.read(proc.stdout.fileno(), 100) == b"partial"
    assert proc.poll() is None, "the job had ended: the output was not live"
    assert proc.wait(30) == 0


def test_a_reader_that_goes_away_is_sigpipe(env):
    result = wrapped(env, "yes | head -n 2; echo status=${PIPESTATUS[0]}", timeout=30)
    assert result.stdout == b"y\ny\nstatus=141\n"


def test_argv_cwd_and_environment(env, tmp_path):
    work = tmp_path / "work dir"
    work.mkdir()
    env["PROBE_VAR"] = "va lue"
    env["LD_PRELOAD"] = "/nonexistent/libnothing.so"
    args = ["two words", "", "quote'\"", "new\nline", "-t"]
    script = 'for a in "$@"; do printf "%s\\0" "$a"; done'
    result = arv_wrap("--", "sh", "-c", script, "sh", *args, env=env, cwd=str(work),
                      capture_output=True, stdin=subprocess.DEVNULL)
    assert result.stdout.split(b"\0")[:-1] == [a.encode() for a in args], result.stderr
    probe = ('echo "cwd=$(pwd)"; echo "var=$PROBE_VAR"; echo "pre=${LD_PRELOAD-unset}"; '
             'echo "job=$ARV_WRAP_JOB"; echo "path=$PATH"; echo "nofile=$(ulimit -n)"')
    result = wrapped(env, f"ulimit -n 777; sh -c '{probe}'", cwd=str(work))
    lines = dict(line.split("=", 1) for line in result.stdout.decode().splitlines())
    assert lines["nofile"] == "777"
    assert lines["cwd"] == str(work) and lines["var"] == "va lue" and lines["pre"] == "unset"
    assert lines["path"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert lines["job"] == job_records(env)[0]["id"]


# -- files ------------------------------------------------------------------------------

def test_files_land_on_the_host_as_the_callers(env, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    out.mkdir()
    (data / "in.txt").write_text("from the host\n")
    work = tmp_path / "work"
    work.mkdir()
    script = (f"touch made; cat {data}/in.txt; touch {out}/new.txt; "
              f"setpriv --regid 4321 --clear-groups touch by-4321; "
              f"setpriv --regid 4321 --clear-groups id")
    result = wrapped(env, script, cwd=str(work))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "from the host"
    assert lines[1].startswith(f"uid={os.getuid()} gid=4321")
    for path, gid in ((work / "made", os.getgid()), (out / "new.txt", os.getgid()),
                      (work / "by-4321", 4321)):
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (os.getuid(), gid), path
    assert {r["backend"] for r in job_records(env)} == {"docker"}


# -- resources ---------------------------------------------------------------------------

def test_fractional_cpus_and_memory_are_the_containers_limits(env, api):
    set_rules(env, sleep={"cpus": 0.5, "memory": "64M"})
    proc = subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "sleep", "30"], env=env,
                            stdin=subprocess.DEVNULL)
    try:
        record = running_job(env)
        host = api.inspect_container(record["backend_id"])["HostConfig"]
        assert (host["NanoCpus"], host["Memory"]) == (500_000_000, 64 << 20)
        assert host["Init"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == -signal.SIGTERM


def test_a_memory_kill_is_the_callers_death_with_a_reason(env):
    set_rules(env, dd={"memory": "20M"})
    result = wrapped(env, "dd if=/dev/zero of=/dev/null bs=100M count=1; echo status=$?")
    assert result.stdout == b"status=137\n"
    [line] = arv_lines(result.stderr)
    assert "exceeded its memory limit of 20 MiB" in line
    [record] = job_records(env)
    assert (record["state"], record["signal"]) == ("signaled", 9)


def test_oversize_is_clamped_or_refused(env, api, whitelist_file):
    ncpu = api.info()["NCPU"]
    set_rules(env, id={"cpus": 64})
    result = wrapped(env, "id -u")
    assert (result.returncode, result.stdout) == (0, f"{os.getuid()}\n".encode())
    [record] = job_records(env)
    assert record["cpus"] == ncpu and "clamped" in record["reason"]
    refuse = whitelist_file(whitelist("backend: docker\non_oversize: refuse\n", id={"cpus": 64}),
                            name="refuse.yaml")
    result = arv_wrap("-w", refuse, "--", "id", env=env, capture_output=True,
                      stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stdout) == (125, b"")
    [line] = result.stderr.decode().splitlines()
    assert line.startswith("arv-wrap: id asks for 64 CPUs, more than the docker engine offers")


def test_a_time_limit_ends_the_container_with_sigterm(env):
    set_rules(env, sleep={"time": "1s"})
    start = time.monotonic()
    result = wrapped(env, "sleep 30; echo status=$?", timeout=30)
    assert time.monotonic() - start < 10
    assert result.stdout == b"status=143\n"
    [line] = arv_lines(result.stderr)
    assert "exceeded its time limit of 1s" in line


# -- cancel --------------------------------------------------------------------------------

def activation(env):
    out = arv_wrap("env", env=env, stdout=subprocess.PIPE, check=True).stdout.decode()
    pairs = subprocess.run(["bash", "-c", out + "\nenv -0"], stdout=subprocess.PIPE,
                           env={"PATH": env["PATH"]}, check=True).stdout.split(b"\0")
    return {k: v for k, _, v in (p.decode().partition("=") for p in pairs if p)
            if k.startswith("ARV_WRAP_") or k == "LD_PRELOAD"}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_signalling_the_redirected_call_removes_the_container(env, api, signum):
    driver = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess; p = subprocess.Popen(['sleep', '4242'], "
         "stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL); print(p.pid, flush=True); "
         "print(p.wait())"],
        env={**env, **activation(env)}, stdout=subprocess.PIPE)
    client_pid = int(driver.stdout.readline())
    record = running_job(env)
    assert containers_of(api, record["id"])
    os.kill(client_pid, signum)
    assert int(driver.stdout.readline()) == -signum
    driver.wait(15)
    assert wait_for(lambda: not containers_of(api, record["id"]), 5)
    final = wait_for(lambda: [r for r in job_records(env) if r["state"] != "running"], 10)
    assert final and final[0]["state"] == ("cancelled" if signum == signal.SIGKILL
                                           else "signaled")


def test_arv_wrap_cancel_removes_the_container(env, api):
    proc = subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "sleep", "4243"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    record = running_job(env)
    assert arv_wrap("cancel", record["id"], env=env, stdout=subprocess.PIPE).returncode == 0
    assert proc.wait(15) == -signal.SIGTERM
    assert len(arv_lines(proc.stderr.read())) == 1
    assert wait_for(lambda: not containers_of(api, record["id"]), 5)
    [final] = job_records(env)
    assert final["state"] == "cancelled"


def test_a_stopped_dispatcher_leaves_no_container_behind(env, api):
    proc = subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "sleep", "4244"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    record = running_job(env)
    os.kill(dispatcher_pid(env), signal.SIGTERM)
    assert wait_for(lambda: not containers_of(api, record["id"]), 5)
    assert proc.wait(15) == -signal.SIGTERM
    assert "dispatcher was stopped" in proc.stderr.read().decode()
    [final] = job_records(env)
    assert final["state"] == "cancelled"


def dispatcher_pid(env):
    from arvwrap import paths
    out = subprocess.run(["pgrep", "-f", f"arvwrap.dispatcher --socket {paths.socket_path(env)}"],
                         stdout=subprocess.PIPE, text=True).stdout
    return int(out.split()[0])


def leftover(api, job_id, pid, started=None):
    labels = {"arv-wrap.job": job_id, "arv-wrap.dispatcher": str(pid),
              "arv-wrap.host": socket.gethostname()}
    if started is not None:
        labels["arv-wrap.dispatcher-started"] = started
    made = api.create_container(IMAGE, ["sleep", "600"], labels=labels,
                                host_config=api.create_host_config(init=True))
    api.start(made["Id"])
    return made["Id"]


def test_leftovers_of_a_dead_dispatcher_are_reaped(env, api):
    # a dispatcher that serves only local jobs so far: its docker backend has not started
    assert arv_wrap("-b", "local", "--", "sh", "-c", "true", env=env).returncode == 0
    live = dispatcher_pid(env)
    with open(f"/proc/{live}/stat", "rb") as f:
        started = f.read().rsplit(b")", 1)[1].split()[19].decode()
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = leftover(api, "01DEADDISPATCHER0000000000", gone.pid)
    alive = leftover(api, "01LIVEDISPATCHER0000000000", live, started)
    try:
        assert wrapped(env, "sh -c 'exit 3'").returncode == 3
        assert not containers_of(api, "01DEADDISPATCHER0000000000")
        assert containers_of(api, "01LIVEDISPATCHER0000000000")
    finally:
        for made in (dead, alive):
            try:
                api.remove_container(made, force=True)
            except Exception:
                pass


# -- refusals ------------------------------------------------------------------------------

def test_a_missing_image_is_125_with_one_line_naming_it(env):
    set_rules(env, cat={"image": "arvwrap-test-missing:1"})
    result = wrapped(env, "cat /dev/null")
    assert (result.returncode, result.stdout) == (125, b"")
    lines = result.stderr.decode().splitlines()
    assert lines[-1].startswith("arv-wrap: image arvwrap-test-missing:1 is not here and "
                                "cannot be pulled: ")
    assert all(line.startswith("arv-wrap: ") for line in lines)


def test_a_rule_without_an_image_is_125_with_one_line(env):
    set_rules(env, cat={"image": None})
    result = wrapped(env, "cat /dev/null")
    assert (result.returncode, result.stdout) == (125, b"")
    [line] = result.stderr.decode().splitlines()
    assert line == "arv-wrap: cat: its rule names no image (the docker backend needs `image:`)"


def test_a_non_utf8_argument_is_125_and_a_dev_fd_one_runs_locally(env):
    result = wrapped(env, "sh -c 'exit 0' $'\\xff'")
    assert (result.returncode, result.stdout) == (125, b"")
    [line] = result.stderr.decode().splitlines()
    assert line == "arv-wrap: sh: an argument is not UTF-8: a container cannot carry it"
    result = wrapped(env, "cat <(echo from-a-process-substitution)")
    assert (result.returncode, result.stdout) == (0, b"from-a-process-substitution\n")
    record = job_records(env)[0]
    assert record["backend"] == "local" and "/dev/fd" in record["reason"]


def test_check_and_process_state(env, api):
    from arvwrap.backends import BackendError, docker as backend
    line = backend.Backend({}).check()
    assert line.startswith("docker: engine ") and f"{api.info()['NCPU']} CPUs" in line
    out = arv_wrap("check", "--", "cat", "x", env=env, stdout=subprocess.PIPE,
                   check=True).stdout.decode()
    assert "backend: docker" in out and "process state: crosses into the container" in out
    old = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
    try:
        with pytest.raises(BackendError, match="does not answer"):
            backend.Backend({})
    finally:
        if old is None:
            del os.environ["DOCKER_HOST"]
        else:
            os.environ["DOCKER_HOST"] = old


def test_mount_points():
    from arvwrap.backends.docker import mount_points
    here = str(ROOT)
    points = mount_points(here, ["README.md", "src/arvwrap", "--out=docs/new.md", "/etc/passwd",
                                 "/", "no/such/dir/x", "/tmp/not-yet-made"], "/tmp")
    # all but /tmp are below the cwd (and the cwd may be below /tmp); system dirs never
    assert points == (["/tmp"] if here.startswith("/tmp/") else sorted(["/tmp", here]))


def test_frames_are_demultiplexed_however_they_are_cut():
    import fcntl
    import random
    import struct
    from arvwrap.backends.docker import Demux
    set_pipe_size = getattr(fcntl, "F_SETPIPE_SZ", 1031)
    frames = [(1, b"out" * 1000), (2, b"err\n"), (1, b""), (2, os.urandom(70_000)), (1, b"x")]
    stream = b"".join(struct.pack(">BxxxL", kind, len(body)) + body for kind, body in frames)
    rng = random.Random(4)
    for cut in (1, 3, 7, 8, 9, 4096, None):
        out_r, out_w = os.pipe2(os.O_NONBLOCK)
        err_r, err_w = os.pipe2(os.O_NONBLOCK)
        for fd in (out_r, err_r):
            fcntl.fcntl(fd, set_pipe_size, 1 << 20)     # room for all of it
        demux = Demux.__new__(Demux)
        demux.targets, demux.wake, demux.broken = {1: out_w, 2: err_w}, lambda: None, False
        pending, at = b"", 0
        while at < len(stream):
            size = cut or rng.randint(1, 20_000)
            pending = demux.deliver(pending + stream[at:at + size])
            at += size
        assert pending == b""
        assert os.read(out_r, 1 << 20) == b"".join(b for k, b in frames if k == 1)
        assert os.read(err_r, 1 << 20) == b"".join(b for k, b in frames if k == 2)
        for fd in (out_r, out_w, err_r, err_w):
            os.close(fd)


def test_a_pull_shows_its_progress_on_stderr_once_per_step(api):
    """No registry answers here: the engine's pull stream is replayed to the backend."""
    from types import SimpleNamespace
    from arvwrap.backends import docker as backend
    events = [{"status": "Pulling from library/tool", "id": "1"},
              {"status": "Pulling fs layer", "id": "a1"},
              *({"status": "Downloading", "id": "a1", "progress": f"{n}MB"} for n in range(5)),
              {"status": "Pull complete", "id": "a1"},
              {"status": "Status: Downloaded newer image for tool:1"}]
    b = backend.Backend({})
    b.api = SimpleNamespace(pull=lambda repo, tag, stream, decode: iter(events))
    r, w = os.pipe()
    b.pull("tool:1", w)
    os.close(w)
    lines = os.read(r, 1 << 16).decode().splitlines()
    assert lines == ["arv-wrap: pulling tool:1: 1 Pulling from library/tool",
                     "arv-wrap: pulling tool:1: a1 Pulling fs layer",
                     "arv-wrap: pulling tool:1: a1 Downloading",
                     "arv-wrap: pulling tool:1: a1 Pull complete",
                     "arv-wrap: pulling tool:1: Status: Downloaded newer image for tool:1"]
    b.api = SimpleNamespace(pull=lambda repo, tag, stream, decode: iter([{"error": "denied"}]))
    with pytest.raises(b.errors.APIError, match="denied"):
        b.pull("tool:1", None)


def test_doctor_says_which_images_are_missing_and_runs_a_call_in_one_that_is_there(env):
    with open(env["ARV_WRAP_WHITELIST"], "a") as f:
        f.write("  - name: arvwrap-doctor-tool\n    image: arvwrap-no-such-image:9\n")
    result = arv_wrap("doctor", "-b", "docker", env=env, stdout=subprocess.PIPE, timeout=120)
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 1
    [missing] = [line for line in lines if line.startswith("FAIL")]
    assert "images missing" in missing and "arvwrap-no-such-image:9" in missing
    assert IMAGE not in missing
    assert any(line.startswith("ok") and "ran as job" in line and "on docker" in line
               for line in lines), lines


def test_fault_injecting_demux_fails_the_job_with_one_line(env, tmp_path, api):
    from fault_injection import inject
    inject(env, tmp_path, "arvwrap.backends.docker.Demux.deliver")
    result = wrapped(env, "sh -c 'echo BOOM; sleep 30'", timeout=60)
    assert (result.returncode, result.stdout) == (125, b"")
    [record] = job_records(env)
    assert result.stderr.decode().splitlines() == [
        f"arv-wrap: container {record['backend_id']} (sh): the copy of the output of job "
        f"{record['id']} failed (RuntimeError: injected; see dispatcher.log)"]
    assert record["state"] == "failed" and not containers_of(api, record["id"])

