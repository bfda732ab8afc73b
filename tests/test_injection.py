"""Issue 12, point 2: no injection. Wherever arv-wrap builds a command line, a script
or a container command (the Slurm backend's srun argv and its relay, the Docker
backend's container, the compiled rules string, `arv-wrap check`, the job record and
what shows it), arguments such as `$(touch x)`, backticks, `;`, `&&`, quotes, newlines,
`|`, `>`, globs and leading dashes never run anything and reach the tool as given:
in argv, in argv[0], in the cwd's name, in environment values and in the names of
files that argv names. Every shell command hidden in them would create a marker file;
none may ever appear.

The tool is argdump of tests/test_properties.py (its argc, argv, cwd and environ,
NUL-separated, to $DUMP_OUT), run directly and redirected, and compared.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from arvwrap import whitelist
from conftest import ON_CI
from test_properties import (ARGDUMP_C, CALLER, World, clear, read_dump, slurm_cluster,
                             slurm_modulo, without_arv_wrap)

TOKEN = f"awinj{os.getpid()}"          # the name of every marker a relative command makes

RULES = """
tools:
  - name: argdump
  - name: cat
  - name: "$(touch {token}-name1);touch {token}-name2|n:*,`touch {token}-name3`"
  - name: sub
    when:
      subcommand: ["a,b", "x;n:*", "p|q", "c=d", "100%", "sp ace", "nl\\nx"]
      not_flags: ["--k;n:*", "--a,--b"]
