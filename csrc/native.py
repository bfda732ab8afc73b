"""How the two C programs are built (setup.py, and the tests for a source tree).

arv-wrap-client runs once per redirected call, so it is linked statically: with
musl where musl-gcc is installed, else with the system's static libc, else
dynamically. musl first because a static glibc program spends about 0.28 ms of
every start probing the CPU with cpuid, which traps to the hypervisor in a VM
(bench/bench_start.py measures it). Its only NSS use, getpwuid, is a fallback for
a missing $HOME. arv-wrap-helper stays dynamic: its --exec needs the shim
preloaded, and its --relay resolves host names.
"""
import glob
import os
import shlex
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-fvisibility=hidden", "-D_GNU_SOURCE"]
COMMON = [os.path.join(HERE, "common", "common.c")]
PROGRAMS = {
    "arv-wrap-client": sorted(glob.glob(os.path.join(HERE, "client", "*.c"))) + COMMON,
    "arv-wrap-helper": sorted(glob.glob(os.path.join(HERE, "helper", "*.c"))) + COMMON,
}
STATIC = {"arv-wrap-client"}


def sources():
    """Every file the programs are built from (for staleness checks)."""
    return [f for d in ("client", "helper", "common")
            for f in glob.glob(os.path.join(HERE, d, "*.[ch]"))]


def build(out_dir, cc=None):
    """Compile both programs into out_dir (each written atomically)."""
    cc = shlex.split(cc or os.environ.get("CC", "cc"))
    os.makedirs(out_dir, exist_ok=True)
    for name, srcs in PROGRAMS.items():
        target = os.path.join(out_dir, name)
        tmp = f"{target}.{os.getpid()}.tmp"
        tail = CFLAGS + ["-o", tmp] + srcs
        static = static_compilers(cc) if name in STATIC else []
        if not any(subprocess.run(c + tail + ["-static"], stderr=subprocess.DEVNULL).returncode == 0
                   for c in static):
            subprocess.check_call(cc + tail)
        os.replace(tmp, target)   # a running copy is never written to


def static_compilers(cc):
    """The compilers to try for a static program, best first."""
    musl = shutil.which("musl-gcc")
    return ([[musl]] if musl and not os.environ.get("CC") else []) + [cc]
