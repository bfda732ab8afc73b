"""The native code under AddressSanitizer and UndefinedBehaviorSanitizer (issue 12,
point 4): the shim, the client and the helper built by `csrc/native.py --sanitize`
into a directory of their own, and the exec-path and client tests
(tests/test_shim.py, test_client.py, test_stack.py) run again against that build in
a pytest of their own (conftest.py reads ARVWRAP_TEST_NATIVE). Any sanitizer report
fails the test: the options compiled into the build (csrc/sanitize_opts.c) halt on
the first error and log it to <build dir>/san.<pid>, which is checked afterwards.

How it works with gcc 12 is in csrc/native.py (sanitized_flags). The canaries prove
that a finding in a preloaded library is reported and logged, even under env -i.
"""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import native  # noqa: E402

TESTS = ["tests/test_shim.py", "tests/test_client.py", "tests/test_stack.py"]
# What differs by design in the sanitized build, so these two are not run against it:
DESELECT = [
    # the sanitized shim also exports __asan_default_options and __ubsan_default_options
    "tests/test_shim.py::test_exports_only_hooks",
    # a sanitized program cannot be static (the runtimes are shared libraries)
    "tests/test_client.py::test_the_client_is_static_where_the_system_allows_and_the_helper_dynamic",
]


@pytest.fixture(scope="module")
def sanitized(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sanitized"))
    native.build(out, sanitize=True)
    return out


def reports(build):
    """ASan's logs (san.<pid>) and UBSan's (san.ubsan.<pid>, see sanitize_opts.c)."""
    return {path: open(path, errors="replace").read()
            for path in glob.glob(os.path.join(build, "san.*"))}


@pytest.mark.parametrize("kind", ["asan", "ubsan"])
def test_canary_in_a_preloaded_library_is_reported(kind, sanitized, tmp_path):
    flags, srcs = native.sanitized_flags(str(tmp_path))
    lib = str(tmp_path / "libcanary.so")
    subprocess.run(["cc", "-O1", "-g", "-fPIC", "-shared", *flags, "-o", lib,
                    os.path.join(ROOT, "tests", "sanitized", "canary.c"), *srcs]
                   # (UBSan's object-size check would catch the overflow first)
                   + (["-DCANARY_UBSAN"] if kind == "ubsan" else ["-fno-sanitize=undefined"]),
                   check=True)
    r = subprocess.run(["env", "-i", f"LD_PRELOAD={lib}", "/bin/true"],
                       capture_output=True, timeout=60)
    assert r.returncode != 0
    (text,) = reports(str(tmp_path)).values()
    assert ("stack-buffer-overflow" if kind == "asan" else "invalid-shift-exponent") in text


def test_exec_path_and_client_tests_under_asan_and_ubsan(sanitized):
    env = dict(os.environ, ARVWRAP_TEST_NATIVE=sanitized)
    env.pop("PYTEST_ADDOPTS", None)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *TESTS, *[f"--deselect={t}" for t in DESELECT]],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    found = reports(sanitized)
    assert not found, "sanitizer reports:\n" + "\n".join(
        f"--- {path}\n{text[:4000]}" for path, text in found.items())
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout[-2000:]
