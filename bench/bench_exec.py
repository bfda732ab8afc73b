"""Cost of the shim on execs it does not redirect.

2000 fork+execs of /bin/true, from a C loop and from a bash loop, with no preload,
with an empty libc-linked preload (the floor any preload pays), with that empty
preload plus the variables an activated pipeline carries (the floor for arv-wrap:
a larger environment costs every exec a little), and with the shim holding the
demo whitelist's rules (none match /bin/true). They run in turn, round after
round, so drift in the machine hits all of them alike. Nothing is timed unless
ld.so really loads each preloaded library (bench: ... and exit 2 otherwise).

    python bench/bench_exec.py [--rounds 15] [--n 2000]
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from arvwrap import activation, store, whitelist  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def environments(empty):
    files = [os.path.join(ROOT, "whitelists", "demo.yaml")]
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
    active = activation.activation_env(files, whitelist.load(files), {"backend": None},
                                store.new_id(), base)
    variables = {k: v for k, v in active.items() if k != "LD_PRELOAD"}
    return {
        "none": base,
        "empty preload": {**base, "LD_PRELOAD": empty},
        "empty + vars": {**base, **variables, "LD_PRELOAD": empty},
        "arv-wrap shim": {**base, **active},
    }


def time_bash(n, env):
    start = time.perf_counter()
    subprocess.run(["bash", "-c", f"for ((i=0;i<{n};i++)); do /bin/true; done"],
                   env=env, check=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    with common.tmpdir() as tmp:
        loop, empty = common.build(tmp)
        envs = environments(empty)
        for env in envs.values():   # every preload measured is really loaded
            if "LD_PRELOAD" in env:
                common.require_setup(env)
        totals = {(kind, name): [] for kind in ("C loop", "bash loop") for name in envs}
        for _ in range(args.rounds):
            for name, env in envs.items():
                totals[("C loop", name)].append(
                    sum(common.spawn_loop(loop, args.n, ["/bin/true"], env)))
                totals[("bash loop", name)].append(time_bash(args.n, env))
    print(f"{args.n} fork+exec of /bin/true, median of {args.rounds} rounds")
    for kind in ("C loop", "bash loop"):
        direct = common.median(totals[(kind, "none")])
        for name in envs:
            m = common.median(totals[(kind, name)])
            print(f"  {kind:9}  {name:14}  {m * 1000:8.1f} ms  "
                  f"{m / args.n * 1e6:6.1f} us/exec  x{m / direct:.3f}")


if __name__ == "__main__":
    main()
