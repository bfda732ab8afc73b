"""Issue 12, point 6: many redirected calls at once lose no record and no byte of
output; two pipelines with different state dirs never see each other's jobs.

200 calls are in flight together on the local backend (each waits until all have
started before writing its second half); 12 on Slurm (2 CPUs a node of the test
cluster: some queue). Each writes a payload of its own, some KB on stdout and on
stderr, to a file of its own; every byte is compared, every record counted.
"""
import json
import os
import signal
import subprocess
import sys

from arvwrap import paths
from conftest import arv_wrap, job_records, jobs, write_tool


# emit N DIR COUNT: half of its payload, then (with COUNT) wait until COUNT calls have
# started, then the rest
EMIT = r"""
n=$1; dir=$2; count=$3
head -c 2048 "$dir/$n.out"; head -c 1024 "$dir/$n.err" >&2
if [ -n "$count" ]; then
    : > "$dir/started.$n"
    i=0
    while [ "$(ls "$dir" | grep -c '^started\.')" -lt "$count" ]; do
        i=$((i + 1)); [ $i -lt 1200 ] || { echo "never saw $count started" >&2; exit 9; }
        sleep 0.05
    done
fi
tail -c +2049 "$dir/$n.out"; tail -c +1025 "$dir/$n.err" >&2
"""


def payloads(directory, count, size):
    """A distinct payload per call: stdout and stderr of `size` bytes each, binary."""
    out = {}
    for n in range(count):
        seed = n.to_bytes(2, "big")
        body = bytes((i * 131 + n * 7 + (i >> 8)) & 0xFF for i in range(size))
        stdout = b"out %d\n" % n + seed + body
        stderr = b"err %d\n" % n + body[::-1] + seed
        (directory / f"{n}.out").write_bytes(stdout)
        (directory / f"{n}.err").write_bytes(stderr)
        out[n] = (stdout, stderr)
    return out


def driver(count, data, results, barrier):
    """A bash pipeline that starts every call at once, each with files of its own."""
    wait_for = str(count) if barrier else ""
    return (f'for n in $(seq 0 {count - 1}); do emit $n {data} {wait_for} '
            f'> {results}/$n.out 2> {results}/$n.err & done; wait')


def check_outputs(expected, results, records, backend):
    for n, (stdout, stderr) in expected.items():
        assert (results / f"{n}.out").read_bytes() == stdout, f"stdout of call {n}"
        assert (results / f"{n}.err").read_bytes() == stderr, f"stderr of call {n}"
    assert len(records) == len(expected)
    assert len({r["id"] for r in records}) == len(expected)
    assert sorted(int(r["argv"][1]) for r in records) == sorted(expected)
    assert {(r["backend"], r["state"], r["exit_status"]) for r in records} == \
        {(backend, "exited", 0)}


def test_200_concurrent_local_calls_lose_no_record_and_no_byte(tools, base_env, tmp_path,
                                                               whitelist_file):
    write_tool(tools, "emit", EMIT)
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file("tools:\n  - name: emit\n    cpus: 0.01\n")
    base_env["ARV_WRAP_LOCAL_CPUS"] = "2"
    data, results = tmp_path / "data", tmp_path / "results"
    data.mkdir()
    results.mkdir()
    expected = payloads(data, 200, 6000)
    result = arv_wrap("--", "bash", "-c", driver(200, data, results, barrier=True), env=base_env,
                      capture_output=True, stdin=subprocess.DEVNULL, timeout=170)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    check_outputs(expected, results, job_records(base_env), "local")
    [run] = [r for r in jobs(base_env) if r["kind"] == "run"]
    assert run["state"] == "exited" and run["exit_status"] == 0


