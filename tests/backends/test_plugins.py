"""A backend installed by another package: found through its entry point, its
whitelist block validated with file:line errors, its environment settings read,
and a real call run through it (shim, client, dispatcher, the plug-in's run()),
with the caller's process state that a remote backend must rebuild."""
import json
import os
import socket
import struct
import subprocess
import sys

import pytest

from arvwrap import paths
from conftest import IMPORTED_FROM, arv_wrap, job_records, write_tool

PLUGIN = '''
"""A tiny third-party backend: the tool runs as a child of the dispatcher."""
import dataclasses
import os
import resource
import subprocess
from typing import Optional

from arvwrap.backends import base
from arvwrap.jobspec import Outcome


def _one_word(value):
    return "a label is one word" if " " in value else None


@dataclasses.dataclass
class Settings:
    marker: str = "spawned"                 # ARV_WRAP_SPAWN_MARKER


@dataclasses.dataclass
class Options:
    label: Optional[str] = dataclasses.field(default=None, metadata={"check": _one_word})
    tags: list = dataclasses.field(default_factory=list, metadata={"merge": "append"})


class Backend(base.Backend):
    name = "spawn"
    Settings = Settings
    Options = Options
    fractional_cpus = True
    relays_streams = False
    process_state = ("spawned by the dispatcher: argv, environment, cwd",)
    job_noun = "a spawned job"

    def check(self):
        return f"spawn: ready ({self.settings.marker})"

    def largest(self):
        return 64.0, 1 << 40

    def run(self, job, started):
        options = self.options(job)
        nofile = [soft for res, soft, _ in job.rlimits if res == resource.RLIMIT_NOFILE]
        state = f"{job.nice} {job.ignored_signals:x} {job.blocked_signals:x} {nofile}"
        env = dict(job.env, SPAWN_MARKER=self.settings.marker.encode(), SPAWN_STATE=state.encode(),
                   SPAWN_LABEL=(options.label or "-").encode(),
                   SPAWN_TAGS=",".join(options.tags).encode())
        proc = subprocess.Popen([job.path, *job.argv[1:]], executable=job.path, cwd=job.cwd,
                                env=env, stdin=job.fds.get(0, subprocess.DEVNULL),
                                stdout=job.fds.get(1), stderr=job.fds.get(2))
        started(str(proc.pid))
        return Outcome("exited", exit_status=proc.wait())
'''


@pytest.fixture
def plugin_path(tmp_path):
    """A directory holding the plug-in and its dist-info (entry_points.txt), as pip
    would install it."""
    site = tmp_path / "site"
    (site / "arvwrap_spawn").mkdir(parents=True)
    (site / "arvwrap_spawn" / "__init__.py").write_text(PLUGIN)
    info = site / "arvwrap_spawn-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: arvwrap-spawn\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[arvwrap.backends]\nspawn = arvwrap_spawn:Backend\n")
    return str(site)


@pytest.fixture
def env(base_env, tools, plugin_path):
    base_env["PYTHONPATH"] = os.pathsep.join([plugin_path, IMPORTED_FROM])
    base_env["ARV_WRAP_SPAWN_MARKER"] = "hello"
    write_tool(tools, "step", 'echo "$SPAWN_MARKER $SPAWN_LABEL $SPAWN_TAGS $*"\n'
                              'echo to-stderr >&2\nexit 3\n')
    return base_env


RULES = """\
backend: spawn
spawn: {label: file, tags: [a]}
tools:
  - name: step
    spawn: {label: tool, tags: [b]}
"""


