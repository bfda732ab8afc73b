"""Job reuse: a rerun of examples/align costs only what changed.

1. The align pipeline (examples/align/run.sh) on --pairs generated read pairs, run
   unwrapped, then under `arv-wrap --reuse` with an empty cache (every heavy step
   runs, and is kept), then again after its output dir is removed (every heavy
   step is reused). Wall times, medians of --rounds, and the ratio of the second
   wrapped run to the first. The second run counts only if all seven heavy steps
   were reused and its outputs are byte for byte those of the first; otherwise
   the benchmark says so and prints nothing.
2. Keys on a big input: SHA-256 of a --gib GiB file by arvwrap.digests (as the
   key does), against `sha256sum` on the same file, and the remembered digest of
   the unchanged file (what each later key costs).

    python bench/bench_reuse.py [--pairs 100000] [--rounds 3] [--gib 1]
"""
import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from arvwrap import digests  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIGN = os.path.join(ROOT, "examples", "align")
WHITELIST = os.path.join(ROOT, "whitelists", "bcbio.yaml")
HEAVY = 7


def timed(argv, cwd, env):
    start = time.monotonic()
    result = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seconds = time.monotonic() - start
    if result.returncode:
        common.refuse(f"{' '.join(argv[:6])}... exited {result.returncode}: "
                      f"{result.stderr.decode(errors='replace').strip()[-300:]}")
    return seconds


def same_tree(a, b):
    compared = filecmp.dircmp(a, b)
    if compared.left_only or compared.right_only or compared.diff_files or compared.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, compared.common_files, shallow=False)
    return not mismatch and not errors and all(
        same_tree(os.path.join(a, d), os.path.join(b, d)) for d in compared.common_dirs)


def pipeline(tmp, pairs, rounds):
    reads = os.path.join(tmp, "reads")
    subprocess.run([sys.executable, os.path.join(ALIGN, "gen.py"), reads, str(pairs)],
                   check=True, stdout=subprocess.DEVNULL)
    argv = [os.path.join(ALIGN, "run.sh"), "out", os.path.join(reads, "reads_1.fq"),
            os.path.join(reads, "reads_2.fq")]
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("ARV_WRAP_")}
    times = {"unwrapped": [], "first": [], "second": []}
    for n in range(rounds):
        work = os.path.join(tmp, f"round{n}")
        os.makedirs(work)
        times["unwrapped"].append(timed(argv, work, plain_env))
        shutil.rmtree(os.path.join(work, "out"))
        env = {**plain_env, "ARV_WRAP_STATE_DIR": os.path.join(work, "state")}
        wrap = [sys.executable, "-m", "arvwrap", "-w", WHITELIST, "--reuse", "--"]
        times["first"].append(timed(wrap + argv, work, env))
        os.rename(os.path.join(work, "out"), os.path.join(work, "first"))
        times["second"].append(timed(wrap + argv, work, env))
        reused = [r for r in common.job_records(env)[:HEAVY] if r.get("reused_from")]
        if len(reused) != HEAVY:
            common.refuse(f"round {n + 1}: {len(reused)} of {HEAVY} heavy steps were reused")
        if not same_tree(os.path.join(work, "first"), os.path.join(work, "out")):
            common.refuse(f"round {n + 1}: the reused outputs differ from the first run's")
        common.stop_dispatcher(env)
    return times


def hashing(tmp, gib):
    path = os.path.join(tmp, "big")
    with open(path, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(int(gib * 1024)):
            f.write(block)
    start = time.monotonic()
    subprocess.run(["sha256sum", path], check=True, stdout=subprocess.DEVNULL)
    tool = time.monotonic() - start
    memo = digests.Digests()
    start = time.monotonic()
    memo.digest(path)
    ours = time.monotonic() - start
    start = time.monotonic()
    memo.digest(path)
    again = time.monotonic() - start
    os.unlink(path)
    return tool, ours, again


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gib", type=float, default=1.0)
    args = parser.parse_args()
    for program in ("bwa", "samtools", "bcftools", "sha256sum"):
        if not shutil.which(program):
            common.refuse(f"{program} is not installed")
    with common.tmpdir() as tmp:
        check_env = {k: v for k, v in os.environ.items() if not k.startswith("ARV_WRAP_")}
        check_env["ARV_WRAP_STATE_DIR"] = os.path.join(tmp, "check-state")
        from arvwrap import activation, whitelist
        rules = whitelist.load([WHITELIST])
        common.require_setup({**check_env, **activation.activation_env(
            [WHITELIST], rules, {"backend": "local"}, "bench", check_env)})
        times = pipeline(tmp, args.pairs, args.rounds)
        tool, ours, again = hashing(tmp, args.gib)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"command: python bench/bench_reuse.py --pairs {args.pairs} --rounds {args.rounds} "
          f"--gib {args.gib:g}   (load {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)")
    print(f"examples/align on {args.pairs} read pairs, median of {args.rounds} rounds:")
    print(f"  unwrapped                      {median['unwrapped']:7.2f} s")
    print(f"  arv-wrap --reuse, first run    {median['first']:7.2f} s   (every heavy step runs)")
    print(f"  arv-wrap --reuse, second run   {median['second']:7.2f} s   (all {HEAVY} reused, "
          f"outputs identical)")
    print(f"  second / first                 {median['second'] / median['first']:7.2f}"
          f"   (target: under 0.10)")
    rate = lambda seconds: args.gib * 1024 / seconds   # noqa: E731
    print(f"keys on a {args.gib:g} GiB input: sha256sum {tool:.2f} s ({rate(tool):.0f} MiB/s), "
          f"arvwrap.digests {ours:.2f} s ({rate(ours):.0f} MiB/s, x{ours / tool:.2f}), "
          f"remembered {again * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
