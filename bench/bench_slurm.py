"""The Slurm backend: added latency, and what many jobs cost the controller.

1. Latency: a C loop fork+execvp's `true` N times with `true` whitelisted and
   `-b slurm` (shim -> client -> dispatcher -> srun -> back), and runs
   `srun -N1 -n1 true` directly the same number of times; rounds alternate and the
   dispatcher is warm. The loop submits faster than the default throttle allows
   (10/s), so latency is measured with ARV_WRAP_SLURM_SUBMIT_RATE=1000, and a
   second dispatcher with the default shows what the throttle does to such a loop.
2. Many jobs: one pipeline starts 200 redirected `sleep 2` at once (`sleep 2 &` x200,
   then `wait`). Every Slurm command the dispatcher runs goes through a logging
   wrapper first on its PATH, so the status queries (squeue, sacct, scontrol) and
   submissions (srun) are counted from outside the backend; the dispatcher's RSS
   is sampled every 0.2 s. The jobs run in a partition `bench` that this script
   creates at run time with `scontrol create` (OverSubscribe=FORCE, so all of them
   can share the 2 cores) and deletes afterwards; it needs root for that.
Nothing is timed unless the shim loads and a warm-up call is recorded as a job that
ran on the slurm backend (bench: ... and exit 2 otherwise).

    python bench/bench_slurm.py [--rounds 5] [--n 20] [--jobs 200] [--rate 10]
"""
import argparse
import collections
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from arvwrap import activation, whitelist  # noqa: E402

COUNTED = ("srun", "squeue", "sacct", "scontrol", "sinfo", "scancel")


def activated_env(tmp, name, rules_text, extra=None):
    rules_file = os.path.join(tmp, f"{name}.yaml")
    with open(rules_file, "w") as f:
        f.write(rules_text)
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"),
           "ARV_WRAP_STATE_DIR": os.path.join(tmp, f"state-{name}"),
           "ARV_WRAP_IDLE_TIMEOUT": "60"}
    env.update(common.source_path())   # a source checkout: the dispatcher imports it too
    env.update(extra or {})
    rules = whitelist.load([rules_file])
    env.update(activation.activation_env([rules_file], rules, {"backend": "slurm"}, "bench", env))
    return env


def dispatcher_pid(env):
    pids = common.dispatcher_pids(env)
    return pids[0] if pids else None


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def wrappers(tmp, log):
    """A bin dir whose Slurm commands log '<name> <time>' to log, then exec the real one."""
    bin_dir = os.path.join(tmp, "counting-bin")
    os.makedirs(bin_dir)
    for name in COUNTED:
        real = subprocess.run(["bash", "-c", f"command -v {name}"], stdout=subprocess.PIPE,
                              text=True).stdout.strip()
        with open(os.path.join(bin_dir, name), "w") as f:
            f.write(f"#!/bin/sh\necho \"{name} $(date +%s.%N) $1 $2\" >> '{log}'\n"
                    f"exec {real} \"$@\"\n")
        os.chmod(os.path.join(bin_dir, name), 0o755)
    return bin_dir


def latency(tmp, args):
    """Back-to-back calls outrun the default submission throttle (10/s), which then
    paces the loop by design; latency is measured with the throttle lifted, and the
    throttled loop is shown beside it."""
    loop, _ = common.build(tmp)
    rules = "tools:\n  - name: 'true'\n"
    unthrottled = activated_env(tmp, "latency", rules, {"ARV_WRAP_SLURM_SUBMIT_RATE": "1000"})
    throttled = activated_env(tmp, "latency-throttled", rules)
    direct_env = {k: v for k, v in unthrottled.items() if k != "LD_PRELOAD"}
    srun = ["srun", "-N1", "-n1", "true"]
    try:
        for env in (unthrottled, throttled):                        # warm up
            common.require_setup(env, warmup=["true"], backend="slurm")
            common.spawn_loop(loop, 5, ["true"], env)
        common.spawn_loop(loop, 5, srun, direct_env)
        direct, redirected, paced = [], [], []
        for _ in range(args.rounds):
            direct += common.spawn_loop(loop, args.n, srun, direct_env)
            redirected += common.spawn_loop(loop, args.n, ["true"], unthrottled)
            paced += common.spawn_loop(loop, args.n, ["true"], throttled)
    finally:   # also when the setup check refuses
        for env in (unthrottled, throttled):
            common.stop_dispatcher(env)
    d, r, p = common.median(direct), common.median(redirected), common.median(paced)
    print(f"`true` {args.n * args.rounds} times each, back to back, alternating rounds, medians")
    print(f"  srun -N1 -n1 true                     {d * 1000:7.2f} ms")
    print(f"  redirected true (-b slurm)            {r * 1000:7.2f} ms   x{r / d:.3f}   "
          f"added {(r - d) * 1000:.2f} ms   (submit rate 1000/s)")
    print(f"  same, default throttle (10/s)         {p * 1000:7.2f} ms   x{p / d:.3f}   "
          f"(the loop outruns the throttle)")