"""
HOSTILE_NAME = f"$(touch {TOKEN}-name1);touch {TOKEN}-name2|n:*,`touch {TOKEN}-name3`"


def hostile_args(marks):
    """Arguments a shell would run something for: each names its own marker in marks."""
    m = os.fsencode(marks)
    return [
        b"$(touch " + m + b"/dollar)", b"`touch " + m + b"/backtick`",
        b"; touch " + m + b"/semicolon", b"x;touch " + m + b"/semicolon2",
        b"&& touch " + m + b"/and", b"|| touch " + m + b"/or", b"| touch " + m + b"/pipe",
        b"& touch " + m + b"/background", b"> " + m + b"/redirect", b">> " + m + b"/append",
        b"'; touch " + m + b"/squote; '", b'"; touch ' + m + b'/dquote; "',
        b"\ntouch " + m + b"/newline\n", b"\r\ntouch " + m + b"/crlf",
        b"$(touch${IFS}" + m + b"/ifs)", b"<(touch " + m + b"/procsub)",
        b">(touch " + m + b"/procsub2)", b"${x:-$(touch " + m + b"/param)}",
        b"$'\\n'touch " + m + b"/ansi", b"() { :; }; touch " + m + b"/function",
        b"%(touch " + m + b"/percent)s %s %n %x %j",
        # srun: a bare ":" starts another (heterogeneous) job's command line
        b":", b"-N1", b"/usr/bin/touch", m + b"/hetjob", b":", b"/usr/bin/touch", m + b"/hetjob2",
        # globs, which would expand in the cwd (it has files)
        b"*", b"?", b"[a-z]*", m + b"/*", b"~", b"{a,b}",
        # leading dashes: options of srun, docker, the relay, arv-wrap itself
        b"-", b"--", b"-rf", b"--chdir=/", b"--export=NONE", b"--wrap=touch " + m + b"/wrap",
        b"--relay", b"--launch", b"--exec", b"-b", b"slurm", b"--as-job", b"-v",
        b"--entrypoint=/usr/bin/touch", b"--help",
        # quotes and escapes on their own
        b"'", b'"', b"\\", b"\\'", b"'\"'\"'", b"", b" ", b"\n", b"\t", b"#", b"!", b"$",
        b"$HOME", b"$$", b"<script>alert(1)</script>", b"<img src=x onerror=alert(1)>",
    ]


# -- the module's world: tool, rules, state dir, one dispatcher ----------------------

@pytest.fixture(scope="session")
def argdump_static(tmp_path_factory):
    where = tmp_path_factory.mktemp("argdump-inj")
    src = where / "argdump.c"
    src.write_text(ARGDUMP_C)
    exe = where / "argdump"
    cc = os.environ.get("CC", "cc")
    if subprocess.run([cc, "-O2", "-static", "-o", str(exe), str(src)],
                      capture_output=True).returncode != 0:
        subprocess.run([cc, "-O2", "-o", str(exe), str(src)], check=True)
    return str(exe)


@pytest.fixture(scope="module")
def world(tmp_path_factory, argdump_static, client):      # client: rebuilt when stale
    base = tmp_path_factory.mktemp("inj")
    rules = base / "rules.yaml"
    rules.write_text(RULES.format(token=TOKEN))
    # (SLURM_CONF stays: it names the cluster the Slurm runs go to)
    env = {k: v for k, v in os.environb.items()
           if not k.startswith((b"ARV_WRAP_", b"SLURM", b"SBATCH_", b"SALLOC_", b"SRUN_", b"PT_"))
           or k == b"SLURM_CONF"
           if k not in (b"LD_PRELOAD", b"BASH_ENV", b"ENV")}
    env[b"ARV_WRAP_STATE_DIR"] = os.fsencode(base / "state")
    env[b"ARV_WRAP_IDLE_TIMEOUT"] = b"60"
    w = World(base, argdump_static, str(rules), env)
    w.marks = base / "marks"
    w.marks.mkdir()
    w.work = base / "work"               # the cwd of the runs: files a glob would find
    w.work.mkdir()
    for name in ("a1", "b2", "c3"):
        (w.work / name).write_text(name)
    yield w
    if w.store is not None:
        w.store.close()
    for pid in w.dispatcher_pids():      # only this module's dispatcher, by its pid
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def slurm(world):
    slurm_cluster()
    return world


def markers(w):
    """Every marker file made so far: in the marks dir (absolute commands), and any file
    named after TOKEN (relative commands) where a shell could have run them."""
    found = [str(p) for p in w.marks.iterdir()]
    places = {"/", "/tmp", os.path.expanduser("~"), os.getcwd(), str(w.base)}
    for pid in w.dispatcher_pids():
        try:
            places.add(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            pass
    for top in places:
        walk = os.walk(top) if top == str(w.base) else [(top, [], os.listdir(top))]
        for where, dirs, files in walk:
            found += [os.path.join(where, f) for f in files + dirs if f.startswith(TOKEN)]
    return found


def run(cmd, env, cwd, **kwargs):
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, timeout=120, **kwargs)


def arv_wrap_cmd(w, backend, *words):
    return [sys.executable.encode(), b"-m", b"arvwrap", b"-w", os.fsencode(w.rules),
            *([] if backend == "local" else [b"-b", backend.encode()]), *words]


def direct_and_wrapped(w, tool, args, cwd, backend, extra_env=None, argv0s=()):
    """Run tool with args directly and through `arv-wrap -- TOOL ARGS`, then from the
    caller (argv[0] each of argv0s) unwrapped and under the activated environment;
    assert that every job saw what its direct run saw, and return the jobs' dumps."""
    out = w.fresh()
    env = {**w.env, **(extra_env or {}), b"DUMP_OUT": out}
    tool = os.fsencode(tool)
    pairs = []
    clear(out)
    proc = run([tool, *args], env, cwd)
    assert proc.returncode == 0, proc.stderr
    direct = read_dump(out)
    clear(out)
    proc = run(arv_wrap_cmd(w, backend, b"--", tool, *args), env, cwd)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    pairs.append((read_dump(out), direct))
    def caller(argv0, activated):
        clear(out, out + b".1")
        caller_env = {**env, **(w.activation(backend) if activated else {})}
        proc = run([sys.executable, "-S", "-c", CALLER], caller_env, cwd, stdin=None,
                   input=b"".join(a + b"\0" for a in [tool, argv0, *args]))
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
        return read_dump(out + b".1"), read_dump(out)      # by subprocess, by os.execve
    for argv0 in argv0s:
        unwrapped = caller(argv0, False)
        assert all(d.argv == [argv0, *args] for d in unwrapped)
        pairs += zip(caller(argv0, True), unwrapped)
    jobs = []
    for job, direct in pairs:
        assert job.argv == direct.argv
        assert job.cwd == direct.cwd
        job_env, expected = job.env, without_arv_wrap(direct.env)
        if backend == "slurm":
            job_env, expected = slurm_modulo(job_env, expected)
        ids = [e.split(b"=", 1)[1] for e in job_env if e.startswith(b"ARV_WRAP_JOB=")]
        assert len(ids) == 1, "not redirected"
        # the same entries (their order is tests/test_properties.py's business)
        assert sorted(e for e in job_env if not e.startswith(b"ARV_WRAP_JOB=")) == sorted(expected)
        rec = w.record(ids[0].decode())
        assert (rec["backend"], rec["state"], rec["exit_status"]) == (backend, "exited", 0)
        assert [os.fsencode(a) for a in rec["argv"]] == direct.argv
        assert os.fsencode(rec["cwd"]) == direct.cwd
        jobs.append((job, rec))
    return jobs


# -- argv, argv[0], the program's name: local and Slurm ------------------------------

