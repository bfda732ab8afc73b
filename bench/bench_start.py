"""What starting a tiny static program costs here, by how it is linked.

arv-wrap-client is exec'd once per redirected call, so its start is on every
call's path. This builds the same empty main() four ways (static with glibc,
static with musl when musl-gcc is installed, dynamic with glibc, and a _start
that only calls exit, which no libc initialises) and times fork+exec+wait of each
with spawn_loop, then the installed client itself, in its probe mode
(ARV_WRAP_PROBE=/dev/null: it reads its request and exits 0, contacting no
dispatcher). Medians of --n runs; nothing is asserted.

Then a run's own start, which `arv-wrap COMMAND` pays once: `python -m arvwrap -w W
-- true` (its whitelist already validated once, as in any run after the first),
beside `python -c pass`, medians of --runs.

    python bench/bench_start.py [--n 2000] [--runs 15]
"""
import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from arvwrap import paths  # noqa: E402

EMPTY_MAIN = "int main(void) { return 0; }\n"
BARE_START = ('void _start(void) { __asm__ volatile('
              '"mov $60, %eax\\n xor %edi, %edi\\n syscall"); }\n')


def variants(tmp):
    """{label: program path} of what could be built here."""
    main_c, start_c = os.path.join(tmp, "main.c"), os.path.join(tmp, "start.c")
    with open(main_c, "w") as f:
        f.write(EMPTY_MAIN)
    with open(start_c, "w") as f:
        f.write(BARE_START)
    recipes = {"no libc (bare _start)": ["cc", "-O2", "-static", "-nostdlib", start_c],
               "static, glibc": ["cc", "-O2", "-static", main_c],
               "dynamic, glibc": ["cc", "-O2", main_c]}
    if shutil.which("musl-gcc"):
        recipes["static, musl"] = ["musl-gcc", "-O2", "-static", main_c]
    built = {}
    for label, command in recipes.items():
        out = os.path.join(tmp, label.split()[0].strip(",") + str(len(built)))
        if subprocess.run(command + ["-o", out], stderr=subprocess.DEVNULL).returncode == 0:
            built[label] = out
    return built


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    if not os.path.isfile(paths.CLIENT):
        common.refuse(f"{paths.CLIENT} does not exist (python setup.py build_ext --inplace)")
    with common.tmpdir() as tmp:
        loop, _ = common.build(tmp)
        client = [paths.CLIENT, "--shim", "0", "/bin/true", "true"]
        programs = {**{k: [v] for k, v in variants(tmp).items()},
                    "arv-wrap-client, probe mode": client}
        env = {"PATH": os.environ["PATH"], "ARV_WRAP_PROBE": "/dev/null"}
        print(f"fork+exec+wait of an empty program, median of {args.n}")
        for label, argv in programs.items():
            seconds = common.median(common.spawn_loop(loop, args.n, argv, env))
            print(f"  {label:28} {seconds * 1e6:7.0f} us")
        run_start(loop, tmp, args.runs)


def run_start(loop, tmp, runs):
    rules = os.path.join(tmp, "w.yaml")
    with open(rules, "w") as f:
        f.write("tools:\n  - name: tiny\n")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"),
           "ARV_WRAP_STATE_DIR": os.path.join(tmp, "state")}
    env.update(common.source_path())   # a source checkout: the run imports it too
    run = [sys.executable, "-m", "arvwrap", "-w", rules, "--", "true"]
    if subprocess.run(run, env=env).returncode != 0:   # and its whitelist is validated
        common.refuse("python -m arvwrap -- true failed")
    print(f"a run's start, median of {runs}")
    for label, argv in (("python -m arvwrap -w W -- true", run),
                        ("python -c pass", [sys.executable, "-c", "pass"])):
        seconds = common.median(common.spawn_loop(loop, runs, argv, env))
        print(f"  {label:32} {seconds * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
