"""Latency a redirected call adds on the local backend.

A C loop fork+execvp's `true` N times: directly, and with `true` whitelisted so
each call goes shim -> client -> dispatcher -> job -> back. Rounds alternate;
the dispatcher is warm (started before timing). The cold start (first call with
no dispatcher running) is measured separately. Nothing is timed unless the shim
loads and a warm-up `true` is recorded as a local job (bench: ... and exit 2).

    python bench/bench_latency.py [--rounds 10] [--n 200]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from arvwrap import activation, paths, whitelist  # noqa: E402


def activated_env(tmp, tool="true", bin_dir=None):
    """An environment that redirects `tool` (found first in bin_dir, if given)."""
    rules_file = os.path.join(tmp, "bench.yaml")
    with open(rules_file, "w") as f:
        f.write(f"tools:\n  - name: '{tool}'\n    cpus: 0.1\n")
    path = f"{bin_dir}:{os.environ['PATH']}" if bin_dir else os.environ["PATH"]
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/"),
           "ARV_WRAP_STATE_DIR": os.path.join(tmp, "state"), "ARV_WRAP_IDLE_TIMEOUT": "30"}
    env.update(common.source_path())   # a source checkout: the dispatcher imports it too
    rules = whitelist.load([rules_file])
    env.update(activation.activation_env([rules_file], rules, {"backend": "local"}, "bench", env))
    return env


def stop_dispatcher(env):
    common.stop_dispatcher(env)
    sock = paths.socket_path(env)
    for _ in range(200):
        if not os.path.exists(sock):
            return
        time.sleep(0.01)
    os.unlink(sock)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--cold", type=int, default=5)
    args = parser.parse_args()
    with common.tmpdir() as tmp:
        loop, _ = common.build(tmp)
        env = activated_env(tmp)
        direct_env = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
        try:
            common.require_setup(env, warmup=["true"], backend="local")
            cold = []
            for _ in range(args.cold):
                stop_dispatcher(env)
                cold += common.spawn_loop(loop, 1, ["true"], env)
            common.spawn_loop(loop, 20, ["true"], env)   # warm up
            direct, redirected = [], []
            for _ in range(args.rounds):
                direct += common.spawn_loop(loop, args.n, ["true"], direct_env)
                redirected += common.spawn_loop(loop, args.n, ["true"], env)
        finally:   # also when the setup check refuses: leave no dispatcher behind
            stop_dispatcher(env)
    d, r = common.median(direct), common.median(redirected)
    print(f"`true` run {args.n * args.rounds} times each, medians")
    print(f"  direct               {d * 1000:7.2f} ms")
    print(f"  redirected (warm)    {r * 1000:7.2f} ms   added {(r - d) * 1000:.2f} ms   x{r / d:.1f}")
    print(f"  redirected (cold)    {common.median(cold) * 1000:7.2f} ms   "
          f"(median of {args.cold} first calls with no dispatcher running)")


if __name__ == "__main__":
    main()
