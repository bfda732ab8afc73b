"""arv-wrap at scale on the local backend.

1. Calls in flight (--sizes): a shell starts N `napper SLEEP &` at once, then waits
   for each and counts the failures; the same N calls also run unwrapped (rounds
   alternate). napper is a #! script, whitelisted by name, that appends a byte to
   a runs file and execs sleep, so a call that ran twice or not at all shows.
   Each N has its own state dir and a dispatcher, warmed by the setup check, with
   ARV_WRAP_LOCAL_CPUS above N so all calls are admitted at once. Once all N tools
   run, arv-wrap's own memory is sampled: the PSS of the dispatcher(s) and of every
   waiting arv-wrap-client (found by /proc/PID/exe, since a client may fork the
   tool, whose memory is not arv-wrap's), divided by N. The dispatcher's threads
   and descriptors are polled during the run and the peak kept.
2. Tiny jobs: make -j16 of --make-jobs targets, each running `tiny` (a copy of
   /bin/true, whitelisted with cpus 0.1 so that 16 fit a 2-CPU budget), wrapped
   (`python -m arvwrap -w RULES -- make ...`) and unwrapped; the same through
   `xargs -P16`. A wrapped run counts only if it made one job record per call.
   The state dir's database and -wal sizes after all the wrapped runs are printed
   (the -wal must stay bounded however many calls were recorded).
3. A stream that never pauses (--sustained JOBS): one wrapped make -j16 of JOBS tiny
   jobs, the -wal's size sampled twice a second.

Nothing is timed unless the shim loads and a warm-up call is recorded as a local
job (bench: ... and exit 2). Medians and ratios only, with the issue's targets
beside them; nothing is asserted. Every process the benchmark starts carries a
tag in its environment, and whatever still carries it is killed on every way out.

    python bench/bench_scale.py [--sizes 10,100,1000] [--sleep 2] [--make-jobs 1000]
                                [--rounds 3] [--sustained 20000]
"""
import argparse
import os
import resource
import shutil
import select
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from arvwrap import activation, store, whitelist  # noqa: E402

# Not ARV_WRAP_*: jobs keep it (arv-wrap strips its own variables), so the tools
# are found by it too.
TAG = "ARVWRAP_BENCH_TAG"
TAG_VALUE = store.new_id()

# N background calls, then one wait per call so each failure is counted.
IN_FLIGHT = ('pids=; for i in $(seq "$1"); do napper "$2" & pids="$pids $!"; done; '
             'failed=0; for p in $pids; do wait "$p" || failed=$((failed+1)); done; '
             'echo "$failed"')


def setup_tools(tmp):
    """bin/napper, bin/tiny and the rules that whitelist them."""
    bin_dir = os.path.join(tmp, "bin")
    os.makedirs(bin_dir)
    napper = os.path.join(bin_dir, "napper")
    with open(napper, "w") as f:
        f.write('#!/bin/sh\nprintf x >> "$BENCH_RUNS"\nexec sleep "$@"\n')
    os.chmod(napper, 0o755)
    shutil.copy("/bin/true", os.path.join(bin_dir, "tiny"))
    rules = {}
    for name, text in (("napper", "tools:\n  - name: napper\n    cpus: 1\n"),
                       ("tiny", "tools:\n  - name: tiny\n    cpus: 0.1\n")):
        rules[name] = os.path.join(tmp, f"{name}.yaml")
        with open(rules[name], "w") as f:
            f.write(text)
    return bin_dir, rules


def base_env(tmp, bin_dir, name, extra=()):
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/"),
           "ARV_WRAP_STATE_DIR": os.path.join(tmp, f"state-{name}"),
           "ARV_WRAP_IDLE_TIMEOUT": "120", TAG: TAG_VALUE, **dict(extra)}
    env.update(common.source_path())   # a source checkout: the dispatcher imports it too
    return env


def activated(env, rules_file):
    rules = whitelist.load([rules_file])
    return {**env, **activation.activation_env([rules_file], rules, {"backend": "local"}, "bench", env)}


# -- processes --

def tagged():
    me = os.getpid()
    mark = f"{TAG}={TAG_VALUE}".encode()
    return [p for p in common.all_pids()
            if p != me and mark in common.read(f"/proc/{p}/environ", "rb").split(b"\0")]


