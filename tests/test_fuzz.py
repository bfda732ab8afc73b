"""Fuzz targets (fuzz/) run for a bounded time (issue 12, point 4): the rules
matcher, the shim's environment repair, the client's reply reader (libFuzzer, clang,
with ASan and UBSan) and the dispatcher's request and control-line parser (atheris).
Each starts from its seed corpus (fuzz/corpus/<target>/, read only: new inputs go to
a temporary directory) and fails the test on any crash, sanitizer report, leak of a
descriptor or broken invariant the target checks. ARVWRAP_FUZZ_SECONDS sets the
time per target (default 15)."""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ON_CI, need

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "fuzz")
SECONDS = int(os.environ.get("ARVWRAP_FUZZ_SECONDS", "15"))
C_TARGETS = {
    "match": ["csrc/match.c"],
    "env": ["csrc/env.c"],
    "reply": ["csrc/client/wire.c", "csrc/common/common.c"],
}
MAX_LEN = {"reply": 140000}     # past the reader's 64 KiB line buffer


def fuzz(command, target, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    r = subprocess.run(command + [f"-max_total_time={SECONDS}", "-timeout=10",
                                  f"-max_len={MAX_LEN.get(target, 4096)}",
                                  f"-artifact_prefix={tmp_path}/", str(corpus),
                                  os.path.join(FUZZ, "corpus", target)],
                       capture_output=True, text=True, timeout=SECONDS + 120)
    found = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "leak-",
                                                                      "timeout-", "oom-"))]
    assert r.returncode == 0 and not found, f"{target}: {found}\n{r.stderr[-6000:]}"
    assert "Done " in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("target", sorted(C_TARGETS))
def test_fuzz_native(target, tmp_path):
    need("clang")
    binary = str(tmp_path / f"fuzz_{target}")
    subprocess.run(["clang", "-g", "-O1", "-fsanitize=fuzzer,address,undefined",
                    "-fno-sanitize-recover=all", "-D_GNU_SOURCE", "-I", os.path.join(ROOT, "csrc"),
                    os.path.join(FUZZ, f"fuzz_{target}.c"),
                    *[os.path.join(ROOT, s) for s in C_TARGETS[target]], "-o", binary],
                   check=True)
    fuzz([binary], target, tmp_path)


def test_fuzz_protocol(tmp_path):
    if importlib.util.find_spec("atheris") is None:
        if ON_CI:
            pytest.fail("atheris is required on CI but is not installed")
        pytest.skip("atheris is not installed")
    fuzz([sys.executable, os.path.join(FUZZ, "fuzz_protocol.py")], "protocol", tmp_path)
