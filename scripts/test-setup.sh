#!/usr/bin/env bash
# Prepare a fresh Debian machine (as root) for the test suite: the system
# packages the tests use for real, arv-wrap itself with its test extras, and the
# services the tests talk to. Idempotent; run from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(gcc make bash coreutils findutils procps)
# musl: arv-wrap-client is linked with it when present (csrc/native.py says why)
packages+=(musl-tools)
# examples/align (tests/test_align.py): the real tools, and javac for its Java driver
packages+=(bwa samtools bcftools openjdk-17-jdk-headless)
# tests/test_report.py: the HTML report, loaded in real headless Chromium
packages+=(chromium)
# tests/test_fuzz.py: libFuzzer (clang's -fsanitize=fuzzer); tests/test_elf.py: a static
# busybox and a Go toolchain for real uncatchable callers
packages+=(clang libclang-rt-14-dev busybox-static golang-go)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check '.[test]'
# Snakemake, for examples/align/Snakefile (from PyPI; skipped when already there)
python3 -c 'import snakemake' 2>/dev/null ||
    python3 -m pip install -q --disable-pip-version-check snakemake
if command -v pyenv >/dev/null; then pyenv rehash; fi   # so `snakemake` is on PATH

# A three-node Slurm cluster on this machine, each node a network namespace of its own
# (installs Slurm, munge and iproute2 when missing; docs/slurm.md). A cluster already
# up with another node count is reconfigured to three.
bash scripts/slurm-cluster.sh up --nodes 3
bash scripts/docker-engine.sh   # a local dockerd and the docker backend's test images
