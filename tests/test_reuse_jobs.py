"""Job reuse end to end (arvwrap.reuse_jobs): a real dispatcher, real tools, on the
local backend and on the test Slurm; each rule of the contract (README, Job
reuse) is a test that fails when it is broken."""
import os
import subprocess
import threading

import pytest

from conftest import arv_wrap, job_records, until, write_tool

# upper-cases its input into -o's file; binary bytes on both streams; counts its runs
TOOL = r"""out=$2; in=$3
echo "$in" >> "$RUNS"
[ -n "$HOLD" ] && while [ ! -e "$HOLD" ]; do sleep 0.02; done
[ -n "$FAILONCE" ] && rm "$FAILONCE" 2>/dev/null && exit 4
tr a-z A-Z < "$in" > "$out"
printf 'out of %s\000\377\n' "$in"
printf 'err of %s\n' "$in" >&2
exit ${FAIL:-0}
"""
RULES = "tools:\n  - name: upcase\n    reuse: {outputs: [-o], ignore: [-t], env: [NOISE]}\n"


@pytest.fixture(params=["local", "slurm"])
def backend(request):
    if request.param == "slurm":
        request.getfixturevalue("slurm_cluster")
        request.getfixturevalue("client")          # the relay on the node
    if request.param == "docker":
        request.getfixturevalue("docker_engine")
    return request.param


def setup(tools, base_env, whitelist_file, tmp_path, backend):
    base_env["UPCASE"] = write_tool(tools, "upcase", TOOL)   # by path: docker mounts it
    rules = RULES + ("    image: arvwrap-test-busybox:1\n" if backend == "docker" else "")
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(rules)
    base_env["ARV_WRAP_BACKEND"] = backend
    base_env["RUNS"] = str(tmp_path / "runs")
    (tmp_path / "in.txt").write_text("hello\n")
    return base_env


@pytest.fixture
def env(tools, base_env, whitelist_file, tmp_path, backend):
    """On each backend: the rules the key and the cache apply are the same on all."""
    return setup(tools, base_env, whitelist_file, tmp_path, backend)


@pytest.fixture
def local_env(tools, base_env, whitelist_file, tmp_path):
    """On the local backend only: what is decided before any backend is asked."""
    return setup(tools, base_env, whitelist_file, tmp_path, "local")


def call(env, tmp_path, *argv, reuse=True, stdin=subprocess.DEVNULL, **extra):
    flags = ["--reuse"] if reuse else []
    return arv_wrap(*flags, "--", env["UPCASE"], *argv, env={**env, **extra}, cwd=tmp_path,
                    stdin=stdin, capture_output=True)


def held_calls(n, env, tmp_path, hold, one):
    """n calls of one() at once, the tool held (HOLD) until the first has started and
    all n are recorded; their results."""
    results = []
    threads = [threading.Thread(target=lambda: results.append(one())) for _ in range(n)]
    for t in threads:
        t.start()
    until(lambda: runs(tmp_path) == 1 and len(job_records(env)) == n, 60, f"{n} calls")
    hold.touch()
    for t in threads:
        t.join(120)
    return results


def runs(tmp_path):
    path = tmp_path / "runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.parametrize("backend", ["local", "slurm", "docker"], indirect=True)
def test_a_rerun_reuses_the_outputs_streams_and_status_and_says_so(env, tmp_path):
    first = call(env, tmp_path, "-o", "out.txt", "in.txt")
    assert first.returncode == 0 and runs(tmp_path) == 1
    assert first.stdout == b"out of in.txt\0\xff\n" and first.stderr == b"err of in.txt\n"
    os.unlink(tmp_path / "out.txt")
    second = call(env, tmp_path, "-o", "out.txt", "in.txt")
    assert runs(tmp_path) == 1                         # not run again
    assert (second.returncode, second.stdout, second.stderr) == \
        (0, first.stdout, first.stderr)
    assert (tmp_path / "out.txt").read_text() == "HELLO\n"
    reused, ran = job_records(env)[:2]
    assert reused["reused_from"] == ran["id"] and ran["reused_from"] is None
    assert reused["state"] == "exited" and reused["exit_status"] == 0
    shown = arv_wrap("show", reused["id"], env=env, capture_output=True, text=True).stdout
    assert f"reused_from     {ran['id']}" in shown


