"""Issue 12, point 7: secrets and permissions.

No secret (the value of a variable whose name matches a redaction glob, or a value
given in argv as --password=..., TOKEN=..., --token X) is written to what arv-wrap
writes: the records (so `jobs --json`, `show`, `top`, the report), the dispatcher's
log, the kept Slurm stderr; the tool itself gets its argv and environment untouched.
The state dir and everything in it is private (dirs 0700, files 0600). The Slurm
relay hands a stream only to a connection that sends its job's one-time token, and
logs the others.
"""
import os
import secrets as random_secrets
import socket
import stat
import subprocess
import sys
from pathlib import Path

from arvwrap import paths, redact
from conftest import arv_wrap, job_records, slurm_relay, until, write_tool


ARGS = 'for a in "$@"; do printf "%s\\0" "$a"; done\n'   # the tool says what it got


def secret():
    return "s3cr3t" + random_secrets.token_hex(8)


# -- the redactor itself ----------------------------------------------------------

def test_argv_forms_and_values_are_redacted_and_nothing_else():
    env = {b"MY_API_TOKEN": b"tokvalue123", b"HOME": b"/root", b"PINCODE": b"123456",
           b"SHORT_KEY": b"ab"}
    r = redact.Redactor(redact.patterns_from({"ARV_WRAP_REDACT": "*PIN*"}), env)
    got = r.argv([b"env", b"TOKEN=abc", b"tool", b"--password=xyz", b"--api-key", b"k3y-given",
                  b"in-tokvalue123-side", b"pin:123456", b"/root/file", b"ab", b"-t", b"4"])
    assert got == [b"env", b"TOKEN=***", b"tool", b"--password=***", b"--api-key", b"***",
                   b"in-***-side", b"pin:***", b"/root/file", b"ab", b"-t", b"4"]
    # what argv gave is a secret for the texts that follow (a reason, a log line)
    assert r.text("bad key k3y-given; MY_API_TOKEN=zz tokvalue123") == \
        "bad key ***; MY_API_TOKEN=*** ***"
    assert redact.Redactor(redact.DEFAULTS, {}).argv([b"sort", b"-k2", b"file"]) == \
        [b"sort", b"-k2", b"file"]


def test_a_value_cut_anywhere_in_a_stream_is_redacted():
    values = {b"abcdefgh123", b"s3kr1tz"}
    data = b"x abcdefgh123 y s3kr1tz z abcdefgh12 s3kr1" * 3
    for size in (1, 2, 3, 5, 7, 64):
        stream = redact.StreamRedactor(values)
        out = b"".join(stream.feed(data[i:i + size]) for i in range(0, len(data), size))
        out += stream.flush()
        assert out == data.replace(b"abcdefgh123", b"***").replace(b"s3kr1tz", b"***")


