"""On the local backend a job is the caller's own child (issue 8, DESIGN "Transparency"):
everything the kernel carries across fork+exec reaches the tool as in a direct run.

Each test runs the same real program with and without arv-wrap and compares what the
tool saw, field by field, and checks that the call really was a job (an `exited`
record), so no test can pass by the call silently running unredirected. The
dispatcher is started before each test by a call of its own, so it cannot inherit
the state under test from the call that would otherwise start it.
umask and rlimits: tests/test_transparency.py::test_argv_bytes_cwd_env_umask_rlimits.
"""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from arvwrap import paths
from conftest import ON_CI, arv_wrap, job_records, need, wrapped, write_tool

WHITELIST = """
tools:
  - name: warm
  - name: show
  - name: ids
  - name: fd5
  - name: wake-parent
  - name: lineage
  - name: nodename
  - name: submake
"""

@pytest.fixture
def env(tools, base_env, whitelist_file):
    for name, real in (("show", "cat"), ("ids", "id"), ("nodename", "uname")):
        os.symlink(shutil.which(real), os.path.join(tools, name))   # real binaries
    write_tool(tools, "warm", "true\n")
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(WHITELIST)
    assert wrapped(base_env, "warm").returncode == 0         # the dispatcher is up
    assert dispatcher_pids(base_env)
    return base_env


def direct(env, script, **kwargs):
    """The same bash script without arv-wrap."""
    return subprocess.run(["bash", "-c", script], env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, **kwargs)


def both(env, script, **kwargs):
    """(redirected, direct) runs of script; both must succeed."""
    runs = wrapped(env, script, **kwargs), direct(env, script, **kwargs)
    for run in runs:
        assert run.returncode == 0, run.stderr
    return runs


def status(text):
    """/proc/PID/status as a dict."""
    return dict(line.split(":\t", 1) for line in text.decode().splitlines() if ":\t" in line)


def has_signal(mask, signum):
    return bool(int(mask, 16) >> (signum - 1) & 1)


def assert_one_job_exited(env, name):
    """The call was redirected: one record for it, ended `exited`."""
    records = [r for r in job_records(env) if r["argv"][0] == name]
    assert [r["state"] for r in records] == ["exited"], records


def dispatcher_pids(env):
    sock = paths.socket_path(env)
    out = subprocess.run(["pgrep", "-f", f"arvwrap.dispatcher --socket {sock}"],
                         stdout=subprocess.PIPE, text=True).stdout
    return [int(pid) for pid in out.split()]


def need_root():
    if os.geteuid() != 0:
        if ON_CI:
            pytest.fail("this test must run as root on CI")
        pytest.skip("needs root")


def test_setpriv_dropped_gid_and_groups_reach_the_tool(env):
    need_root()
    need("setpriv")
    script = ("setpriv --regid=65534 --clear-groups ids -G; "
              "setpriv --regid=65534 --clear-groups show /proc/self/status")

    def seen(run):
        id_groups, _, proc = run.stdout.partition(b"\n")
        fields = status(proc)
        return id_groups, fields["Gid"].split(), fields["Groups"].split()

    redirected, plain = both(env, script)
    assert seen(plain) == (b"65534", ["65534"] * 4, [])
    assert seen(redirected) == seen(plain)
    assert_one_job_exited(env, "ids")
    assert_one_job_exited(env, "show")


def test_setpriv_no_new_privs_reaches_the_tool(env):
    need("setpriv")
    redirected, plain = both(env, "setpriv --no-new-privs show /proc/self/status")
    assert status(plain.stdout)["NoNewPrivs"] == "1"
    assert status(redirected.stdout)["NoNewPrivs"] == "1"
    assert_one_job_exited(env, "show")


def test_nohup_leaves_sighup_ignored_in_the_tool(env):
    need("nohup")
    redirected, plain = both(env, "nohup show /proc/self/status")
    assert has_signal(status(plain.stdout)["SigIgn"], signal.SIGHUP)
    assert status(redirected.stdout)["SigIgn"] == status(plain.stdout)["SigIgn"]
    assert_one_job_exited(env, "show")


def test_nice_applies_to_the_tool(env):
    need("nice")
    redirected, plain = both(env, "nice -n 7 show /proc/self/stat")
    niceness = lambda stat: stat.rsplit(b")", 1)[1].split()[16]     # field 19
    assert niceness(plain.stdout) == b"7"
    assert niceness(redirected.stdout) == b"7"
    assert_one_job_exited(env, "show")


def test_taskset_affinity_applies_to_the_tool(env):
    need("taskset")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: an affinity of CPU 0 would not differ from the dispatcher's")
    redirected, plain = both(env, "taskset -c 0 show /proc/self/status")
    assert status(plain.stdout)["Cpus_allowed_list"] == "0"
    assert status(redirected.stdout)["Cpus_allowed_list"] == "0"
    assert_one_job_exited(env, "show")


def test_oom_score_adj_set_before_exec_applies_to_the_tool(env):
    script = "sh -c 'echo 500 > /proc/self/oom_score_adj; exec show /proc/self/oom_score_adj'"
    redirected, plain = both(env, script)
    assert plain.stdout == b"500\n"
    assert redirected.stdout == plain.stdout
    assert_one_job_exited(env, "show")


