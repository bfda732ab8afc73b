"""Shared helpers of the benchmarks: build the C helpers, run spawn_loop, summarise."""
import os
import statistics
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def build(tmp):
    """Compile spawn_loop and the empty preload library into tmp."""
    loop = os.path.join(tmp, "spawn_loop")
    empty = os.path.join(tmp, "libempty.so")
    subprocess.check_call(["cc", "-O2", "-o", loop, os.path.join(HERE, "spawn_loop.c")])
    subprocess.check_call(["cc", "-O2", "-shared", "-fPIC", "-o", empty,
                           os.path.join(HERE, "empty.c")])
    return loop, empty


def spawn_loop(loop, n, argv, env):
    """Per-iteration seconds of n fork+execvp+wait of argv."""
    out = subprocess.run([loop, str(n), *argv], env=env, check=True,
                         stdout=subprocess.PIPE).stdout
    return [int(line) / 1e9 for line in out.split()]


def median(values):
    return statistics.median(values)


def tmpdir():
    return tempfile.TemporaryDirectory(prefix="arv-wrap-bench-")