def test_a_call_runs_through_a_backend_installed_by_an_entry_point(env, whitelist_file):
    rules = whitelist_file(RULES)
    result = arv_wrap("-w", rules, "--", "step", "x y", env=env, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    assert (result.returncode, result.stdout, result.stderr) == \
        (3, b"hello tool a,b x y\n", b"to-stderr\n")
    [record] = job_records(env)
    assert (record["backend"], record["state"], record["exit_status"]) == ("spawn", "exited", 3)
    assert record["backend_id"].isdigit()


# nohup's SIGHUP, a lower nice and a smaller descriptor limit: a remote backend must
# rebuild them (the client sends them when the dispatcher asks, "state")
CALLER = 'trap "" HUP; ulimit -n 100; exec nice -n 3 "$@"'
PROBE = ('echo "$(nice) $(grep SigIgn /proc/self/status | cut -f2) '
         '$(grep SigBlk /proc/self/status | cut -f2) $(ulimit -n)"\n')


def test_the_backend_gets_the_callers_process_state_as_a_direct_run_has_it(
        env, tools, whitelist_file):
    write_tool(tools, "probe", PROBE)
    write_tool(tools, "step", 'echo "$SPAWN_STATE"\n')
    nice, ignored, blocked, nofile = subprocess.run(
        ["sh", "-c", CALLER, "sh", "probe"], env=env, stdout=subprocess.PIPE,
        check=True).stdout.split()
    assert int(ignored, 16) & 1 << 0 and int(nice) == os.getpriority(os.PRIO_PROCESS, 0) + 3
    result = arv_wrap("-w", whitelist_file(RULES), "--", "sh", "-c", CALLER, "sh", "step",
                      env=env, stdout=subprocess.PIPE, check=True)
    expected = f"{int(nice)} {int(ignored, 16):x} {int(blocked, 16):x} [{int(nofile)}]\n"
    assert result.stdout.decode() == expected
    [record] = job_records(env)
    assert (record["backend"], record["state"]) == ("spawn", "exited")


def asked_for_state(env, tool):
    """A hand-made client's connection for tool, once the dispatcher asked it "state"."""
    fields = [b"R0", b"P" + os.fsencode(tool), b"Astep",
              *(b"E%s=%s" % (os.fsencode(k), os.fsencode(v)) for k, v in env.items()),
              b"C/", b"U18", b"I%d" % os.getpid()]
    payload = b"".join(f + b"\0" for f in fields)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(paths.socket_path(env))
    sock.sendall(b"AWR1" + struct.pack("<Q", len(payload)) + payload)
    got = b""
    while not got.endswith(b"state\n"):
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    return sock


def test_a_bad_state_answer_fails_the_call_and_one_never_given_leaves_no_record(
        env, tools, whitelist_file):
    step = write_tool(tools, "step", "exit 0\n")
    rules = whitelist_file(RULES)
    assert arv_wrap("-w", rules, "--", "step", env=env).returncode == 0   # a dispatcher up
    job_env = json.loads(arv_wrap("-w", rules, "--", sys.executable, "-c",
                                  "import os, json; print(json.dumps(dict(os.environ)))",
                                  env=env, stdout=subprocess.PIPE, check=True).stdout)
    with asked_for_state(job_env, step) as sock:
        sock.sendall(b"state G1\0G2\0\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert answer == b"fail the client sent a bad process state: " \
                     b"state field G (ignored signals) given twice\n"
    asked_for_state(job_env, step).close()          # the caller goes before it answers
    assert arv_wrap("-w", rules, "--", "step", env=env).returncode == 0   # it serves on
    assert [r["backend"] for r in job_records(env)] == ["spawn", "spawn"]


def test_its_block_is_validated_with_file_and_line(env, whitelist_file):
    rules = whitelist_file("tools:\n  - name: step\n    spawn:\n      label: two words\n")
    result = arv_wrap("-w", rules, "--", "step", env=env, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    assert result.returncode == 2
    assert result.stderr.decode().splitlines() == [
        f"arv-wrap: {rules}:4: tools[0].spawn.label: a label is one word"]
    rules = whitelist_file("spawn: {colour: red}\n")
    result = arv_wrap("-w", rules, "--", "step", env=env, stderr=subprocess.PIPE)
    assert result.stderr.decode().strip() == \
        f"arv-wrap: {rules}:1: spawn.colour: unknown key (known: label, tags)"


def test_the_core_lists_it_and_check_and_doctor_ask_it(env, whitelist_file):
    rules = whitelist_file(RULES)
    code = ("from arvwrap import whitelist, backends; "
            "print(whitelist.KNOWN_BACKENDS, list(backends.with_options()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                         check=True).stdout.decode()
    assert out.strip() == "('local', 'slurm', 'docker', 'spawn') ['slurm', 'spawn']"
    text = arv_wrap("-w", rules, "check", "--", "step", env=env, stdout=subprocess.PIPE,
                    check=True).stdout.decode()
    assert "backend: spawn" in text and "spawn: label=tool, tags=['a', 'b']" in text
    assert "process state: spawned by the dispatcher" in text
    doctor = arv_wrap("-w", rules, "-b", "spawn", "doctor", env=env, stdout=subprocess.PIPE)
    assert b"ok    spawn: ready (hello)" in doctor.stdout
    assert b"a redirected `true` ran as job" in doctor.stdout, doctor.stdout


def test_a_bad_setting_or_a_broken_plugin_is_one_line(env, whitelist_file, plugin_path):
    rules = whitelist_file(RULES)
    env["ARV_WRAP_LOCAL_CPUS"] = "2"
    bad = dict(env, ARV_WRAP_SPAWN_MARKER="")        # empty: the default
    result = arv_wrap("-w", rules, "--", "step", env=bad, stdout=subprocess.PIPE)
    assert result.stdout.startswith(b"spawned ")
    entry = os.path.join(plugin_path, "arvwrap_spawn-1.0.dist-info", "entry_points.txt")
    with open(entry, "w") as f:
        f.write("[arvwrap.backends]\nspawn = arvwrap_spawn:NoSuchClass\n")
    result = arv_wrap("-w", rules, "-b", "spawn", "doctor", env=env, stdout=subprocess.PIPE)
    assert b"FAIL  backend spawn: backend 'spawn' (arvwrap_spawn:NoSuchClass) cannot be " \
           b"loaded" in result.stdout


def test_settings_from_the_environment_are_typed():
    from arvwrap.backends import BackendError, settings
    from arvwrap.backends.slurm import Settings
    got = settings.from_env(Settings, "slurm", {"ARV_WRAP_SLURM_MAX_JOBS": "7.0",
                                                "ARV_WRAP_SLURM_POLL": "0.5",
                                                "ARV_WRAP_SLURM_HOST": "10.0.0.1"})
    assert (got.max_jobs, got.poll, got.host, got.submit_rate) == (7, 0.5, "10.0.0.1", 10.0)
    with pytest.raises(BackendError, match=r"^ARV_WRAP_SLURM_POLL='soon' is not a number$"):
        settings.from_env(Settings, "slurm", {"ARV_WRAP_SLURM_POLL": "soon"})
    from arvwrap.backends.local import Settings as Local
    with pytest.raises(BackendError, match="ARV_WRAP_LOCAL_MEMORY='lots' is not a size"):
        settings.from_env(Local, "local", {"ARV_WRAP_LOCAL_MEMORY": "lots"})
    assert settings.from_env(Local, "local", {"ARV_WRAP_LOCAL_MEMORY": "1G"}).memory == 1 << 30


def test_capabilities_decide_what_the_dispatcher_and_check_do():
    from types import SimpleNamespace
    from arvwrap import backends
    from arvwrap.backends.base import must_run_locally
    call = SimpleNamespace(fds={0: 5}, argv=[b"cat", b"/dev/fd/63"])
    assert must_run_locally(backends.backend_class("local"), call) is None
    assert must_run_locally(backends.backend_class("slurm"), call).endswith(
        "which a Slurm job cannot reach")
    assert must_run_locally(backends.backend_class("docker"), call).endswith(
        "which a container cannot reach")
    assert must_run_locally(backends.backend_class("slurm"),
                            SimpleNamespace(fds={0: 5, 1: 6}, argv=[b"cat", b"x"])) is None
    caps = {name: (c.carries_descriptors, c.fractional_cpus, c.shared_filesystem)
            for name in ("local", "slurm", "docker")
            for c in [backends.backend_class(name)]}
    assert caps == {"local": (True, True, False), "slurm": (False, False, True),
                    "docker": (False, True, False)}


def test_doctor_says_where_the_cwd_lives_for_a_backend_that_needs_a_shared_filesystem(
        monkeypatch, tmp_path):
    from arvwrap import doctor
    assert doctor.filesystem_type("/proc/self") == "proc"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(doctor, "filesystem_type", lambda path: "tmpfs")
    ok, text = doctor.shared_filesystem("slurm")
    assert ok and text.startswith(f"files: the cwd {tmp_path} is on tmpfs, which only this host")
    spawn_like = {"backend": "local", "whitelists": []}
    assert not any(t.startswith("files:") for _, t in doctor.backend_checks(spawn_like))


def test_check_notes_what_the_backends_capabilities_change(whitelist_file):
    from arvwrap import whitelist
    from arvwrap.commands.checking import capability_notes
    rule = whitelist.load([whitelist_file("tools: [{name: cat, cpus: 0.5}]\n")]).rules[0]
    argv = [b"cat", b"/dev/fd/63"]
    assert capability_notes(rule, argv, "local") == []
    assert capability_notes(rule, argv, "docker") == [
        "an argument names one of the caller's descriptors (/dev/fd/N), which a container "
        "cannot reach: runs on the local backend"]
    assert capability_notes(rule, [b"cat"], "slurm") == [
        "the slurm backend grants whole CPUs: 0.5 CPUs get 1"]
    assert capability_notes(rule, argv, "nosuch") == []