def kill_tagged():
    """SIGKILL whatever this benchmark started that is still there; say if some stays."""
    deadline = time.monotonic() + 10
    while True:
        left = [p for p in tagged() if common.alive(p)]
        if not left:
            return
        if time.monotonic() > deadline:
            print(f"bench: {len(left)} processes of this benchmark would not die: {left[:10]}",
                  file=sys.stderr)
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def run_group(argv, env, timeout, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
    """Run argv in a process group of its own, killed whole after timeout seconds.
    (seconds, exit status or None if it timed out)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=stderr, start_new_session=True)
    try:
        # a pidfd wakes us the moment it ends: Popen.wait(timeout) polls, sleeping up
        # to 50 ms at a time, which rounded every figure up to the next 50 ms
        pidfd = os.pidfd_open(proc.pid)
        try:
            waiter = select.poll()
            waiter.register(pidfd, select.POLLIN)
            ended = waiter.poll(timeout * 1000)
        finally:
            os.close(pidfd)
        seconds = time.monotonic() - start
        return seconds, proc.wait() if ended else None
    finally:
        kill_group(proc)


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def status_field(pid, name):
    for line in common.read(f"/proc/{pid}/status").splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def pss_kib(pid):
    for line in common.read(f"/proc/{pid}/smaps_rollup").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def zombies_under(parents):
    found = 0
    for pid in common.all_pids():
        fields = common.read(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[0] == "Z" and int(fields[1]) in parents:
            found += 1
    return found


def waiting_clients(shell_pid, client_exe):
    """The shell's children still running arv-wrap-client: the calls waiting."""
    found = []
    for pid in common.read(f"/proc/{shell_pid}/task/{shell_pid}/children").split():
        try:
            if os.readlink(f"/proc/{pid}/exe") == client_exe:
                found.append(pid)
        except OSError:
            pass
    return found


def dispatcher_errors(state_dir, offset):
    """(new offset, ERROR lines in dispatcher.log past offset, the first one with the
    exception that ended its traceback)."""
    text = common.read(os.path.join(state_dir, "dispatcher.log"))
    lines = text[offset:].splitlines()
    errors = [i for i, line in enumerate(lines) if " ERROR " in line]
    first = ""
    if errors:
        i = errors[0]
        tail = next((line for line in lines[i + 1:] if line and not line[0].isspace()
                     and not line.startswith("Traceback")), "")
        first = lines[i].split(" ERROR ", 1)[1]
        if tail and not tail[0].isdigit():   # not the next log line
            first += f" ({tail})"
    return len(text), len(errors), first


# -- 1. calls in flight --

def calls(env, n, sleep, out_dir, watch):
    """N concurrent `napper sleep`; with watch (the activated env), sample arv-wrap."""
    runs = os.path.join(out_dir, f"runs-{time.monotonic_ns()}")
    open(runs, "w").close()
    result = {"threads": 0, "fds": 0, "memory": None, "clients": 0, "zombies": 0,
              "timed_out": False, "said": []}
    if watch:
        client_exe = os.path.realpath(os.path.join(os.path.dirname(watch["ARV_WRAP_SHIM"]),
                                                   "arv-wrap-client"))
        dispatchers = common.dispatcher_pids(watch)
        if not dispatchers:
            result["said"].append("no dispatcher was running when the round started")
        log_offset = dispatcher_errors(watch["ARV_WRAP_STATE_DIR"], 0)[0]
    with open(runs + ".out", "w+") as out, open(runs + ".err", "w+") as err:
        start = time.monotonic()
        proc = subprocess.Popen(["bash", "-c", IN_FLIGHT, "bash", str(n), str(sleep)],
                                env={**env, "BENCH_RUNS": runs}, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)
        timeout = 3 * sleep + 60 + n * 0.05
        ended = select.poll()          # samples every 50 ms, yet the end is seen at once
        ended.register(pidfd := os.pidfd_open(proc.pid), select.POLLIN)
        try:
            while proc.poll() is None and not result["timed_out"]:
                result["timed_out"] = time.monotonic() - start > timeout
                if ended.poll(50):
                    continue
                if not watch:
                    continue
                for pid in dispatchers:
                    result["threads"] = max(result["threads"], status_field(pid, "Threads"))
                    result["fds"] = max(result["fds"], fd_count(pid))
                # PSS when the most calls wait: each time their number grows by a
                # tenth, and when it reaches n
                clients = waiting_clients(proc.pid, client_exe)
                if len(clients) > result["clients"] and (
                        len(clients) == n or len(clients) >= 1.1 * result["clients"]):
                    result["clients"] = len(clients)
                    result["memory"] = sum(pss_kib(p) for p in [*clients, *dispatchers])
        finally:
            result["wall"] = time.monotonic() - start
            os.close(pidfd)
            kill_group(proc)
        out.seek(0)
        err.seek(0)
        words = out.read().split()
        result["failed"] = int(words[-1]) if words and not result["timed_out"] else None
        said = [line for line in err.read().splitlines() if line.startswith("arv-wrap")]
    result["runs"] = os.path.getsize(runs)
    if said:
        result["said"].append(f"{len(said)} arv-wrap lines on stderr, first: {said[0]}")
    if watch:
        result["zombies"] = zombies_under(set(dispatchers))
        _, count, first = dispatcher_errors(watch["ARV_WRAP_STATE_DIR"], log_offset)
        if count:
            result["said"].append(f"{count} errors in dispatcher.log, first: {first}")
    return result


def problems(label, n, r):
    """One line per thing that went wrong in a round, else nothing."""
    if not (r["failed"] or r["runs"] != n or r["timed_out"] or r["zombies"] or r["said"]):
        return []
    what = [f"killed after {r['wall']:.0f} s" if r["timed_out"]
            else f"{r['failed']} of {n} calls failed", f"{r['runs']} runs for {n} calls"]
    if r["zombies"]:
        what.append(f"{r['zombies']} zombies under the dispatcher after the round")
    return [f"  ! {label}: " + "; ".join(what)] + [f"    {line}" for line in r["said"]]


def in_flight(tmp, bin_dir, rules, n, args):
    env = base_env(tmp, bin_dir, f"scale-{n}", {"ARV_WRAP_LOCAL_CPUS": str(n + 16)})
    wrapped = activated(env, rules)
    plain, results = [], []
    try:
        common.require_setup({**wrapped, "BENCH_RUNS": os.path.join(tmp, "warm-runs")},
                             warmup=["napper", "0"], backend="local")
        for _ in range(args.rounds):
            plain.append(calls(env, n, args.sleep, tmp, None))
            results.append(calls(wrapped, n, args.sleep, tmp, wrapped))
            if results[-1]["timed_out"]:
                break
    finally:
        common.stop_dispatcher(wrapped)
        kill_tagged()
    return plain, results


def report_in_flight(n, plain, wrapped):
    p = common.median([r["wall"] for r in plain])
    w = common.median([r["wall"] for r in wrapped])
    memory = [r["memory"] / n / 1024 for r in wrapped if r["memory"] is not None]
    pss = f"{common.median(memory):6.2f} MiB" if memory else "     n/a  "
    clients = min(r["clients"] for r in wrapped)
    print(f"  {n:5d}   {p:7.2f} s   {w:7.2f} s   x{w / p:5.2f}   {pss} "
          f"({clients:4d} waiting)   {max(r['threads'] for r in wrapped):5d}   "
          f"{max(r['fds'] for r in wrapped):5d}")
    for i, r in enumerate(plain):
        for line in problems(f"{n} in flight, unwrapped, round {i + 1}", n, r):
            print(line)
    for i, r in enumerate(wrapped):
        for line in problems(f"{n} in flight, round {i + 1}", n, r):
            print(line)


# -- 2. tiny jobs --

def tiny_jobs(tmp, bin_dir, rules, args):
    """(commands, {(command, wrapped?): [seconds of the good runs]}, problem lines,
    {command: [the dispatcher's CPU seconds in each good wrapped run]})."""
    env = base_env(tmp, bin_dir, "tiny")
    jobs = args.make_jobs
    makefile = tiny_makefile(os.path.join(tmp, "Makefile"), jobs)
    arguments = os.path.join(tmp, "xargs-input")
    with open(arguments, "w") as f:
        f.write("".join(f"{i}\n" for i in range(jobs)))
    commands = {"make -j16": ["make", "-s", "-j16", "-f", makefile],
                "xargs -P16": ["xargs", "-P16", "-n1", "-a", arguments, "tiny"]}
    wrap = [sys.executable, "-m", "arvwrap", "-w", rules, "--"]
    times, notes, cpu = {}, [], {}
    activated_env = activated(env, rules)
    try:   # the warm-up starts the dispatcher that the wrapped runs then find
        common.require_setup(activated_env, warmup=["tiny"], backend="local")
        dispatchers = common.dispatcher_pids(activated_env)
        for i in range(args.rounds):
            for name, argv in commands.items():
                for wrapped in (False, True):
                    used = common.dispatcher_cpu(dispatchers)
                    seconds, wrong = tiny_run(wrap + argv if wrapped else argv, env,
                                              wrapped, jobs, tmp)
                    if wrong:
                        notes.append(f"  ! {name}{', wrapped' if wrapped else ''}, "
                                     f"round {i + 1}: " + "\n    ".join(wrong))
                        continue
                    times.setdefault((name, wrapped), []).append(seconds)
                    if wrapped:
                        cpu.setdefault(name, []).append(common.dispatcher_cpu(dispatchers) - used)
        notes.append(state_dir_size(env["ARV_WRAP_STATE_DIR"],
                                    jobs * sum(len(times.get((n, True), ())) for n in commands)))
    finally:
        common.stop_dispatcher(activated_env)
        kill_tagged()
    return commands, times, notes, cpu


def tiny_makefile(path, jobs):
    targets = " ".join(f"t{i}" for i in range(jobs))
    with open(path, "w") as f:   # no shell syntax: make spawns tiny itself
        f.write(f".PHONY: all {targets}\nall: {targets}\n{targets}:\n\t@tiny\n")
    return path


def state_dir_size(state, calls):
    """A line: the database and its -wal after the runs (the -wal must not grow with
    the number of calls)."""
    mib = lambda name: os.path.getsize(os.path.join(state, name)) / (1 << 20)
    return (f"  state dir after {calls} wrapped calls: jobs.sqlite {mib('jobs.sqlite'):.0f} MiB, "
            f"its -wal {mib('jobs.sqlite-wal'):.0f} MiB")


def tiny_run(argv, env, wrapped, jobs, tmp):
    """(seconds, what went wrong): a wrapped run must leave one good record per call."""
    state = env["ARV_WRAP_STATE_DIR"]
    before = {r["id"] for r in common.job_records(env)} if wrapped else set()
    log_offset = dispatcher_errors(state, 0)[0]
    with open(os.path.join(tmp, "tiny.err"), "w+") as err:
        seconds, status = run_group(argv, env, 60 + jobs * 0.2, stderr=err)
        err.seek(0)
        said = err.read().strip().splitlines()[:1]
    what = []
    if status is None:
        what.append(f"killed after {seconds:.0f} s")
    elif status:
        what.append(f"exit {status}")
    if wrapped:
        new = [r for r in common.job_records(env)
               if r["id"] not in before and r["argv"][:1] == ["tiny"]]
        good = sum(r["state"] == "exited" and r["exit_status"] == 0 for r in new)
        if good != jobs or len(new) != jobs:
            what.append(f"{len(new)} of {jobs} calls redirected, {len(new) - good} of those failed")
    if not what:
        return seconds, []
    _, count, first = dispatcher_errors(state, log_offset)
    errors = [f"{count} errors in dispatcher.log, first: {first}"] if count else []
    return seconds, ["; ".join(what), *errors, *said]


def report_tiny_jobs(commands, times, notes, cpu, jobs, rounds):
    print(f"\n{jobs} tiny jobs (`tiny` = a copy of /bin/true, cpus 0.1), median of the "
          f"good runs of {rounds} rounds; wrapped includes starting `python -m arvwrap`")
    for name in commands:
        rates = {w: jobs / common.median(times[(name, w)])
                 for w in (False, True) if times.get((name, w))}
        plain = f"{rates[False]:7.0f} jobs/s" if False in rates else "      n/a     "
        line = f"  {name:11} unwrapped {plain}"
        if True in rates:
            line += f"   wrapped {rates[True]:7.0f} jobs/s"
            if False in rates:
                line += f"   x{rates[True] / rates[False]:.2f} of unwrapped"
        else:
            line += "   wrapped      n/a"
        if name.startswith("make"):
            line += "   (target: >= 400 jobs/s and >= x0.5)"
        print(line)
        if cpu.get(name):
            print(f"  {'':11} dispatcher CPU per wrapped call: "
                  f"{common.median(cpu[name]) / jobs * 1e6:.0f} us")
    for note in notes:
        print(note)


# -- 3. a stream of calls that never pauses --

def sustained(tmp, bin_dir, rules, jobs):
    """One wrapped make -j16 of jobs tiny jobs: (seconds, problems, the largest -wal
    seen in MiB, the state dir's sizes after). Between the short runs above the
    dispatcher idles and its -wal starts over; here it must do so under load."""
    env = base_env(tmp, bin_dir, "sustained")
    makefile = tiny_makefile(os.path.join(tmp, "sustained.mk"), jobs)
    wal = os.path.join(env["ARV_WRAP_STATE_DIR"], "jobs.sqlite-wal")
    largest, done = [0], threading.Event()

    def watch():
        while not done.wait(0.5):
            try:
                largest[0] = max(largest[0], os.path.getsize(wal) / (1 << 20))
            except OSError:       # no -wal yet, or none left by the last connection
                pass
    try:
        common.require_setup(activated(env, rules), warmup=["tiny"], backend="local")
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        seconds, wrong = tiny_run([sys.executable, "-m", "arvwrap", "-w", rules, "--", "make",
                                   "-s", "-j16", "-f", makefile], env, True, jobs, tmp)
        done.set()
        watcher.join()
        return seconds, wrong, largest[0], state_dir_size(env["ARV_WRAP_STATE_DIR"], jobs)
    finally:
        done.set()
        common.stop_dispatcher(activated(env, rules))
        kill_tagged()


def report_sustained(jobs, seconds, wrong, largest, sizes):
    print(f"\none wrapped make -j16 of {jobs} tiny jobs:", end=" ")
    if wrong:                 # no figures for a run that did not do what it should
        print("\n".join(["", *(f"  ! {line}" for line in wrong)]))
        return
    print(f"{jobs / seconds:.0f} jobs/s; the -wal at most {largest:.0f} MiB "
          f"(it must not grow with the calls)")
    print(sizes)


def preflight(tmp, bin_dir, rules):
    env = activated(base_env(tmp, bin_dir, "preflight"), rules)
    try:
        common.require_setup(env, warmup=["tiny"], backend="local")
    finally:
        common.stop_dispatcher(env)


def load():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--sleep", type=float, default=2)
    parser.add_argument("--make-jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sustained", type=int, default=0, metavar="JOBS",
                        help="then one wrapped make of JOBS tiny jobs, watching the -wal")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    # 1000 clients hold a socket each, and the dispatcher inherits this limit from
    # the client that starts it
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def stop(signum, _frame):   # run the finally blocks, which kill what we started
        raise SystemExit(128 + signum)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stop)

    start_load = load()
    try:
        with common.tmpdir() as tmp:
            bin_dir, rules = setup_tools(tmp)
            preflight(tmp, bin_dir, rules["tiny"])   # refuse before printing anything
            print("command: python " + " ".join(sys.argv))
            print(f"load at start: {start_load} (1, 5, 15 min; {os.cpu_count()} CPUs)")
            print(f"\nN concurrent calls of `napper {args.sleep:g}` (sh script: append, exec "
                  f"sleep), median of {args.rounds} rounds; arv-wrap PSS per waiting call "
                  f"(target at 1000: <= 1 MiB), dispatcher peak threads and fds")
            print("      N   unwrapped     wrapped    ratio   PSS/call (clients at sample)"
                  "   thr     fds")
            for n in sizes:
                report_in_flight(n, *in_flight(tmp, bin_dir, rules["napper"], n, args))
            if args.make_jobs:
                report_tiny_jobs(*tiny_jobs(tmp, bin_dir, rules["tiny"], args),
                                 args.make_jobs, args.rounds)
            if args.sustained:
                report_sustained(args.sustained,
                                 *sustained(tmp, bin_dir, rules["tiny"], args.sustained))
            print("\ntarget: a warm redirected call adds <= 2 ms (bench/bench_latency.py)")
            print(f"load at end: {load()}")
    finally:
        kill_tagged()


if __name__ == "__main__":
    main()
