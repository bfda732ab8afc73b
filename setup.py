"""Build the native parts of arv-wrap next to the Python package.

Four artifacts come out of csrc/:
  arvwrap/_native/libarvwrap.so    the LD_PRELOAD shim (only the exec hooks exported)
  arvwrap/_native/arv-wrap-client  the tiny program the shim execs for a matched call
  arvwrap/_native/arv-wrap-helper  --exec for the top-level command, and the Slurm
                                   backend's relay and launcher (csrc/native.py)
  arvwrap/_match.*.so              the same C matcher for Python, through cffi
"""
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
sys.path.insert(0, CSRC)
import native  # noqa: E402  (csrc/native.py: how the shim, the client and the helper are built)


def compile_native(out_dir):
    """Compile the shim, the client and the helper into out_dir with the system C compiler."""
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
