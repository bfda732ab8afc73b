"""What cannot be intercepted is said (issue 12, point 5): `arv-wrap check` and
`arv-wrap doctor -- COMMAND` name a statically linked caller, a setuid or setgid
one, and a Go program (src/arvwrap/elf.py reads the headers), one line each; and
the limits are real: the shim sees no exec made by busybox or by a Go program.
Real programs: busybox-static, /usr/bin/passwd, copies of /bin/true made setuid
or setgid to nobody, a Go program built with golang-go; one crafted ELF (a C
program with a .go.buildinfo section added by objcopy) says so in its name."""
import os
import shutil
import subprocess

import pytest

from arvwrap import elf, paths
from conftest import ON_CI, arv_wrap

BUSYBOX = "/bin/busybox"
GO_MAIN = """package main

import (
	"os"
	"os/exec"
)

func main() {
	if exec.Command(os.Args[1], os.Args[2:]...).Run() != nil {
		os.Exit(1)
	}
}
"""


def need_file(path, package):
    if not os.path.exists(path):
        if ON_CI:
            pytest.fail(f"{path} ({package}) is required on CI")
        pytest.skip(f"{path} ({package}) is not installed")


def need_program(name):
    if shutil.which(name) is None:
        if ON_CI:
            pytest.fail(f"{name} is required on CI")
        pytest.skip(f"{name} is not installed")


def check_lines(env, program, *args):
    r = arv_wrap("check", "--", program, *args, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if line.startswith("not intercepted: ")]


@pytest.fixture
def env(base_env, whitelist_file):
    return dict(base_env, ARV_WRAP_WHITELIST=whitelist_file("tools:\n  - name: 'true'\n"))


@pytest.fixture(scope="module")
def go_program(tmp_path_factory):
    need_program("go")
    d = tmp_path_factory.mktemp("go")
    (d / "main.go").write_text(GO_MAIN)
    subprocess.run(["go", "build", "-o", str(d / "gorun"), str(d / "main.go")], check=True,
                   cwd=d, env=dict(os.environ, GOCACHE=str(d / "cache"), GO111MODULE="off",
                                   CGO_ENABLED="0", HOME=str(d)), timeout=300)
    return str(d / "gorun")


def probe_env(tmp_path):
    probe = str(tmp_path / "probe")
    return probe, dict(os.environ, LD_PRELOAD=paths.SHIM, ARV_WRAP_SHIM=paths.SHIM,
                       ARV_WRAP_RULES="1;n:true", ARV_WRAP_PROBE=probe)


def test_static_busybox_check_and_doctor(env):
    need_file(BUSYBOX, "busybox-static")
    (line,) = check_lines(env, BUSYBOX, "sh", "-c", "true")
    assert line == (f"not intercepted: {BUSYBOX} is statically linked (no program "
                    "interpreter): ld.so never loads the shim into it, so the programs it "
                    "execs are not intercepted")
    r = arv_wrap("doctor", "--", BUSYBOX, env=env, capture_output=True, text=True)
    assert r.returncode == 1
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert fails == ["FAIL  " + line[len("not intercepted: "):]], r.stdout


def test_static_busybox_really_escapes_the_shim(tmp_path):
    need_file(BUSYBOX, "busybox-static")
    probe, penv = probe_env(tmp_path)
    subprocess.run(["sh", "-c", "/bin/true"], env=penv, check=True)      # control: seen
    assert os.path.exists(probe)
    os.unlink(probe)
    subprocess.run([BUSYBOX, "sh", "-c", "/bin/true; :"], env=penv, check=True)
    assert not os.path.exists(probe)


def test_dynamic_program_has_no_line(env):
    assert check_lines(env, "/bin/ls") == []
    r = arv_wrap("doctor", "--", "ls", env=env, capture_output=True, text=True)
    assert "ok    /usr/bin/ls: the programs it execs can be intercepted" in r.stdout \
        or "ok    /bin/ls: the programs it execs can be intercepted" in r.stdout, r.stdout


def test_doctor_command_not_found(env):
    r = arv_wrap("doctor", "--", "no-such-program-here", env=env, capture_output=True,
                 text=True)
    assert r.returncode == 1 and "FAIL  no-such-program-here: not found" in r.stdout


