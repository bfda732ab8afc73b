"""How the two C programs are built (setup.py, and the tests for a source tree).

arv-wrap-client runs once per redirected call: it is linked statically when the
system has a static libc, which saves its dynamic loading on every call (its only
NSS use, getpwuid, is a fallback for a missing $HOME). arv-wrap-helper stays
dynamic: its --exec needs the shim preloaded, and its --relay resolves host names.
"""
import glob
import os
import shlex
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
        command = cc + CFLAGS + ["-o", tmp] + srcs
        if name in STATIC and subprocess.run(command + ["-static"],
                                             stderr=subprocess.DEVNULL).returncode == 0:
            pass
        else:
            subprocess.check_call(command)
        os.replace(tmp, target)   # a running copy is never written to