def test_12_concurrent_slurm_calls_lose_no_record_and_no_byte(slurm_cluster, client, tools,
                                                              base_env, tmp_path, whitelist_file):
    write_tool(tools, "emit", EMIT)
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file("backend: slurm\ntools:\n  - name: emit\n")
    data, results = tmp_path / "data", tmp_path / "results"
    data.mkdir()
    results.mkdir()
    expected = payloads(data, 12, 100_000)      # through the relay's sockets
    result = arv_wrap("--", "bash", "-c", driver(12, data, results, barrier=False),
                      env=base_env, capture_output=True, stdin=subprocess.DEVNULL, timeout=170)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    records = job_records(base_env)
    check_outputs(expected, results, records, "slurm")
    assert len({r["backend_id"] for r in records}) == 12


# -- two pipelines, two state dirs ------------------------------------------------------

HOLD = 'echo "$2"; while [ ! -e "$1" ]; do sleep 0.05; done\n'


def pipeline(env, go, word):
    return subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "bash", "-c",
                             f"hold {go} {word}; hold {go} {word}-2"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def seen_by(env, tmp_path, name):
    """Everything arv-wrap shows from env's state dir: jobs --json, --tree, top, the
    report, show of each of its records."""
    shown = [arv_wrap(*cmd, env=env, capture_output=True, check=True).stdout
             for cmd in (["jobs", "--json"], ["jobs", "--tree"], ["jobs"], ["top"])]
    report = tmp_path / f"{name}.html"
    arv_wrap("report", "-o", str(report), env=env, check=True, capture_output=True)
    shown.append(report.read_bytes())
    for record in jobs(env):
        shown.append(arv_wrap("show", record["id"], env=env, capture_output=True,
                              check=True).stdout)
    return b"\n".join(shown)


def test_two_pipelines_in_different_state_dirs_never_see_each_others_jobs(
        tools, base_env, tmp_path, whitelist_file):
    write_tool(tools, "hold", HOLD)
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file("tools:\n  - name: hold\n    cpus: 0.1\n")
    env_a = base_env
    env_b = {**base_env, "ARV_WRAP_STATE_DIR": str(tmp_path / "state-b")}
    go = tmp_path / "go"
    a, b = pipeline(env_a, go, "alpha"), pipeline(env_b, go, "beta")
    try:
        assert a.stdout.readline() == b"alpha\n" and b.stdout.readline() == b"beta\n"
        ids_a = {r["id"] for r in jobs(env_a)}
        ids_b = {r["id"] for r in jobs(env_b)}
        assert len(ids_a) == len(ids_b) == 2 and not ids_a & ids_b
        for env, own, other, name in ((env_a, ids_a, ids_b, "a"), (env_b, ids_b, ids_a, "b")):
            shown = seen_by(env, tmp_path, name)
            assert all(i.encode() in shown for i in own)
            assert not any(i.encode() in shown for i in other), name
            assert (b"beta" if name == "a" else b"alpha") not in shown
            # neither show nor cancel reaches the other's job, even by its whole id
            for job_id in other:
                assert arv_wrap("show", job_id, env=env, capture_output=True).returncode != 0
                assert arv_wrap("cancel", job_id, env=env, capture_output=True).returncode != 0
        assert a.poll() is None and b.poll() is None        # both still running
    finally:
        go.touch()
        out_a, err_a = a.communicate(timeout=60)
        out_b, err_b = b.communicate(timeout=60)
    assert (a.returncode, out_a, err_a) == (0, b"alpha-2\n", b"")
    assert (b.returncode, out_b, err_b) == (0, b"beta-2\n", b"")
    final_a, final_b = jobs(env_a), jobs(env_b)
    assert len(final_a) == len(final_b) == 3
    assert not {r["id"] for r in final_a} & {r["id"] for r in final_b}
    assert {r["state"] for r in final_a + final_b} == {"exited"}
    assert all("beta" not in json.dumps(r) for r in final_a)
    assert all("alpha" not in json.dumps(r) for r in final_b)
    # and each had its own dispatcher
    assert os.path.exists(tmp_path / "state-b" / "dispatcher.log")
    out = subprocess.run(["pgrep", "-f", f"arvwrap.dispatcher --socket {paths.socket_path(env_b)}"],
                         capture_output=True, text=True).stdout
    for pid in out.split():          # the second one's (the fixture ends the first's)
        os.kill(int(pid), signal.SIGTERM)