@pytest.mark.parametrize("backend, change, part", [
    ("local", "input", "inputs in.txt"), ("local", "argv", "argv"),
    ("local", "program", "program"), ("local", "env", "env LANG"),
    ("slurm", "input", "inputs in.txt"),
], indirect=["backend"])
def test_what_can_change_the_result_reruns_and_the_record_says_what_differed(
        env, tmp_path, tools, change, part):
    assert call(env, tmp_path, "-o", "out.txt", "in.txt", LANG="C").returncode == 0
    extra, argv = {"LANG": "C"}, ["-o", "out.txt", "in.txt"]
    if change == "input":
        (tmp_path / "in.txt").write_text("hullo\n")
    elif change == "argv":
        argv = ["-o", "other.txt", "in.txt"]
    elif change == "program":
        write_tool(tools, "upcase", TOOL.replace("exit", "# changed\nexit"))
    else:
        extra["LANG"] = "de_DE.UTF-8"
    assert call(env, tmp_path, *argv, **extra).returncode == 0
    assert runs(tmp_path) == 2
    assert part in job_records(env)[0]["reason"]


def test_flags_and_variables_that_do_not_matter_are_reused(local_env, tmp_path):
    call(local_env, tmp_path, "-t", "2", "-o", "out.txt", "in.txt", NOISE="a")
    call(local_env, tmp_path, "-t", "8", "-o", "out.txt", "in.txt", NOISE="b", USER="other")
    assert runs(tmp_path) == 1


def test_a_failed_job_is_never_reused(env, tmp_path):
    assert call(env, tmp_path, "-o", "out.txt", "in.txt", FAIL="3").returncode == 3
    assert call(env, tmp_path, "-o", "out.txt", "in.txt", FAIL="3").returncode == 3
    assert runs(tmp_path) == 2


@pytest.mark.parametrize("damage", ["missing", "changed"])
def test_a_cached_output_that_is_missing_or_damaged_reruns(local_env, tmp_path, damage):
    call(local_env, tmp_path, "-o", "out.txt", "in.txt")
    blobs = [os.path.join(root, n) for root, _, names in
             os.walk(os.path.join(local_env["ARV_WRAP_STATE_DIR"], "cache", "blobs")) for n in names]
    target = next(b for b in blobs if open(b, "rb").read() == b"HELLO\n")
    if damage == "missing":
        os.unlink(target)
    else:
        with open(target, "wb") as f:
            f.write(b"HELLX\n")
    again = call(local_env, tmp_path, "-o", "out.txt", "in.txt")
    assert again.returncode == 0 and runs(tmp_path) == 2
    assert (tmp_path / "out.txt").read_text() == "HELLO\n"
    assert "damaged" in job_records(local_env)[0]["reason"]


def test_a_piped_stdin_is_part_of_the_key(local_env, tmp_path):
    def piped(data):
        return arv_wrap("--reuse", "--", "sh", "-c",
                        f"printf {data} | upcase -o out.txt /dev/stdin",
                        env=local_env, cwd=tmp_path, capture_output=True)
    assert piped("abc").returncode == 0 and (tmp_path / "out.txt").read_text() == "ABC"
    assert piped("abc").returncode == 0 and runs(tmp_path) == 1
    assert piped("abd").returncode == 0 and runs(tmp_path) == 2
    assert (tmp_path / "out.txt").read_text() == "ABD"


def test_identical_calls_in_flight_run_once_and_share_the_result(env, tmp_path):
    hold = tmp_path / "go"
    results = held_calls(3, env, tmp_path, hold, lambda: call(
        env, tmp_path, "-o", "out.txt", "in.txt", HOLD=str(hold)))
    assert runs(tmp_path) == 1
    assert [r.returncode for r in results] == [0, 0, 0]
    assert len({(r.stdout, r.stderr) for r in results}) == 1
    records = job_records(env)
    assert sum(r["reused_from"] is not None for r in records) == 2