def test_the_dispatcher_log_never_shows_a_calls_secret(tmp_path):
    """Its handler's filter (the dispatcher adds each call's secrets to it): messages,
    their arguments and tracebacks."""
    import logging
    from arvwrap import dispatcher
    dispatcher.LOG_REDACTOR.values.add(b"v3rys3cr3tvalue")
    handler = logging.FileHandler(tmp_path / "log")
    handler.addFilter(dispatcher.RedactingFilter())
    logger = logging.getLogger("arvwrap.test-redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("bad request: %s", "tool --password=abc v3rys3cr3tvalue")
        try:
            raise ValueError("v3rys3cr3tvalue inside")
        except ValueError:
            logger.exception("failed on %s", "MY_TOKEN=xyz")
    finally:
        logger.removeHandler(handler)
        handler.close()
        dispatcher.LOG_REDACTOR.values.discard(b"v3rys3cr3tvalue")
    text = (tmp_path / "log").read_text()
    assert "bad request: tool --password=*** ***" in text and "MY_TOKEN=***" in text
    assert "ValueError: *** inside" in text
    assert "v3rys3cr3tvalue" not in text and "abc" not in text and "xyz" not in text


# -- end to end ------------------------------------------------------------------

def every_file(directory):
    for top, dirs, files in os.walk(directory):
        for name in dirs + files:
            yield os.path.join(top, name)


def assert_private(state_dir):
    """The state dir and all it holds: directories 0700, files 0600, all ours; and the
    socket's directory."""
    seen = []
    for path in [state_dir, *every_file(state_dir)]:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        assert st.st_uid == os.getuid(), path
        if stat.S_ISDIR(st.st_mode):
            assert mode == 0o700, f"{path}: {mode:o}"
        else:
            assert mode == 0o600, f"{path}: {mode:o}"
        seen.append(os.path.relpath(path, state_dir))
    sock_dir = os.path.dirname(paths.socket_path({"ARV_WRAP_STATE_DIR": state_dir}))
    assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o700
    return seen


def assert_nowhere(values, state_dir, *texts):
    for path in every_file(state_dir):
        if os.path.isfile(path):
            data = Path(path).read_bytes()
            for value in values:
                assert value.encode() not in data, f"{value} written to {path}"
    for text in texts:
        for value in values:
            assert value.encode() not in text, f"{value} shown"


def outputs(env, tmp_path):
    """What arv-wrap shows of the records: jobs --json, --tree, show of each, the report."""
    shown = [arv_wrap("jobs", "--json", env=env, capture_output=True, check=True).stdout,
             arv_wrap("jobs", "--tree", env=env, capture_output=True, check=True).stdout,
             arv_wrap("top", env=env, capture_output=True, check=True).stdout]
    for record in job_records(env):
        shown.append(arv_wrap("show", record["id"], env=env, capture_output=True).stdout)
    report = tmp_path / "report.html"
    arv_wrap("report", "-o", str(report), env=env, check=True, capture_output=True)
    return shown + [report.read_bytes()]


def run_with_secrets(env, tools, tmp_path, extra_rules="", backend_rules=""):
    write_tool(tools, "args", ARGS)
    write_tool(tools, "complain", ARGS + 'echo "denied for $MY_API_TOKEN" >&2; exit 3\n')
    token, password, given, pin, mine = secret(), secret(), secret(), secret(), secret()
    wl = tmp_path / "w.yaml"
    wl.write_text(backend_rules + 'redact: ["*PIN*"]\ntools:\n  - name: args\n'
                  '  - name: complain\n' + extra_rules)
    env.update(MY_API_TOKEN=token, DB_PIN=pin, MYVAR=mine, ARV_WRAP_REDACT="MYVAR",
               ARV_WRAP_WHITELIST=str(wl))
    argv = ["args", f"--password={password}", "--token", given, f"x{token}y", f"TOKEN={given}",
            f"{pin}", f"{mine}"]
    # (complain's stdin a pipe: on Slurm the spool dir is made too)
    result = arv_wrap("--", "bash", "-c", 'args "$@"; echo in | env "TOKEN=$3" complain "$1"', "-",
                      *argv[1:], env=env, capture_output=True, stdin=subprocess.DEVNULL)
    # the tools got everything untouched, and the caller every byte they wrote
    assert result.stdout == ("\0".join(argv[1:]) + "\0" + argv[1] + "\0").encode()
    assert result.stderr == f"denied for {token}\n".encode()
    assert result.returncode == 3
    records = job_records(env)
    assert len(records) == 2
    assert records[1]["argv"] == ["args", "--password=***", "--token", "***", "x***y",
                                  "TOKEN=***", "***", "***"]
    return [token, password, given, pin, mine], records


def test_no_secret_reaches_the_state_dir_or_what_is_shown_local(tools, base_env, tmp_path):
    values, records = run_with_secrets(base_env, tools, tmp_path)
    assert records[0]["argv"] == ["complain", "--password=***"]
    assert_nowhere(values, base_env["ARV_WRAP_STATE_DIR"], *outputs(base_env, tmp_path))
    seen = assert_private(base_env["ARV_WRAP_STATE_DIR"])
    assert {"dispatcher.log", "jobs.sqlite", "jobs.sqlite-wal", "jobs.sqlite-shm"} <= set(seen)


def test_no_secret_reaches_the_state_dir_or_what_is_shown_slurm(slurm_cluster, client, tools,
                                                               base_env, tmp_path):
    values, records = run_with_secrets(base_env, tools, tmp_path, backend_rules="backend: slurm\n")
    assert [r["backend"] for r in records] == ["slurm", "slurm"]
    log = Path(base_env["ARV_WRAP_STATE_DIR"], "logs", records[0]["id"] + ".stderr")
    assert log.read_bytes() == b"denied for ***\n"          # kept, without the secret
    shown = outputs(base_env, tmp_path)
    assert b"denied for ***" in b"".join(shown)             # show's tail of a failed job
    assert_nowhere(values, base_env["ARV_WRAP_STATE_DIR"], *shown)
    seen = assert_private(base_env["ARV_WRAP_STATE_DIR"])
    assert {"logs", "spool", f"logs/{records[0]['id']}.stderr"} <= set(seen), seen


# -- the relay takes only its job's own connections --------------------------------

def refused(host, port, line):
    """Connect, send line and a payload; True if the dispatcher closes on us."""
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(line + b"INJECTED\n")
        s.settimeout(10)
        try:
            return s.recv(1) == b""
        except ConnectionResetError:
            return True


def test_the_relay_refuses_and_logs_connections_without_their_jobs_token(
        slurm_cluster, client, tools, base_env, tmp_path):
    write_tool(tools, "hold", 'echo started; while [ ! -e "$1" ]; do sleep 0.05; done; echo done\n')
    wl = tmp_path / "w.yaml"
    wl.write_text("backend: slurm\ntools:\n  - name: hold\n")
    base_env["ARV_WRAP_WHITELIST"] = str(wl)
    go = tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-m", "arvwrap", "--", "hold", str(go)],
                            env=base_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"started\n"
        job = until(lambda: [r for r in job_records(base_env) if r["state"] == "running"], 20)[0]
        _, relay = until(lambda: slurm_relay(job["backend_id"]), 10, "the relay")
        host, port = relay["ARV_WRAP_SLURM_HOST"], int(relay["ARV_WRAP_SLURM_PORT"])
        token = relay["ARV_WRAP_SLURM_TOKEN"].encode()
        other = random_secrets.token_hex(16).encode()
        # no token, another token, and the job's own, which its relay has used already
        for line in (b"o\n", b"o" + other + b"\n", b"e" + token + b"\n", b"x" * 200):
            assert refused(host, port, line), line
    finally:
        go.touch()
        out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out, err) == (0, b"done\n", b"")
    log = Path(base_env["ARV_WRAP_STATE_DIR"], "dispatcher.log").read_text()
    lines = [l for l in log.splitlines() if "slurm relay: refused a connection" in l]
    assert len(lines) == 4, log
    assert token.decode() not in log and other.decode() not in log