def hostile_call(w, backend):
    args = hostile_args(w.marks)
    argv0s = [b"$(touch " + os.fsencode(w.marks) + b"/argv0)", b":", b"--relay", b"-v", b""]
    jobs = direct_and_wrapped(w, w.tool, args, w.work, backend, argv0s=argv0s)
    assert markers(w) == []
    return jobs


def test_hostile_arguments_reach_a_local_job_as_given(world):
    jobs = hostile_call(world, "local")
    # the views of the records build command lines too: they show, never run
    env = world.env
    job_id = jobs[0][1]["id"]
    for words in (["show", job_id], ["jobs", "--tree"], ["jobs"],
                  ["report", "-o", str(world.base / "report.html")]):
        proc = run([sys.executable, "-m", "arvwrap", *words], env, world.work)
        assert proc.returncode == 0, proc.stderr
    html = (world.base / "report.html").read_bytes().lower()
    assert b"<script" not in html and b"<img" not in html, "argv reached the report as HTML"
    records = json.loads(run([sys.executable, "-m", "arvwrap", "jobs", "--json"], env,
                             world.work).stdout)
    [rec] = [r for r in records if r["id"] == job_id]
    assert [os.fsencode(a) for a in rec["argv"]] == jobs[0][0].argv
    assert markers(world) == []


def test_hostile_arguments_as_a_local_driver_job(world):
    # --as-job submits the command itself: the same argv, no shell between
    out = world.fresh()
    args = hostile_args(world.marks)
    env = {**world.env, b"DUMP_OUT": out}
    proc = run(arv_wrap_cmd(world, "local", b"--as-job", b"--", os.fsencode(world.tool), *args),
               env, world.work)
    assert (proc.returncode, proc.stderr) == (0, b"")
    assert read_dump(out).argv == [os.fsencode(world.tool), *args]
    assert markers(world) == []


def test_hostile_arguments_reach_a_slurm_job_as_given(slurm):
    hostile_call(slurm, "slurm")


def hostile_program(w):
    """argdump under a name full of shell and rules syntax, whitelisted by that name."""
    bin_dir = w.base / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / HOSTILE_NAME
    if not path.exists():
        shutil.copy(w.tool, path)
    return path


@pytest.mark.parametrize("backend", ["local", "slurm"])
def test_a_program_named_like_a_command_line(world, backend):
    if backend == "slurm":
        slurm_cluster()
    path = hostile_program(world)
    direct_and_wrapped(world, path, [b"x"], world.work, backend, argv0s=[os.fsencode(path)])
    assert markers(world) == []


# -- the cwd's name ------------------------------------------------------------------

CWD_NAME = (f"$(touch {TOKEN}-cwd1);touch {TOKEN}-cwd2 && touch {TOKEN}-cwd3 `touch "
            f"{TOKEN}-cwd4` | touch {TOKEN}-cwd5 > {TOKEN}-cwd6 '\"\n touch {TOKEN}-cwd7 -x *")


@pytest.mark.parametrize("backend", ["local", "slurm"])
def test_a_cwd_named_like_a_command_line(world, backend):
    if backend == "slurm":
        slurm_cluster()
    cwd = world.base / CWD_NAME
    cwd.mkdir(exist_ok=True)
    (cwd / "f").write_text("a glob would find me")
    jobs = direct_and_wrapped(world, world.tool, [b"-x", b"*"], cwd, backend,
                              argv0s=[b"argdump"])
    assert all(job.cwd == os.fsencode(cwd) for job, _ in jobs)
    assert markers(world) == []


def test_a_cwd_named_like_srun_messages_fakes_nothing(slurm):
    # srun -v echoes its options, --chdir among them, before anything else it says:
    # a cwd whose name has a newline and then "srun: end of defined options" must not
    # let the lines after it pass for srun's own (a job id, a cancel, a memory kill,
    # a status)
    # (three nested directories: a name has at most 255 bytes and no "/")
    cwd = slurm.base.joinpath(
        "d\nsrun: end of defined options\nsrun: jobid 1: nodes(1):`vm', cpu counts: 1(x1)\n"
        "srun: job 2 queued and waiting for resources",
        "\nsrun: error: *** STEP 1.0 ON vm CANCELLED AT 2020-01-01T00:00:00 ***\n"
        "srun: error: exceeded memory limit\nsrun: launch",
        "slurm: _task_finish: Received task exit notification for 1 task of StepId=1.0 "
        "(status=0x0009).\narv-wrap-relay: usage 1 1 1")
    cwd.mkdir(parents=True, exist_ok=True)
    [(job, rec)] = direct_and_wrapped(slurm, slurm.tool, [b"x"], cwd, "slurm")
    slurm_job_id = [e.split(b"=", 1)[1].decode() for e in job.env
                    if e.startswith(b"SLURM_JOB_ID=")]
    assert rec["backend_id"] == slurm_job_id[0], \
        "the job's Slurm id was read from its cwd's name, not from srun"
    assert rec["reason"] is None