def test_uts_namespace_of_the_caller_is_the_tools(env):
    need_root()
    need("unshare")
    script = "unshare --uts sh -c 'hostname arvwrap-ns-test; exec nodename -n'"
    redirected, plain = both(env, script)
    assert plain.stdout == b"arvwrap-ns-test\n"
    assert redirected.stdout == plain.stdout
    assert_one_job_exited(env, "nodename")


def test_a_descriptor_not_named_in_argv_is_inherited(env, tools, tmp_path):
    write_tool(tools, "fd5", "echo to-fd-5 >&5\n")
    ours, theirs = tmp_path / "redirected.out", tmp_path / "direct.out"
    redirected = wrapped(env, f"fd5 5>'{ours}'")
    plain = direct(env, f"fd5 5>'{theirs}'")
    assert (plain.returncode, theirs.read_text()) == (0, "to-fd-5\n")
    assert (redirected.returncode, redirected.stderr) == (0, b"")
    assert ours.read_text() == "to-fd-5\n"
    assert_one_job_exited(env, "fd5")


# Only the sub-make is whitelisted (as `submake`, a link to make): whitelisting `make`
# would make the outer make a job too. `+` marks it recursive, so it gets the jobserver.
OUTER_MK = "all:\n\t+submake -f inner.mk\n"
# a and b each wait for the other to have started: they finish only if run at once
INNER_MK = """all: a b
a:
\ttouch a.started && wait-for b.started && echo a ran
b:
\ttouch b.started && wait-for a.started && echo b ran
"""
WAIT_FOR = """deadline=$(($(date +%s) + 5))
while [ ! -e "$1" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "gave up waiting for $1" >&2; exit 1; }
    sleep 0.05
done
"""


def test_a_sub_make_job_gets_the_jobserver_and_runs_recipes_in_parallel(env, tools, tmp_path):
    need("make")
    os.symlink(shutil.which("make"), os.path.join(tools, "submake"))
    write_tool(tools, "wait-for", WAIT_FOR)
    runs = {}
    for how, run in (("direct", direct), ("redirected", wrapped)):
        work = tmp_path / how
        work.mkdir()
        (work / "outer.mk").write_text(OUTER_MK)
        (work / "inner.mk").write_text(INNER_MK)
        runs[how] = run(env, "make -s -j4 -f outer.mk", cwd=str(work))
    for how, result in runs.items():
        assert b"jobserver unavailable" not in result.stderr, (how, result.stderr)
        assert result.returncode == 0, (how, result.stderr)
        assert sorted(result.stdout.split(b"\n")) == [b"", b"a ran", b"b ran"], how
    assert_one_job_exited(env, "submake")


def test_a_signal_the_tool_sends_its_parent_reaches_the_caller(env, tools):
    write_tool(tools, "wake-parent", "kill -USR1 $PPID\n")
    [before] = dispatcher_pids(env)
    script = "trap 'echo caller got USR1' USR1; wake-parent; echo status=$?"
    redirected, plain = wrapped(env, script), direct(env, script)
    assert plain.stdout == b"caller got USR1\nstatus=0\n"
    assert (redirected.stdout, redirected.stderr) == (plain.stdout, plain.stderr)
    assert_one_job_exited(env, "wake-parent")
    assert wrapped(env, "warm").returncode == 0                # the dispatcher survived
    assert dispatcher_pids(env) == [before]


def test_signal_dispositions_and_mask_reach_the_tool(env):
    caller = ("import os, signal\n"
              "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
              "signal.signal(signal.SIGUSR2, signal.SIG_IGN)\n"
              "os.execvp('show', ['show', '/proc/self/status'])\n")
    redirected = arv_wrap("--", sys.executable, "-c", caller, env=env, stdout=subprocess.PIPE)
    plain = subprocess.run([sys.executable, "-c", caller], env=env, stdout=subprocess.PIPE)
    assert redirected.returncode == plain.returncode == 0
    ours, theirs = status(redirected.stdout), status(plain.stdout)
    assert has_signal(theirs["SigBlk"], signal.SIGUSR1)
    assert has_signal(theirs["SigIgn"], signal.SIGUSR2)
    assert (ours["SigBlk"], ours["SigIgn"]) == (theirs["SigBlk"], theirs["SigIgn"])
    assert_one_job_exited(env, "show")


LINEAGE = """read -r pid comm state ppid pgrp sid rest < /proc/$$/stat
echo "tool=$ppid $pgrp $sid"
printf 'parent=%s\\n' "$(tr '\\0\\n' '  ' < /proc/$ppid/cmdline)"
"""
CALLER = """lineage & echo "bg=$!"
read -r pid comm state ppid pgrp sid rest < /proc/$$/stat
echo "caller=$$ $pgrp $sid"
wait $!
"""


def test_the_tool_is_in_the_callers_session_and_group_and_not_the_dispatchers_child(env, tools):
    write_tool(tools, "lineage", LINEAGE)
    redirected, plain = both(env, CALLER)
    for run in (plain, redirected):
        seen = dict(line.split("=", 1) for line in run.stdout.decode().splitlines())
        caller, caller_pgrp, caller_sid = seen["caller"].split()
        ppid, pgrp, sid = seen["tool"].split()
        assert (pgrp, sid) == (caller_pgrp, caller_sid), seen
        assert ppid in (caller, seen["bg"]), seen          # bash, or the call bash started
        assert "arvwrap.dispatcher" not in seen["parent"], seen
    assert_one_job_exited(env, "lineage")
