"""The shim's stack use is bounded for any argv and envp (issue 12, point 4).

A hooked exec can run in a vfork child on the caller's stack, or in a thread with
a small one. Up to 1024 arguments the shim builds the client's argv on its stack
(the argv form); above that it passes the caller's argv untouched and names the
call in the environment (ARV_WRAP_CALL, the environment form), so the stack holds
a bounded envp copy and a few PATH_MAX buffers, whatever argc is.

tests/cprogs/small_stack.c runs the exec from a thread with a 128 KiB stack and
16 MiB of PROT_NONE below it, so any unbounded array faults. Each test compares
with the direct run, without the shim.
"""
import sys

import pytest

from conftest import arv_wrap, job_records
from test_shim import argdump, b, probed, run   # noqa: F401  (fixtures below)
from test_shim import progs, tools, probe, make_env, fake_client, client  # noqa: F401

# Near the kernel's limit with an 8 MiB stack rlimit (ARG_MAX 2 MiB: 8 bytes of
# pointer plus the string per argument): about 1.4 MiB here.
N = 100_000
STACK_KB = "128"


def huge_argv(argv0=b"argdump"):
    return [argv0] + [b"a%d" % i for i in range(1, N)]


@pytest.fixture
def direct(progs, tools, base_env):
    """argdump's argv when small_stack runs it without arv-wrap."""
    def direct(mode):
        r = run([progs["small_stack"], mode, STACK_KB, str(N), tools.argdump, "argdump"],
                base_env)
        assert r.returncode == 0, r.stderr
        return argdump(r.stdout)[0]
    return direct


@pytest.mark.parametrize("mode", ["vfork", "posix_spawn", "execv"])
def test_huge_argv_small_stack_redirected(mode, progs, tools, make_env, probe, client, direct):
    r = run([progs["small_stack"], mode, STACK_KB, str(N), tools.argdump, "argdump"],
            make_env("1;n:argdump"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr == b""
    expected = direct(mode)
    assert expected == huge_argv()
    assert probed(probe) == [[b"0", b(tools.argdump), *expected]]


def test_huge_argv_environment_form_client_sees_caller_argv(progs, tools, make_env,
                                                            fake_client):
    """Above 1024 arguments the client gets the caller's argv as is and the call in
    ARV_WRAP_CALL, first in its environment; at 1024, the argv form."""
    env = make_env("1;n:other;n:argdump", shim=fake_client.shim, with_probe=False)
    for n, form in ((1025, "env"), (1024, "argv")):
        r = run([progs["small_stack"], "vfork", STACK_KB, str(n), tools.argdump, "argdump"],
                env)
        assert r.returncode == 0, r.stderr
        argv, child_env = argdump(r.stdout)
        args = [b"argdump"] + [b"a%d" % i for i in range(1, n)]
        if form == "env":
            assert argv == args
            assert child_env["ARV_WRAP_CALL"] == f"1:{tools.argdump}"
            first = r.stdout.split(b"\0")[len(args)]
            assert first == b"EARV_WRAP_CALL=1:" + b(tools.argdump)
        else:
            assert argv == [b(fake_client.client), b"--shim", b"1", b(tools.argdump), *args]
            assert "ARV_WRAP_CALL" not in child_env


def test_huge_argv_python_small_thread_stack(tools, make_env, probe, client):
    """CPython's subprocess (vfork: the child runs on the thread's stack) and
    os.posix_spawn, from a thread with a 256 KiB stack."""
    code = f"""
import os, subprocess, threading
args = ["argdump"] + ["a%d" % i for i in range(1, {N})]
def go():
    assert subprocess._USE_VFORK
    subprocess.run(args, check=True)
    pid = os.posix_spawn({tools.argdump!r}, args, os.environ)
    assert os.waitpid(pid, 0)[1] == 0
threading.stack_size(256 * 1024)
t = threading.Thread(target=go)
t.start()
t.join()
"""
    r = run([sys.executable, "-c", code], make_env("1;n:argdump"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert probed(probe) == [[b"0", b(tools.argdump), *huge_argv()]] * 2


def test_huge_argv_and_huge_env_run_here_with_one_warning(progs, tools, make_env, probe,
                                                          client):
    """More than 1024 arguments and more than 4096 environment entries do not fit the
    stack bound: one warning, then the real exec, as without arv-wrap."""
    env = make_env("1;n:argdump", **{f"X{i}": "1" for i in range(5000)})
    r = run([progs["small_stack"], "vfork", STACK_KB, "2000", tools.argdump, "argdump"], env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == (f"arv-wrap: {tools.argdump}: not redirected (more than 1024 "
                        "arguments and 4096 environment entries): running it here\n").encode()
    assert argdump(r.stdout)[0] == [b"argdump"] + [b"a%d" % i for i in range(1, 2000)]
    assert probed(probe) == []


def test_huge_argv_job_sees_the_direct_runs_argv(progs, tools, base_env, whitelist_file,
                                                 direct):
    """Through the real client and dispatcher (a local job), the tool's argv is the
    direct run's, and the environment form leaves no trace in its environment."""
    env = dict(base_env, ARV_WRAP_WHITELIST=whitelist_file("tools:\n  - name: argdump\n"))
    r = arv_wrap("--", progs["small_stack"], "vfork", STACK_KB, str(N), tools.argdump,
                 "argdump", env=env, capture_output=True)
    assert r.returncode == 0, r.stderr[-2000:]
    argv, job_env = argdump(r.stdout)
    assert argv == direct("vfork")
    assert "ARV_WRAP_CALL" not in job_env
    (rec,) = job_records(env)
    assert rec["state"] == "exited" and len(rec["argv"]) == N