# -- environment values --------------------------------------------------------------

def hostile_env(w):
    m = os.fsencode(w.marks)
    script = w.base / "sourced.sh"           # would run if any shell sourced BASH_ENV / ENV
    script.write_text(f"touch {w.marks}/sourced-$$\n")
    return {
        b"PT_DOLLAR": b"$(touch " + m + b"/env-dollar)", b"PT_TICK": b"`touch " + m + b"/env-tick`",
        b"PT_SEMI": b"x; touch " + m + b"/env-semi", b"PT_NL": b"x\ntouch " + m + b"/env-nl\n",
        b"PT_SHELLSHOCK": b"() { :; }; touch " + m + b"/env-shellshock",
        b"BASH_FUNC_pt%%": b"() { touch " + m + b"/env-func; }",
        b"PT_EQ": b"a=b; touch " + m + b"/env-eq", b"PT_QUOTES": b"'\"'\"'\\",
        b"BASH_ENV": os.fsencode(script), b"ENV": os.fsencode(script),
    }


@pytest.mark.parametrize("backend", ["local", "slurm"])
def test_hostile_environment_values(world, backend):
    if backend == "slurm":
        slurm_cluster()
    extra = hostile_env(world)
    jobs = direct_and_wrapped(world, world.tool, [b"x"], world.work, backend, extra_env=extra,
                              argv0s=[b"argdump"])
    for job, _ in jobs:
        for name, value in extra.items():
            assert job.env.count(name + b"=" + value) == 1
    assert markers(world) == []


# -- file names that argv names ------------------------------------------------------

FILE_NAMES = [f"$(touch {TOKEN}-file1)", f"`touch {TOKEN}-file2`", f";touch {TOKEN}-file3",
              f"a && touch {TOKEN}-file4", "quote'd \"file\"", "new\nline", "*", "-n",
              "--help", " lead space", "x|y>z"]


@pytest.mark.parametrize("backend", ["local", "slurm"])
def test_files_with_hostile_names_are_read_as_named(world, backend):
    if backend == "slurm":
        slurm_cluster()
    files = world.base / "files"
    files.mkdir(exist_ok=True)
    for i, name in enumerate(FILE_NAMES):
        (files / name).write_bytes(b"content %d of %r\n" % (i, name.encode()))
    args = [b"--", *(os.fsencode(n) for n in FILE_NAMES), b"./-n"]
    direct = run(["cat", *args], world.env, files)
    assert direct.returncode == 0 and direct.stdout.count(b"content") == len(FILE_NAMES) + 1
    wrapped = run(arv_wrap_cmd(world, backend, b"--", b"cat", *args), world.env, files)
    assert (wrapped.returncode, wrapped.stdout, wrapped.stderr) == \
        (direct.returncode, direct.stdout, direct.stderr)
    assert markers(world) == []


# -- the compiled rules string and `arv-wrap check` ----------------------------------

def test_the_compiled_rules_keep_their_syntax_out_of_names_and_items(world):
    rules = whitelist.load([world.rules])
    assert len(rules) == 4
    cases = {   # argv -> redirected by rule (None: runs locally)
        ("argdump",): "argdump", (HOSTILE_NAME,): HOSTILE_NAME, ("true",): None,
        ("n:*",): None, ("x",): None, ("touch",): None,
        ("sub", "a,b"): "sub", ("sub", "a"): None, ("sub", "b"): None,
        ("sub", "x;n:*"): "sub", ("sub", "x"): None, ("sub", "p|q"): "sub", ("sub", "p"): None,
        ("sub", "c=d"): "sub", ("sub", "c"): None, ("sub", "100%"): "sub",
        ("sub", "100%25"): None, ("sub", "sp ace"): "sub", ("sub", "sp"): None,
        ("sub", "nl\nx"): "sub", ("sub", "nl"): None,
        ("sub", "a,b", "--k;n:*"): None, ("sub", "a,b", "--k"): "sub",
        ("sub", "a,b", "--a,--b=1"): None, ("sub", "a,b", "--a"): "sub",
        ("sub", "a,b", "--b"): "sub",
    }
    for argv, expected in cases.items():
        argv_b = [os.fsencode(a) for a in argv]
        rule = rules.match(argv_b, os.path.basename(argv_b[0]), None)
        assert (rule.pattern if rule else None) == expected, argv


