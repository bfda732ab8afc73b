"""Shared helpers of the benchmarks: build the C helpers, run spawn_loop, check that
what is measured is set up, find and stop arv-wrap's processes, summarise."""
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def build(tmp):
    """Compile spawn_loop and the empty preload library into tmp."""
    loop = os.path.join(tmp, "spawn_loop")
    empty = os.path.join(tmp, "libempty.so")
    subprocess.check_call(["cc", "-O2", "-o", loop, os.path.join(HERE, "spawn_loop.c")])
    subprocess.check_call(["cc", "-O2", "-shared", "-fPIC", "-o", empty,
                           os.path.join(HERE, "empty.c")])
    return loop, empty


def spawn_loop(loop, n, argv, env):
    """Per-iteration seconds of n fork+execvp+wait of argv."""
    out = subprocess.run([loop, str(n), *argv], env=env, check=True,
                         stdout=subprocess.PIPE).stdout
    return [int(line) / 1e9 for line in out.split()]


def source_path():
    """{"PYTHONPATH": ...} for the processes a benchmark starts, its entries made
    absolute (or {} without one): the dispatcher runs in /, where `PYTHONPATH=src`
    would have it import an installed copy instead of the tree under test."""
    given = os.environ.get("PYTHONPATH")
    if not given:
        return {}
    return {"PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in given.split(os.pathsep) if p)}


def median(values):
    return statistics.median(values)


def tmpdir():
    return tempfile.TemporaryDirectory(prefix="arv-wrap-bench-")


# -- is what we measure set up? --

def refuse(what):
    """No figures: one line saying what is not set up, exit 2."""
    print(f"bench: {what}", file=sys.stderr)
    sys.exit(2)


def require_setup(env, warmup=None, backend=None, timeout=60):
    """Refuse unless ld.so really maps every LD_PRELOAD library of env and, given a
    warm-up argv, one call of it under env was redirected: a new job record for it
    ended with exit 0 (on `backend` if given). A missing or unloadable library is
    only a warning from ld.so, and an unredirected call still "works", so without
    this the benchmarks would time the wrong thing and print plausible figures."""
    libraries = [e for e in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if e]
    if not libraries:
        refuse("no LD_PRELOAD in the environment to measure")
    for lib in libraries:
        if not os.path.isfile(lib):
            refuse(f"{lib} does not exist (not built in place? "
                   f"python setup.py build_ext --inplace)")
    # /proc/self/maps of a dynamic program started with env lists what ld.so loaded
    out = subprocess.run(["cat", "/proc/self/maps"], env=env, capture_output=True, text=True)
    mapped = {fields[5] for fields in (line.split(None, 5) for line in out.stdout.splitlines())
              if len(fields) == 6}
    for lib in libraries:
        if os.path.realpath(lib) not in mapped:
            said = out.stderr.strip().splitlines()
            refuse(f"ld.so did not load {lib}" + (f" ({said[0]})" if said else ""))
    if warmup is None:
        return
    before = {r["id"] for r in job_records(env)}
    try:   # a dynamic shell makes the exec, so the shim in it sees the call
        call = subprocess.run(["sh", "-c", 'exec "$@"', "sh", *warmup], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        refuse(f"the warm-up call {' '.join(warmup)} did not return within {timeout} s")
    said = call.stderr.decode(errors="replace").strip().splitlines()
    said = f": {said[-1]}" if said else ""
    if call.returncode != 0:
        refuse(f"the warm-up call {' '.join(warmup)} exited {call.returncode}{said}")
    deadline = time.monotonic() + 5   # the record may be finished just after the call returns
    while True:
        new = [r for r in job_records(env) if r["id"] not in before and r["argv"] == warmup]
        done = [r for r in new if r["state"] == "exited" and r["exit_status"] == 0]
        if done and (backend is None or done[0]["backend"] == backend):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not new:
        refuse(f"the warm-up call {' '.join(warmup)} was not redirected (no job record "
               f"for it in the state dir){said}")
    r = new[0]
    refuse(f"the warm-up call {' '.join(warmup)} was redirected but its record says "
           f"state {r['state']}, exit {r['exit_status']}, backend {r['backend']}"
           + (f", expected backend {backend}" if backend else "")
           + (f" ({r['reason']})" if r.get("reason") else ""))


def job_records(env):
    """`arv-wrap jobs --json` for env's state dir (the user-facing contract)."""
    plain = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-m", "arvwrap", "jobs", "--json"], env=plain,
                         capture_output=True)
    if out.returncode:
        said = out.stderr.decode(errors="replace").strip().splitlines()
        refuse(f"arv-wrap jobs --json exited {out.returncode}" + (f": {said[-1]}" if said else ""))
    return json.loads(out.stdout or b"[]")


# -- arv-wrap's processes --

def read(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:   # gone meanwhile, or not ours to read
        return b"" if "b" in mode else ""


def all_pids():
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def dispatcher_cpu(pids):
    """User + system seconds the dispatchers have used (/proc/PID/stat)."""
    total = 0
    for pid in pids:
        fields = read(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
        total += int(fields[11]) + int(fields[12]) if len(fields) > 12 else 0
    return total / os.sysconf("SC_CLK_TCK")


def dispatcher_pids(env):
    """Dispatchers serving env's state dir, found by their command line (not by a
    pattern that could match someone else's)."""
    from arvwrap import paths
    ours = {os.fsencode(paths.socket_path(env)), os.fsencode(paths.state_dir(env))}
    found = []
    for pid in all_pids():
        args = read(f"/proc/{pid}/cmdline", "rb").split(b"\0")
        if b"arvwrap.dispatcher" in args and ours & set(args):
            found.append(pid)
    return found


def alive(pid):
    """True while pid exists and is not a zombie."""
    stat = read(f"/proc/{pid}/stat")
    return bool(stat) and stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_dispatcher(env, grace=10.0):
    """SIGTERM the dispatchers of env's state dir (they cancel their jobs), SIGKILL
    what is left after grace seconds."""
    pids = dispatcher_pids(env)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.02)
        pids = [p for p in pids if alive(p)]
        if not pids:
            return
