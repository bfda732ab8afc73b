"""Where the CPU of one redirected call goes, on the local backend.

Tiny calls are bound by CPU, so a wrapped call costs what it adds in CPU. A C loop
runs a copy of /bin/true N times and reads each child's CPU (its reaped children
included) from wait4, in four ways:
  1. the tool alone;
  2. the tool under vfork_exec, a static program that only starts it as its child
     and waits (linked like the client): the client's cost as a process;
  3. the client in probe mode (it records the call and exits): its start;
  4. the tool redirected: client and tool, while the dispatcher's own CPU for the
     same calls is read from /proc.
Nothing is printed unless the shim loads and a warm-up call is recorded as a local
job (bench: ... and exit 2).

    python bench/bench_cost.py [--n 2000] [--rounds 3]
"""
import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_latency  # noqa: E402
import common  # noqa: E402



def build(tmp):
    """child_cpu, and vfork_exec linked as csrc/native.py links the client (musl
    first)."""
    loop = os.path.join(tmp, "child_cpu")
    subprocess.check_call(["cc", "-O2", "-o", loop, os.path.join(common.HERE, "child_cpu.c")])
    wrapper = os.path.join(tmp, "vfork_exec")
    for compiler in (["musl-gcc"] if shutil.which("musl-gcc") else []) + ["cc"]:
        if subprocess.run([compiler, "-O2", "-static", "-o", wrapper,
                           os.path.join(common.HERE, "vfork_exec.c")]).returncode == 0:
            return loop, wrapper
    common.refuse("cannot link vfork_exec statically")


def cpu_per_call(loop, n, argv, env):
    out = subprocess.run([loop, str(n), *argv], env=env, check=True,
                         stdout=subprocess.PIPE).stdout
    return common.median([int(line) for line in out.split()])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with common.tmpdir() as tmp:
        loop, wrapper = build(tmp)
        tool = os.path.join(tmp, "tiny")
        shutil.copy("/bin/true", tool)
        env = bench_latency.activated_env(tmp, tool="tiny", bin_dir=tmp)
        direct = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
        rows = {"tool": [], "vfork": [], "probe": [], "wrapped": [], "dispatcher": []}
        try:
            common.require_setup(env, warmup=["tiny"], backend="local")
            pids = common.dispatcher_pids(env)
            for _ in range(args.rounds):
                rows["tool"].append(cpu_per_call(loop, args.n, [tool], direct))
                rows["vfork"].append(cpu_per_call(loop, args.n, [wrapper, tool], direct))
                rows["probe"].append(cpu_per_call(loop, args.n, ["tiny"],
                                                  {**env, "ARV_WRAP_PROBE": os.devnull}))
                before = common.dispatcher_cpu(pids)
                rows["wrapped"].append(cpu_per_call(loop, args.n, ["tiny"], env))
                rows["dispatcher"].append((common.dispatcher_cpu(pids) - before) / args.n * 1e6)
        finally:
            bench_latency.stop_dispatcher(env)
    m = {k: common.median(v) for k, v in rows.items()}
    print(f"CPU per call (user + system), medians of {args.rounds} rounds of {args.n} "
          f"sequential calls; load at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"  the tool alone (a copy of /bin/true)          {m['tool']:6.0f} us")
    print(f"  the client as a process (vfork_exec - tool)   {m['vfork'] - m['tool']:6.0f} us")
    print(f"  the client's start, probe mode                {m['probe']:6.0f} us")
    print(f"  the client's talking (wrapped - vfork_exec)   {m['wrapped'] - m['vfork']:6.0f} us")
    print(f"  the dispatcher                                {m['dispatcher']:6.0f} us")
    added = m["wrapped"] - m["tool"] + m["dispatcher"]
    print(f"  added by arv-wrap                             {added:6.0f} us "
          f"(x{(m['tool'] + added) / m['tool']:.2f} the tool's own)")


if __name__ == "__main__":
    main()