def test_setuid_passwd(env):
    need_file("/usr/bin/passwd", "passwd")
    (line,) = check_lines(env, "/usr/bin/passwd")
    if os.getuid() == 0:     # run by its owner, the credentials do not change
        assert line.endswith("is setuid (uid 0): run with another uid than 0, ld.so ignores "
                             "LD_PRELOAD in it and the programs it execs are not intercepted")
    else:
        assert line.endswith("is setuid (uid 0): ld.so ignores LD_PRELOAD in it (secure "
                             "mode), so the programs it execs are not intercepted")


@pytest.mark.parametrize("kind", ["setuid", "setgid"])
def test_setuid_or_setgid_to_another_user(kind, env, tmp_path):
    if os.getuid() != 0:
        if ON_CI:
            pytest.fail("CI runs as root (to chown a copy to nobody)")
        pytest.skip("needs root to chown a copy to nobody")
    prog = tmp_path / "sutrue"
    shutil.copy("/bin/true", prog)
    os.chmod(tmp_path, 0o755)
    if kind == "setuid":
        os.chown(prog, 65534, -1)
        os.chmod(prog, 0o4755)
    else:
        os.chown(prog, -1, 65534)
        os.chmod(prog, 0o2755)
    who = "uid" if kind == "setuid" else "gid"
    assert check_lines(env, str(prog)) == [
        f"not intercepted: {prog} is {kind} ({who} 65534): ld.so ignores LD_PRELOAD in it "
        "(secure mode), so the programs it execs are not intercepted"]


def test_go_program_check_and_its_execs_escape(go_program, env, tmp_path):
    lines = check_lines(env, go_program, "/bin/true")
    assert f"not intercepted: {go_program} is a Go program: Go execs with raw system " \
           "calls, not through libc, so the programs it execs are not intercepted" in lines
    assert len(lines) == 2      # and, built without cgo, static
    probe, penv = probe_env(tmp_path)
    subprocess.run([go_program, "/bin/true"], env=penv, check=True, timeout=30)
    assert not os.path.exists(probe)


def test_crafted_elf_with_go_buildinfo_section_is_reported_as_go(env, tmp_path):
    need_program("objcopy")
    src = tmp_path / "c.c"
    src.write_text("int main(void) { return 0; }\n")
    plain, crafted = tmp_path / "plain", tmp_path / "crafted-go"
    subprocess.run(["cc", "-o", str(plain), str(src)], check=True)
    (tmp_path / "info").write_bytes(b"\xff Go buildinf:" + bytes(18))
    subprocess.run(["objcopy", "--add-section", f".go.buildinfo={tmp_path / 'info'}",
                    str(plain), str(crafted)], check=True)
    assert check_lines(env, str(plain)) == []
    assert check_lines(env, str(crafted)) == [
        f"not intercepted: {crafted} is a Go program: Go execs with raw system calls, not "
        "through libc, so the programs it execs are not intercepted"]


def test_script_is_judged_by_its_interpreter(env, tmp_path):
    need_file(BUSYBOX, "busybox-static")
    script = tmp_path / "s.sh"
    script.write_text(f"#!{BUSYBOX} sh\ntrue\n")
    script.chmod(0o755)
    (line,) = check_lines(env, str(script))
    assert line.startswith(f"not intercepted: {script} runs in {BUSYBOX}: {BUSYBOX} is "
                           "statically linked")


def test_truncated_or_garbled_elf_is_not_an_error(tmp_path):
    need_file(BUSYBOX, "busybox-static")
    head = open(BUSYBOX, "rb").read(4096)
    for n in (0, 4, 20, 52, 63, 64, 100, 1000):
        p = tmp_path / f"t{n}"
        p.write_bytes(head[:n])
        assert elf.read_elf(str(p)) is None or n >= 64
        elf.not_intercepted(str(p))
    garbled = bytearray(head)
    garbled[32:40] = (2**63).to_bytes(8, "little")       # e_phoff far past the end
    (tmp_path / "g").write_bytes(bytes(garbled))
    assert elf.read_elf(str(tmp_path / "g")) is None