def many(tmp, args):
    subprocess.run(["scontrol", "delete", "PartitionName=bench"], capture_output=True)
    subprocess.run(["scontrol", "create", "PartitionName=bench", "Nodes=ALL",
                    "OverSubscribe=FORCE:250", "MaxTime=10", "State=UP"], check=True)
    log = os.path.join(tmp, "slurm-commands.log")
    open(log, "w").close()
    bin_dir = wrappers(tmp, log)
    env = activated_env(tmp, "many",
                        "tools:\n  - name: sleep\n    memory: 32M\n    slurm: {partition: bench}\n",
                        {"ARV_WRAP_SLURM_SUBMIT_RATE": str(args.rate)})
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    script = f"for i in $(seq {args.jobs}); do sleep 2 & done; wait"
    try:
        # warm: the dispatcher starts with the counting PATH; its own calls are not counted
        common.require_setup(env, warmup=["sleep", "0"], backend="slurm")
        open(log, "w").close()
        start = time.monotonic()
        proc = subprocess.Popen(["bash", "-c", script], env=env)
        peak, pid = 0, None
        while proc.poll() is None:
            pid = pid or dispatcher_pid(env)
            if pid:
                peak = max(peak, rss_kib(pid))
            time.sleep(0.2)
        elapsed = time.monotonic() - start
        idle_rss = rss_kib(pid) if pid else 0
    finally:
        common.stop_dispatcher(env)
        subprocess.run(["scontrol", "delete", "PartitionName=bench"], capture_output=True)
    counts = collections.Counter()
    stamps = collections.defaultdict(list)
    with open(log) as f:
        for line in f:
            name, stamp, *words = line.split()
            if name == "scontrol" and words[:2] in (["show", "config"], ["ping"]):
                name = "scontrol-config"     # asks about the cluster, not about jobs
            counts[name] += 1
            stamps[name].append(float(stamp))
    status = counts["squeue"] + counts["sacct"] + counts["scontrol"]
    busiest = max((sum(1 for s in ss if t <= s < t + 1) for ss in [
        sorted(stamps["squeue"] + stamps["sacct"] + stamps["scontrol"])] for t in ss), default=0)
    print(f"{args.jobs} concurrent redirected `sleep 2` (submit rate {args.rate}/s, "
          f"max in flight {os.environ.get('ARV_WRAP_SLURM_MAX_JOBS', 500)}): "
          f"exit {proc.returncode}, {elapsed:.1f} s")
    print(f"  submissions (srun)      {counts['srun']:5d}   {counts['srun'] / elapsed:6.2f} /s")
    print(f"  status queries          {status:5d}   {status / elapsed:6.2f} /s   "
          f"(most in any 1 s: {busiest}; squeue {counts['squeue']}, scontrol "
          f"{counts['scontrol']}, sacct {counts['sacct']})")
    print(f"  other                   sinfo {counts['sinfo']}, scontrol show config/ping "
          f"{counts['scontrol-config']}, scancel {counts['scancel']}")
    print(f"  dispatcher RSS          peak {peak / 1024:.1f} MiB, after {idle_rss / 1024:.1f} MiB")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-many", action="store_true")
    args = parser.parse_args()
    print("command: python " + " ".join(sys.argv))
    with common.tmpdir() as tmp:
        if not args.skip_latency:
            latency(tmp, args)
        if not args.skip_many:
            many(tmp, args)


if __name__ == "__main__":
    main()
