"""Build the native parts of arv-wrap next to the Python package.

Four artifacts come out of csrc/:
  arvwrap/_native/libarvwrap.so    the LD_PRELOAD shim (only the exec hooks exported)
  arvwrap/_native/arv-wrap-client  the tiny program the shim execs for a matched call
  arvwrap/_native/arv-wrap-helper  --exec for the top-level command, and the Slurm
                                   backend's relay and launcher (csrc/native.py)
  arvwrap/_match.*.so              the same C matcher for Python, through cffi
"""
import os
import shlex
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
sys.path.insert(0, CSRC)
import native  # noqa: E402  (csrc/native.py: how the client and the helper are built)
CFLAGS = ["-O2", "-g", "-Wall", "-Wextra", "-fvisibility=hidden", "-D_GNU_SOURCE"]
# Every process of a pipeline loads the shim, so its load cost is paid per exec:
# two LOAD segments instead of four, and no RELRO mprotect, measured at about
# 0.04 of a fork+exec of /bin/true (bench/bench_exec.py). Its few GOT entries stay
# writable either way under lazy binding.
SHIM_LDFLAGS = ["-Wl,-z,noseparate-code", "-Wl,-z,norelro",
                # No crt files: their weak undefined symbols (_ITM_*, __gmon_start__,
                # __cxa_finalize) cost every process failed lookups; the constructor
                # runs from .init_array without them.
                "-nostartfiles"]
# The shim defines its own (hidden) string functions so that nothing on its load
# or pass-through path goes through the PLT: keep gcc from turning their loops
# back into calls to themselves.
SHIM_CFLAGS = ["-fno-tree-loop-distribute-patterns"]


def compile_native(out_dir):
    """Compile the shim, the client and the helper into out_dir with the system C compiler."""
    cc = shlex.split(os.environ.get("CC", "cc"))
    os.makedirs(out_dir, exist_ok=True)
    shim = os.path.join(out_dir, "libarvwrap.so")
    src = lambda *names: [os.path.join(CSRC, n) for n in names]
    subprocess.check_call(cc + CFLAGS + SHIM_CFLAGS + SHIM_LDFLAGS
                          + ["-fPIC", "-shared", "-o", shim] + src("shim.c", "match.c"))
    native.build(out_dir, os.environ.get("CC", "cc"))


class BuildNative(build_ext):
    def run(self):
        super().run()  # the cffi extension
        if self.inplace:
            out = os.path.join(HERE, "src", "arvwrap", "_native")
        else:
            out = os.path.join(self.build_lib, "arvwrap", "_native")
        compile_native(out)


setup(
    cffi_modules=["csrc/build_match.py:ffibuilder"],
    cmdclass={"build_ext": BuildNative},
    package_data={"arvwrap": ["_native/*"]},
)
