"""The LD_PRELOAD shim (csrc/shim.c), exercised through one small C program per
exec variant (tests/cprogs/via_*.c) and through real callers (shells, Python,
make, xargs).

A redirected call is observed with the client's probe mode (ARV_WRAP_PROBE), or
with a fake client (argdump installed as arv-wrap-client next to a copy of the
shim) where the client's own argv and environment matter.  A passed-through call
runs tests/cprogs/argdump.c, which prints its argv and environment.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from arvwrap import paths
from conftest import ON_CI, need

CPROGS = Path(__file__).parent / "cprogs"
VARIANTS = ["execve", "execv", "execvp", "execvpe", "execl", "execlp", "execle",
            "posix_spawn", "posix_spawnp", "fexecve", "execveat", "vfork", "system", "popen"]
SEARCHING = {"execvp", "execvpe", "execlp", "posix_spawnp"}   # PATH search
SHELL = {"system", "popen"}                                  # argv[0] is what sh gives
HOOKS = {"execve", "execv", "execvp", "execvpe", "execl", "execlp", "execle",
         "posix_spawn", "posix_spawnp", "fexecve", "execveat"}
# spaces, quotes, a newline, an empty string, non-UTF-8 bytes, shell syntax
TRICKY = [b"a b", b"'\"", b"line\nbreak", b"", b"\xff\xfe", b"$HOME*"]


def built_or_skip(path):
    if not os.path.exists(path):
        msg = f"{path} is not built (python setup.py build_ext --inplace)"
        if ON_CI:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def progs(tmp_path_factory):
    """Every tests/cprogs/*.c compiled with cc: name -> path."""
    built_or_skip(paths.SHIM)
    out = tmp_path_factory.mktemp("cprogs")
    built = {}
    for src in sorted(CPROGS.glob("*.c")):
        if src.stem == "otherlib":
            target = out / "libother.so"
            flags = ["-fPIC", "-shared"]
        else:
            target = out / src.stem
            flags = []
        subprocess.run(["cc", "-O1", "-Wall", "-Wextra", "-Werror", *flags, "-o", str(target),
                        str(src)], check=True)
        built[src.stem] = str(target)
    return built


@pytest.fixture
def client():
    built_or_skip(paths.CLIENT)


@pytest.fixture
def tools(tmp_path, progs):
    """A bin dir: argdump, a non-executable file, a directory, a script without #!."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shutil.copy(progs["argdump"], bindir / "argdump")
    (bindir / "noexec").write_text("#!/bin/sh\necho should not run\n")
    (bindir / "noexec").chmod(0o644)
    (bindir / "adir").mkdir()
    (bindir / "noshebang").write_text("printf 'script ran:%s\\n' \"$*\"\n")
    (bindir / "noshebang").chmod(0o755)
    os.symlink("argdump", bindir / "link")
    return SimpleNamespace(bin=str(bindir), argdump=str(bindir / "argdump"))


@pytest.fixture
def probe(tmp_path):
    return str(tmp_path / "probe")


@pytest.fixture
def make_env(base_env, tools, probe):
    """make_env(rules, ...): an environment with the shim active."""
    def make(rules, shim=paths.SHIM, with_probe=True, **extra):
        env = {k: v for k, v in base_env.items() if k != "LD_PRELOAD"}
        env.update(LD_PRELOAD=shim, ARV_WRAP_SHIM=shim, ARV_WRAP_RULES=rules,
                   PATH=f"{tools.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        if with_probe:
            env["ARV_WRAP_PROBE"] = probe
        env.update(extra)
        return env
    return make


@pytest.fixture
def fake_client(tmp_path, progs):
    """A copy of the shim whose arv-wrap-client is argdump: shows the client's argv and env."""
    d = tmp_path / "fake"
    d.mkdir()
    shutil.copy(paths.SHIM, d / "libarvwrap.so")
    shutil.copy(progs["argdump"], d / "arv-wrap-client")
    return SimpleNamespace(shim=str(d / "libarvwrap.so"), client=str(d / "arv-wrap-client"))


def run(args, env, **kw):
    args = [a if isinstance(a, bytes) else os.fsencode(str(a)) for a in args]
    return subprocess.run(args, env=env, capture_output=True, timeout=60, **kw)


def argdump(stdout):
    """(argv, env) from argdump's output."""
    argv, env = [], {}
    for rec in stdout.split(b"\0")[:-1]:
        if rec[:1] == b"A":
            argv.append(rec[1:])
        elif rec[:1] == b"E":
            k, _, v = rec[1:].partition(b"=")
            env[k.decode()] = v.decode(errors="surrogateescape")
        else:
            raise AssertionError(f"not argdump output: {stdout!r}")
    return argv, env


def probed(path):
    """The probe records: [rule, resolved, argv...] each, as bytes."""
    if not os.path.exists(path):
        return []
    data = Path(path).read_bytes()
    assert data.endswith(b"\0\n"), data
    return [rec.split(b"\0") for rec in data[:-2].split(b"\0\n")]


def via(progs, variant, file, argv0, *args):
    return [progs["via_" + variant], file, argv0, *args]


def target(tools, variant):
    """What a variant is given to run argdump: a name for PATH search, else a path."""
    return "argdump" if variant in SEARCHING else tools.argdump


def expected_argv0(variant, file, argv0):
    return os.fsencode(file) if variant in SHELL else argv0


def b(s):
    return os.fsencode(s)


# ---------------------------------------------------------------- each variant

@pytest.mark.parametrize("variant", VARIANTS)
def test_redirect_exact_argv(variant, progs, tools, make_env, probe, client):
    file = target(tools, variant)
    r = run(via(progs, variant, file, b"zero", *TRICKY), make_env("1;n:argdump"))
    assert r.returncode == 0, r
    assert r.stdout == b""
    argv0 = expected_argv0(variant, file, b"zero")
    assert probed(probe) == [[b"0", b(tools.argdump), argv0, *TRICKY]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_passthrough_exact_argv(variant, progs, tools, make_env, probe):
    file = target(tools, variant)
    env = make_env("1;n:nomatch")
    r = run(via(progs, variant, file, b"zero", *TRICKY), env)
    assert r.returncode == 0, r
    argv, child_env = argdump(r.stdout)
    assert argv == [expected_argv0(variant, file, b"zero"), *TRICKY]
    assert child_env["LD_PRELOAD"] == paths.SHIM
    assert probed(probe) == []


ERRNO_CASES = {
    "missing": "{bin}/missing",
    "not-executable": "{bin}/noexec",
    "directory": "{bin}/adir",
    "trailing-slash": "{bin}/argdump/",
    "dot-component": "{bin}/argdump/.",
    "bad-dir": "{bin}/noexec/x",
}


@pytest.mark.parametrize("rules", ["1;n:*", "1;p:**"])
@pytest.mark.parametrize("case", sorted(ERRNO_CASES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_errno_unchanged(variant, case, rules, progs, tools, make_env, base_env, probe):
    """A call that cannot run fails exactly as it would without arv-wrap,
    even when a rule matches everything."""
    file = ERRNO_CASES[case].format(bin=tools.bin)
    args = via(progs, variant, file, b"zero", b"x")
    without = run(args, dict(base_env, PATH=f"{tools.bin}:{os.environ['PATH']}"))
    with_shim = run(args, make_env(rules))
    assert with_shim.returncode == without.returncode
    assert with_shim.stdout == without.stdout
    assert with_shim.stderr == without.stderr
    if variant not in SHELL:
        assert without.stdout.startswith(b"errno=")
    assert probed(probe) == []


SEARCH_CASES = {
    "missing": ("missing-prog", None),
    "not-executable": ("noexec", None),          # EACCES, remembered to the end
    "directory": ("adir", None),
    "not-on-path": ("argdump", "/nonexistent:/usr/bin"),
    "empty-name": ("", None),
    "name-too-long": ("x" * 300, None),
    "path-unset": ("argdump", False),            # default /bin:/usr/bin
    "dir-in-path-is-a-file": ("argdump", "{bin}/noexec:{bin}/adir"),
}


@pytest.mark.parametrize("rules", ["1;n:*", "1;p:**"])
@pytest.mark.parametrize("case", sorted(SEARCH_CASES))
@pytest.mark.parametrize("variant", sorted(SEARCHING))
def test_errno_path_search(variant, case, rules, progs, tools, make_env, base_env, probe):
    name, path = SEARCH_CASES[case]
    env_without = dict(base_env, PATH=f"{tools.bin}:{os.environ['PATH']}")
    env_with = make_env(rules)
    for env in (env_without, env_with):
        if path is False:
            del env["PATH"]
        elif path:
            env["PATH"] = path.format(bin=tools.bin)
    args = via(progs, variant, name, b"zero")
    without = run(args, env_without)
    with_shim = run(args, env_with)
    assert without.stdout.startswith(b"errno=")
    assert (with_shim.returncode, with_shim.stdout) == (without.returncode, without.stdout)
    assert probed(probe) == []


@pytest.mark.parametrize("file,flags", [
    ("link", "0x100"),          # AT_SYMLINK_NOFOLLOW on a symlink: ELOOP
    ("argdump", "0x1"),         # an unknown flag: EINVAL
    ("adir/", "0x1000"),        # AT_EMPTY_PATH on a directory: EACCES
])
def test_errno_execveat_flags(file, flags, progs, tools, make_env, base_env, probe):
    args = via(progs, "execveat", os.path.join(tools.bin, file), b"zero")
    without = run(args, dict(base_env, VIA_EXECVEAT_FLAGS=flags))
    with_shim = run(args, make_env("1;n:*;p:**", VIA_EXECVEAT_FLAGS=flags))
    assert without.stdout.startswith(b"errno=")
    assert (with_shim.returncode, with_shim.stdout) == (without.returncode, without.stdout)
    assert probed(probe) == []


def test_execveat_by_descriptor_and_dirfd(progs, tools, make_env, probe, client):
    """execveat(fd, "", AT_EMPTY_PATH) names the program by its descriptor;
    execveat(dirfd, name) by the directory's path (a symlink is not followed)."""
    run(via(progs, "execveat", tools.argdump, b"zero", b"fd"),
        make_env("1;n:argdump", VIA_EXECVEAT_FD="1"))
    (Path(tools.bin) / "d").mkdir()
    os.symlink(tools.argdump, Path(tools.bin) / "d" / "x")
    run(via(progs, "execveat", os.path.join(tools.bin, "d", "x"), b"zero", b"dirfd"),
        make_env("1;p:**/d/x"))
    assert probed(probe) == [[b"0", b(tools.argdump), b"zero", b"fd"],
                             [b"0", b(tools.bin) + b"/d/x", b"zero", b"dirfd"]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_noexec_script_like_glibc(variant, progs, tools, make_env, base_env):
    """A script without #! runs through /bin/sh for execvp & co (ENOEXEC elsewhere)."""
    file = "noshebang" if variant in SEARCHING else os.path.join(tools.bin, "noshebang")
    args = via(progs, variant, file, b"zero", b"one")
    without = run(args, dict(base_env, PATH=f"{tools.bin}:{os.environ['PATH']}"))
    with_shim = run(args, make_env("1;n:nomatch"))
    assert (with_shim.returncode, with_shim.stdout) == (without.returncode, without.stdout)
    if variant in {"execvp", "execvpe", "execlp"}:
        assert without.stdout == b"script ran:one\n"


@pytest.mark.parametrize("variant", VARIANTS)
def test_whitelisted_script_without_hashbang_is_left_to_the_real_exec(
        variant, progs, tools, make_env, base_env, probe):
    """Only the caller's own exec knows what to make of it (execvp: /bin/sh; bash:
    runs it itself; execve: ENOEXEC), so it is not redirected."""
    file = "noshebang" if variant in SEARCHING else os.path.join(tools.bin, "noshebang")
    args = via(progs, variant, file, b"zero", b"one")
    without = run(args, dict(base_env, PATH=f"{tools.bin}:{os.environ['PATH']}"))
    with_shim = run(args, make_env("1;n:noshebang"))
    assert (with_shim.returncode, with_shim.stdout) == (without.returncode, without.stdout)
    assert probed(probe) == []


def test_bash_runs_a_whitelisted_script_without_hashbang_itself(tools, make_env, base_env,
                                                                probe):
    need("bash")
    script = "noshebang a b; echo status=$?"
    without = run(["bash", "-c", script], dict(base_env, PATH=f"{tools.bin}:{os.environ['PATH']}"))
    with_shim = run(["bash", "-c", script], make_env("1;n:noshebang"))
    assert with_shim.stdout == without.stdout == b"script ran:a b\nstatus=0\n"
    assert probed(probe) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_client_missing_falls_back(variant, progs, tools, make_env, tmp_path):
    """If the client cannot be exec'd: one warning line, then the real program runs."""
    d = tmp_path / "noclient"
    d.mkdir()
    shim = str(d / "libarvwrap.so")
    shutil.copy(paths.SHIM, shim)
    file = target(tools, variant)
    r = run(via(progs, variant, file, b"zero", b"a b"), make_env("1;n:argdump", shim=shim))
    assert r.returncode == 0, r
    assert r.stderr == f"arv-wrap: cannot run {d}/arv-wrap-client: No such file or directory\n".encode()
    argv, _ = argdump(r.stdout)
    assert argv == [expected_argv0(variant, file, b"zero"), b"a b"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_fake_client_sees_protocol_and_repaired_env(variant, progs, tools, make_env, fake_client):
    """The client gets [client, --shim, rule, resolved, argv...] and the caller's env."""
    file = target(tools, variant)
    env = make_env("1;n:other;n:argdump", shim=fake_client.shim, ARVTEST_MARK="kept")
    r = run(via(progs, variant, file, b"zero", *TRICKY), env)
    assert r.returncode == 0, r
    argv, child_env = argdump(r.stdout)
    assert argv == [b(fake_client.client), b"--shim", b"1", b(tools.argdump),
                    expected_argv0(variant, file, b"zero"), *TRICKY]
    assert child_env["ARVTEST_MARK"] == "kept"
    assert child_env["LD_PRELOAD"] == fake_client.shim


@pytest.mark.parametrize("variant", ["posix_spawn", "posix_spawnp"])
def test_spawn_file_actions_kept(variant, progs, tools, make_env, fake_client, tmp_path):
    out = tmp_path / "spawn-out"
    env = make_env("1;n:argdump", shim=fake_client.shim, SPAWN_STDOUT=str(out))
    r = run(via(progs, variant, target(tools, variant), b"zero", b"x"), env)
    assert r.returncode == 0, r
    assert r.stdout == b""
    argv, _ = argdump(out.read_bytes())
    assert argv[:2] == [b(fake_client.client), b"--shim"] and argv[-1] == b"x"


@pytest.mark.parametrize("variant", ["posix_spawn", "posix_spawnp"])
def test_spawn_failing_file_action_no_warning(variant, progs, tools, make_env, base_env,
                                              tmp_path, probe):
    """A spawn whose own file action fails fails as without arv-wrap, no warning."""
    args = via(progs, variant, target(tools, variant), b"zero")
    bad = str(tmp_path / "no" / "such" / "dir")
    without = run(args, dict(base_env, PATH=f"{tools.bin}:{os.environ['PATH']}",
                             SPAWN_STDOUT=bad))
    with_shim = run(args, make_env("1;n:argdump", SPAWN_STDOUT=bad))
    assert without.stdout == b"errno=2\n"
    assert (with_shim.returncode, with_shim.stdout, with_shim.stderr) == \
        (without.returncode, without.stdout, without.stderr)
    assert probed(probe) == []


# ---------------------------------------------------------------- disabling

def test_disable_in_environment(progs, tools, make_env, probe):
    env = make_env("1;n:*", ARV_WRAP_DISABLE="1")
    r = run(via(progs, "execv", tools.argdump, b"zero", b"x"), env)
    argv, _ = argdump(r.stdout)
    assert argv == [b"zero", b"x"]
    # untouched: no env repair either
    r = run(["env", "-i", tools.argdump], env)
    assert argdump(r.stdout) == ([b(tools.argdump)], {})
    assert probed(probe) == []


def test_disable_in_envp(tools, make_env, probe):
    """The caller's own environment is active, the exec's envp says disable."""
    env = make_env("1;n:argdump")
    r = run(["env", "ARV_WRAP_DISABLE=1", "argdump", "y"], env)
    assert argdump(r.stdout)[0] == [b"argdump", b"y"]
    code = f"""
import subprocess, sys
out = subprocess.run([{tools.argdump!r}, "z"], env={{"ARV_WRAP_DISABLE": "1"}},
                     capture_output=True).stdout
sys.stdout.buffer.write(out)
"""
    r = run([sys.executable, "-c", code], env)
    assert argdump(r.stdout) == ([b(tools.argdump), b"z"], {"ARV_WRAP_DISABLE": "1"})
    assert probed(probe) == []


# ---------------------------------------------------------------- env repair

def test_env_repair_env_i(tools, make_env, probe, client):
    env = make_env("1;n:argdump")
    # (no PATH after env -i: absolute paths)
    assert run(["env", "-i", tools.argdump, "x"], env).returncode == 0
    assert run(["env", "-i", "/bin/sh", "-c", f"{tools.argdump} y; :"], env).returncode == 0
    assert probed(probe) == [[b"0", b(tools.argdump), b(tools.argdump), b"x"],
                             [b"0", b(tools.argdump), b(tools.argdump), b"y"]]


def test_env_repair_passthrough(tools, make_env, base_env):
    """env -i drops everything: the shim and the ARV_WRAP_* entries come back."""
    env = make_env("1;n:nomatch")
    r = run(["env", "-i", tools.argdump], env)
    _, child_env = argdump(r.stdout)
    expected = {k: v for k, v in env.items() if k.startswith("ARV_WRAP_")}
    expected["LD_PRELOAD"] = paths.SHIM
    assert child_env == expected


def test_env_repair_path_only_runner(tools, make_env, probe, client):
    env = make_env("1;n:argdump")
    path = env["PATH"]
    assert run(["env", "-i", f"PATH={path}", "sh", "-c", "argdump a; :"], env).returncode == 0
    for vfork in (True, False):   # Python's vfork path, then its posix_spawn path
        code = f"""
import subprocess
assert subprocess._USE_VFORK and subprocess._USE_POSIX_SPAWN
subprocess.run([{tools.argdump!r}, "b"], env={{"PATH": {path!r}}}, close_fds={vfork})
"""
        assert run([sys.executable, "-c", code], env).returncode == 0
    assert [rec[2:] for rec in probed(probe)] == [
        [b"argdump", b"a"], [b(tools.argdump), b"b"], [b(tools.argdump), b"b"]]


def test_env_repair_duplicate_ld_preload_the_last_one_counts(progs, tools, make_env, probe,
                                                              client):
    """ld.so reads the last LD_PRELOAD entry: an envp whose first entry lists the shim
    but whose last does not is repaired in the last (found by fuzz/fuzz_env.c)."""
    env = make_env("1;n:argdump")
    r = run([progs["exec_env"], "/bin/sh", f"LD_PRELOAD={paths.SHIM}", f"PATH={env['PATH']}",
             "LD_PRELOAD=", "--", "sh", "-c", "argdump a; :"], env)
    assert r.returncode == 0, r
    assert [rec[2:] for rec in probed(probe)] == [[b"argdump", b"a"]]


def test_second_preload_kept(progs, tools, make_env):
    other = progs["otherlib"]
    shim = paths.SHIM
    cases = [
        (f"{other} {shim}", [], f"{other} {shim}"),          # listed: untouched
        (f"{other}:{shim}", [], f"{other}:{shim}"),
        (shim, [f"LD_PRELOAD={other}"], f"{shim}:{other}"),  # a runner dropped the shim
        (shim, ["-u", "LD_PRELOAD"], shim),                  # a runner dropped LD_PRELOAD
    ]
    for preload, env_args, expected in cases:
        env = make_env("1;n:nomatch", LD_PRELOAD=preload)
        r = run(["env", *env_args, "argdump"], env)
        _, child_env = argdump(r.stdout)
        assert child_env["LD_PRELOAD"] == expected
        assert child_env.get("ARVTEST_OTHER_LOADED") == ("1" if other in expected else None)


def test_not_whitelisted_untouched(progs, tools, make_env, probe):
    env = make_env("1;n:samtools;p:/nowhere/**")
    for variant in VARIANTS:
        file = target(tools, variant)
        r = run(via(progs, variant, file, b"zero", b"q"), env)
        argv, child_env = argdump(r.stdout)
        assert argv == [expected_argv0(variant, file, b"zero"), b"q"]
        if variant not in SHELL:   # sh adds PWD etc.
            assert child_env == env
    assert probed(probe) == []


# ---------------------------------------------------------------- real callers

def test_callers_shells(tools, make_env, probe, client):
    need("bash")
    env = make_env("1;n:argdump")
    assert run(["bash", "-c", 'argdump "a b" c; true'], env).returncode == 0
    assert run(["sh", "-c", "argdump 'd e'; true"], env).returncode == 0
    assert run(["sh", "-c", f"exec {tools.argdump} f"], env).returncode == 0
    assert probed(probe) == [[b"0", b(tools.argdump), b"argdump", b"a b", b"c"],
                             [b"0", b(tools.argdump), b"argdump", b"d e"],
                             [b"0", b(tools.argdump), b(tools.argdump), b"f"]]


def test_callers_python_subprocess(tools, make_env, probe, client):
    env = make_env("1;n:argdump")
    code = f"""
import subprocess
assert subprocess._USE_VFORK and subprocess._USE_POSIX_SPAWN
subprocess.run(["argdump", "vfork"], check=True)                             # vfork + execve
subprocess.run([{tools.argdump!r}, "spawn"], close_fds=False, check=True)  # posix_spawn
"""
    r = run([sys.executable, "-c", code], env)
    assert r.returncode == 0, r
    assert probed(probe) == [[b"0", b(tools.argdump), b"argdump", b"vfork"],
                             [b"0", b(tools.argdump), b(tools.argdump), b"spawn"]]


def test_callers_make_and_xargs(tools, make_env, probe, tmp_path, client):
    need("make")
    need("xargs")
    env = make_env("1;n:argdump")
    (tmp_path / "Makefile").write_text(textwrap.dedent("""\
        all: one two
        one:
        \targdump one
        two:
        \targdump two 'x y'
        """))
    r = run(["make", "-j2", "-s", "-C", str(tmp_path)], env)
    assert r.returncode == 0, r
    r = run(["xargs", "-n1", "argdump"], env, input=b"three\nfour\n")
    assert r.returncode == 0, r
    records = sorted(rec[2:] for rec in probed(probe))
    assert records == [[b"argdump", b"four"], [b"argdump", b"one"], [b"argdump", b"three"],
                       [b"argdump", b"two", b"x y"]]


# ---------------------------------------------------------------- rules

def test_rules_name_and_path(progs, tools, make_env, probe, client):
    execvp = lambda rules, name, *args: run(via(progs, "execvp", name, name, *args),
                                             make_env(rules))
    execvp(f"1;p:{tools.bin}/arg*", "argdump", "1")
    execvp("1;p:/nowhere/**;n:argdump", "argdump", "2")
    execvp("1;p:/nowhere/**", "argdump", "3")                      # not redirected
    execvp(f"1;p:{tools.bin}/link", "link", "4")                  # symlinks not followed
    execvp(f"1;p:{tools.bin}/argdump", "link", "5")               # not redirected
    execvp("1;n:link", "link", "6")
    execvp("1;n:argdump", "link", "7")                             # not redirected
    assert probed(probe) == [[b"0", b(tools.argdump), b"argdump", b"1"],
                             [b"1", b(tools.argdump), b"argdump", b"2"],
                             [b"0", b(tools.bin) + b"/link", b"link", b"4"],
                             [b"0", b(tools.bin) + b"/link", b"link", b"6"]]


def test_conditions(progs, tools, make_env, probe, client):
    def call(rules, *args):
        r = run(via(progs, "execvp", "argdump", "argdump", *args), make_env(rules))
        return "redirected" if r.stdout == b"" else "ran"
    assert call("1;n:argdump|s=mem,aln", "mem", "ref") == "redirected"
    assert call("1;n:argdump|s=mem,aln", "aln") == "redirected"
    assert call("1;n:argdump|s=mem,aln", "index", "mem") == "ran"
    assert call("1;n:argdump|s=mem,aln") == "ran"
    assert call("1;n:argdump|x=--help,-h", "run") == "redirected"
    assert call("1;n:argdump|x=--help,-h", "run", "--help") == "ran"
    assert call("1;n:argdump|x=--help,-h", "--help=all") == "ran"
    assert call("1;n:argdump|x=--help,-h", "-hx") == "redirected"
    assert call("1;n:argdump|s=mem|x=-h", "mem", "-h") == "ran"
    assert len(probed(probe)) == 4


def test_malformed_rules_pass_through(progs, tools, make_env, probe):
    r = run(via(progs, "execvp", "argdump", "argdump"), make_env("1;n:argdump;q:x"))
    assert argdump(r.stdout)[0] == [b"argdump"]
    assert probed(probe) == []


def test_relative_and_path_resolution(progs, tools, make_env, probe, tmp_path, client):
    env = make_env("1;n:argdump")
    run(via(progs, "execve", "./argdump", "a"), env, cwd=tools.bin)
    run(via(progs, "execveat", "bin/./argdump", "b"), env, cwd=str(tmp_path))
    run(via(progs, "execveat", "argdump", "c"), env, cwd=tools.bin)        # AT_FDCWD
    run(via(progs, "execvp", "argdump", "d"), dict(env, PATH="bin"), cwd=str(tmp_path))
    run(via(progs, "execvp", "argdump", "e"), dict(env, PATH="/nowhere::/usr/bin"),
        cwd=tools.bin)                                                      # empty = cwd
    # a directory and a non-executable file of that name earlier in PATH are skipped
    shadow = tmp_path / "shadow"
    (shadow / "argdump").mkdir(parents=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "argdump").write_text("")
    run(via(progs, "execvp", "argdump", "f"), dict(env, PATH=f"{shadow}:{plain}:{tools.bin}"))
    run(via(progs, "fexecve", tools.bin + "//argdump", "g"), env)
    assert probed(probe) == [[b"0", b(tools.argdump), name] for name in
                             (b"a", b"b", b"c", b"d", b"e", b"f", b"g")]


def test_no_rules_or_no_shim_var_passes_through(progs, tools, make_env, probe):
    for env in (make_env("1;n:argdump", ARV_WRAP_SHIM=""), make_env("1;n:argdump")):
        if env["ARV_WRAP_SHIM"] == "":
            del env["ARV_WRAP_SHIM"]
        else:
            del env["ARV_WRAP_RULES"]
        r = run(["env", "-i", tools.argdump], env)
        assert argdump(r.stdout) == ([b(tools.argdump)], {})   # no repair either
    assert probed(probe) == []


def test_exports_only_hooks():
    built_or_skip(paths.SHIM)
    out = subprocess.run(["nm", "-D", "--defined-only", paths.SHIM], capture_output=True,
                         text=True, check=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if line.strip()}
    assert names == HOOKS