def test_the_shim_reads_the_same_rules(world):
    # the compiled string crosses to every process in ARV_WRAP_RULES, where the shim's
    # own parser reads it: a hostile name must not become a rule for everything
    path = hostile_program(world)
    plain = world.base / "bin" / "plain"
    if not plain.exists():
        shutil.copy(world.tool, plain)
    seen = {}
    for program in (path, plain):
        out = world.fresh()
        env = {**world.env, b"DUMP_OUT": out, **world.activation("local")}
        proc = run([sys.executable, "-S", "-c", CALLER], env, world.work, stdin=None,
                   input=b"".join(a + b"\0" for a in [os.fsencode(program)] * 2))
        assert proc.returncode == 0, proc.stderr
        seen[program.name] = any(e.startswith(b"ARV_WRAP_JOB=") for e in read_dump(out).env)
    assert seen == {HOSTILE_NAME: True, "plain": False}
    assert markers(world) == []


def test_check_shows_a_command_line_that_a_shell_reads_back_exactly(world):
    tools = world.base / "bin"
    tools.mkdir(exist_ok=True)
    shutil.copy(world.tool, tools / "argdump")
    args = [a for a in hostile_args(world.marks) if b"\x01" not in a and b"\x7f" not in a]
    argv = [b"argdump", *args, bytes(range(2, 127)), b"\xff\xfe", b"\xc3\xa9"]
    env = {**world.env, b"PATH": os.fsencode(tools) + b":" + world.env[b"PATH"]}
    proc = run(arv_wrap_cmd(world, "local", b"check", b"--", *argv), env, world.work)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert b"redirected as a job" in text.split(b"\n", 1)[0]
    start = text.index(b"\ncommand: ") + len(b"\ncommand: ")
    line = text[start:text.index(b"\nbackend: ", start)]
    back = run(["bash", "-c", b"set -- " + line + b"\nprintf '%s\\0' \"$@\""],
               {b"PATH": world.env[b"PATH"], b"LC_ALL": b"C"}, world.work)
    assert back.returncode == 0, back.stderr
    assert back.stdout.split(b"\0")[:-1] == argv
    assert markers(world) == []


# -- Docker --------------------------------------------------------------------------

DOCKER_IMAGE = "arvwrap-test-busybox:1"


def docker_ready():
    def missing(why):
        if ON_CI:
            pytest.fail(f"the Docker backend is required on CI: {why}")
        pytest.skip(why)
    if not (Path(whitelist.__file__).parent / "backends" / "docker.py").exists():
        pytest.skip("there is no Docker backend (src/arvwrap/backends/docker.py)")
    try:
        import docker
        api = docker.APIClient(version="auto", **docker.utils.kwargs_from_env())
        api.version()
    except Exception as e:
        missing(f"the docker engine does not answer: {e}")
    try:
        api.inspect_image(DOCKER_IMAGE)
    except Exception:
        missing(f"no image {DOCKER_IMAGE} (scripts/docker-engine.sh builds it)")


def test_hostile_arguments_reach_a_docker_job_as_given(world, tmp_path):
    docker_ready()
    # the container sees the host's cwd and the paths argv names, bind-mounted: the
    # tool (static) and its dump live in the cwd; argv must be UTF-8 (JSON carries it)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("a1", "b2"):
        (work / name).write_text(name)
    shutil.copy(world.tool, work / "argdump")
    rules = tmp_path / "docker.yaml"
    rules.write_text(f"tools:\n  - name: argdump\n    image: {DOCKER_IMAGE}\n")
    args = hostile_args(world.marks)
    out = os.fsencode(work / "dump")
    env = {**world.env, b"DUMP_OUT": out, **hostile_env(world)}
    tool = os.fsencode(work / "argdump")
    cmd = [sys.executable.encode(), b"-m", b"arvwrap", b"-w", os.fsencode(rules), b"-b",
           b"docker", b"--", tool, *args]
    proc = run(cmd, env, work)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    seen = read_dump(out)
    assert seen.argv == [tool, *args]
    assert seen.cwd == os.fsencode(work)
    [job_id] = [e.split(b"=", 1)[1] for e in seen.env if e.startswith(b"ARV_WRAP_JOB=")]
    rec = world.record(job_id.decode())
    assert (rec["backend"], rec["state"], rec["exit_status"]) == ("docker", "exited", 0)
    assert [os.fsencode(a) for a in rec["argv"]] == seen.argv
    for name in (b"PT_DOLLAR", b"PT_SHELLSHOCK", b"PT_NL", b"BASH_FUNC_pt%%"):
        assert name + b"=" + env[name] in seen.env
    assert markers(world) == []