def test_without_reuse_on_the_run_or_in_the_rule_nothing_is_reused(local_env, tmp_path,
                                                                   whitelist_file):
    call(local_env, tmp_path, "-o", "out.txt", "in.txt")
    call(local_env, tmp_path, "-o", "out.txt", "in.txt", reuse=False)
    assert runs(tmp_path) == 2
    local_env["ARV_WRAP_WHITELIST"] = whitelist_file("tools:\n  - name: upcase\n", "plain.yaml")
    call(local_env, tmp_path, "-o", "out.txt", "in.txt")
    assert runs(tmp_path) == 3


def test_a_job_that_changed_its_input_is_not_kept_and_says_why(local_env, tmp_path, tools):
    write_tool(tools, "upcase", 'echo x >> "$RUNS"; echo more >> "$3"\n')
    call(local_env, tmp_path, "-o", "out.txt", "in.txt")
    call(local_env, tmp_path, "-o", "out.txt", "in.txt")
    assert runs(tmp_path) == 2
    assert "not kept for reuse: it changed" in job_records(local_env)[0]["reason"]


def test_check_says_whether_a_call_would_be_reused_and_why_not(local_env, tmp_path):
    def check(*argv):
        return arv_wrap("check", "--reuse", "--", local_env["UPCASE"], *argv, env=local_env,
                        cwd=tmp_path, capture_output=True, text=True).stdout
    assert "reuse: no earlier job" in check("-o", "out.txt", "in.txt")
    call(local_env, tmp_path, "-o", "out.txt", "in.txt")
    job = job_records(local_env)[0]["id"]
    assert f"reuse: yes, the result of job {job}" in check("-o", "out.txt", "in.txt")
    text = check("-o", "elsewhere.txt", "in.txt")
    assert f"the nearest kept job, {job}, differs in:" in text and "argv 2" in text


def test_a_secret_in_argv_is_not_kept_in_the_cache(local_env, tmp_path):
    """The key is made of the real words; what the cache keeps to explain a miss
    has the secret out (README, Security)."""
    secret = "hunter2-is-the-password"
    assert call(local_env, tmp_path, "-o", "out.txt", "in.txt", f"--password={secret}"
                ).returncode == 0
    assert call(local_env, tmp_path, "-o", "out.txt", "in.txt", "--password=other-secret"
                ).returncode == 0
    assert runs(tmp_path) == 2                  # another password: another key
    for root, _, names in os.walk(local_env["ARV_WRAP_STATE_DIR"]):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert secret.encode() not in f.read(), os.path.join(root, name)


def test_a_stdin_that_cannot_be_spooled_fails_the_call_in_one_line_and_runs_nothing(
        local_env, tmp_path, small_tmpfs):
    """A real full disk under the cache: what was read of the pipe is gone, so the
    call must not run on part of it."""
    local_env["ARV_WRAP_STATE_DIR"] = str(small_tmpfs / "state")
    result = arv_wrap("--reuse", "--", "sh", "-c",
                      "head -c 4000000 /dev/zero | upcase -o out.txt /dev/stdin",
                      env=local_env, cwd=tmp_path, capture_output=True)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 125 and len(lines) == 1, lines
    assert lines[0].startswith("arv-wrap: job reuse failed: cannot keep its stdin") and \
        "No space left" in lines[0]
    assert runs(tmp_path) == 0


def test_a_call_that_waited_for_a_job_that_failed_runs_with_its_own_stdin(local_env, tmp_path):
    """Its piped stdin was read (for the key) while it waited: it must still get it."""
    hold, fail_once = tmp_path / "go", tmp_path / "fail-once"
    fail_once.touch()
    results = held_calls(2, local_env, tmp_path, hold, lambda: arv_wrap(
        "--reuse", "--", "sh", "-c", "printf abc | upcase -o out.txt /dev/stdin",
        env={**local_env, "HOLD": str(hold), "FAILONCE": str(fail_once)}, cwd=tmp_path,
        capture_output=True))
    assert sorted(r.returncode for r in results) == [0, 4]
    assert runs(tmp_path) == 2 and (tmp_path / "out.txt").read_text() == "ABC"
    assert not os.listdir(os.path.join(local_env["ARV_WRAP_STATE_DIR"], "cache", "tmp"))
