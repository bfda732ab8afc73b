"""arv-wrap top: the live view driven in a real terminal (tmux, 80x24), the plain
snapshot when stdout is not a terminal, and the rendering at any width."""
import datetime
import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import pytest

from arvwrap import store, top

from conftest import need, ROOT, until as wait_for

SRC = os.path.join(ROOT, "src")
TOP = "import sys; from arvwrap import top; sys.exit(top.main(*sys.argv[1:]))"


def ago(seconds):
    stamp = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


@pytest.fixture
def busy():
    """A real process burning CPU, standing for a running local tool."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def records(state_dir, busy):
    """A state dir with an ended run and a running one: its jobs are running (a local
    one, a real process, and a Slurm one), queued, exited (one non-zero, one with a
    very long command line) and failed (with a reason)."""
    db = store.Store(state_dir)
    ids = {}

    def insert(name, **fields):
        record = {"id": store.new_id(), "kind": "job", "backend": "local", "cpus": 2,
                  "memory": 8 << 30, **fields}
        db.insert(record)
        ids[name] = record["id"]
        time.sleep(0.002)          # ids order by their millisecond
        return record["id"]

    old = insert("old", kind="run", argv=["old-pipeline.sh"], state="exited", exit_status=0,
                 started=ago(4000), ended=ago(3000), cpus=0, memory=0)
    db.update(old, run=old)
    insert("old_job", run=old, parent=old, argv=["gzip", "old.txt"], state="exited",
           exit_status=0, started=ago(3900), ended=ago(3100), backend_id="99")
    run = insert("run", kind="run", argv=["./examples/demo-pipeline.sh", "out"],
                 state="running", started=ago(200), cpus=0, memory=0)
    db.update(run, run=run)
    job = dict(run=run, parent=run)
    insert("sort", **job, argv=["/usr/bin/sort", "--parallel=2", "-S", "64M",
                                "/data/" + "very-long-directory-name/" * 6 + "input.txt"],
           state="exited", exit_status=0, created=ago(190), started=ago(189), ended=ago(100),
           backend_id="111", cpu_seconds=150.0, max_rss=300 << 20)
    insert("gzip", **job, argv=["gzip", "-n"], state="exited", exit_status=0, created=ago(190),
           started=ago(189), ended=ago(150), backend_id="112", cpu_seconds=20.0,
           max_rss=2 << 20, cpus=1)
    insert("md5sum", **job, argv=["md5sum", "--check", "MD5SUMS"], state="exited",
           exit_status=1, created=ago(90), started=ago(90), ended=ago(89), backend_id="113",
           cpu_seconds=0.5, max_rss=1 << 20)
    insert("bwa", **job, argv=["bwa", "mem", "-t", "2", "ref.fa", "r.fq"], state="failed",
           backend="slurm", created=ago(60), ended=ago(60),
           reason="backend error: sbatch: Batch job submission failed: Invalid account")
    insert("samtools", **job, argv=["samtools", "sort", "-@", "2", "x.bam"], state="running",
           backend="slurm", backend_id="4242", created=ago(30), started=ago(20))
    insert("busy", **job, argv=["python3", "-c", "while True: pass"], state="running",
           backend_id=str(busy.pid), created=ago(1), started=ago(0))
    insert("queued", **job, argv=["sort", "counts"], state="queued", created=ago(3))
    db.close()
    return ids


def database_bytes(state_dir):
    """The digests of the database and its log (what a reader must never change; an
    absent log is an empty one: SQLite may create it empty for a reader)."""
    out = {}
    for name in ("jobs.sqlite", "jobs.sqlite-wal"):
        try:
            with open(os.path.join(state_dir, name), "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            out[name] = hashlib.sha256(b"").hexdigest()
    return out


class Terminal:
    """A private tmux server with one 80x24 pane running a command."""

    def __init__(self, command, env, width=80, height=24):
        need("tmux")
        self.dir = tempfile.mkdtemp(prefix="arvtop")   # short: a socket path has a limit
        self.socket = os.path.join(self.dir, "tmux")
        conf = os.path.join(self.dir, "tmux.conf")
        with open(conf, "w") as f:
            f.write("set -g status off\nset -g remain-on-exit on\n"
                    "set -g default-terminal screen\nset -g history-limit 0\n")
        self.rc = os.path.join(self.dir, "rc")
        script = os.path.join(self.dir, "run.sh")
        with open(script, "w") as f:
            f.write("stty -g > %s/before\n%s\necho $? > %s.tmp && mv %s.tmp %s\n"
                    "stty -g > %s/after\n" % (self.dir, command, self.rc, self.rc, self.rc,
                                              self.dir))
        self.tmux("-f", conf, "new-session", "-d", "-s", "t", "-x", str(width),
                  "-y", str(height), f"bash {script}", env=env)

    def tmux(self, *args, env=None):
        return subprocess.run(["tmux", "-S", self.socket, *args], env=env, check=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=10).stdout

    def screen(self):
        """The pane's lines, wrapped lines joined (-J): a line that wrapped would
        show as longer than the pane."""
        return self.tmux("capture-pane", "-p", "-J", "-t", "t").rstrip("\n").split("\n")

    def wait_screen(self, *patterns, timeout=10):
        def shown():
            text = "\n".join(self.screen())
            return text if all(re.search(p, text) for p in patterns) else None
        try:
            return wait_for(shown, timeout=timeout, what=f"{patterns} on the screen").split("\n")
        except AssertionError:
            raise AssertionError("screen was:\n" + "\n".join(self.screen()))

    def keys(self, *keys):
        self.tmux("send-keys", "-t", "t", *keys)

    def exit_status(self, timeout=5):
        def status():
            try:
                with open(self.rc) as f:
                    return f.read().strip()
            except FileNotFoundError:
                return None
        return int(wait_for(status, timeout=timeout, what="the command to exit"))

    def alternate_screen(self):
        return self.tmux("display-message", "-p", "-t", "t", "#{alternate_on}").strip() == "1"

    def stty(self):
        def both():
            try:
                with open(f"{self.dir}/before") as b, open(f"{self.dir}/after") as a:
                    before, after = b.read(), a.read()
                    return (before, after) if after else None
            except FileNotFoundError:
                return None
        return wait_for(both, timeout=5, what="stty settings")

    def close(self):
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], stderr=subprocess.DEVNULL,
                       check=False, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def terminal(base_env):
    made = []

    def start(*args, **kwargs):
        env = dict(base_env, PYTHONPATH=SRC)
        command = " ".join([sys.executable, "-c", f"'{TOP}'", *args])
        made.append(Terminal(command, env, **kwargs))
        return made[-1]
    yield start
    for t in made:
        t.close()


def short(job_id):
    return job_id[-top.SHORT_ID:]


def test_live_view_in_80_columns_then_q(terminal, state_dir, records, busy):
    term = terminal(state_dir)
    lines = term.wait_screen(r"jobs 7: 1 queued, 2 running, 3 exited \(1 non-zero\), 1 failed",
                             short(records["busy"]) + r" .* local %d .*/2 " % busy.pid,
                             r"backend error")
    text = "\n".join(lines)
    assert len(lines) <= 24
    assert all(top.width_of(line) <= 80 for line in lines), text
    assert lines[0].startswith("arv-wrap top") and state_dir[:20] in lines[0]
    assert f"run {records['run']}  running" in text
    assert records["old"] not in text and "old-pipeline" not in text   # it ended
    # a running job: elapsed time, backend id, CPUs in use (sampled from /proc) / asked
    running = next(l for l in lines if short(records["busy"]) in l)
    assert re.search(r"\d+(\.\d+)?s +local %d +\d+(\.\d+)?/2 +\S+/8G +python3 -c" % busy.pid,
                     running), running
    slurm = next(l for l in lines if short(records["samtools"]) in l)
    assert re.search(r"\d+s +slurm 4242 +-/2 +-/8G +samtools sort", slurm), slurm
    queued = next(l for l in lines if short(records["queued"]) in l)
    assert "sort counts" in queued
    # slowest first, with what it used: 150 s of CPU over 89 s, 300M of 8G
    slowest = lines.index(next(l for l in lines if l.startswith(" SLOWEST")))
    assert short(records["sort"]) in lines[slowest + 1]
    assert re.search(r"1m29s +local 111 +1\.7/2 +300M/8G +sort --parallel=2", lines[slowest + 1])
    assert lines[slowest + 1][-1] in "…~" and len(lines[slowest + 1]) == 80  # cut, not wrapped
    assert short(records["gzip"]) in lines[slowest + 2]
    # failures, with their reason
    failed = next(l for l in lines if short(records["bwa"]) in l and "failed" in l)
    assert re.search(r"failed slurm +-/2 +-/8G +bwa mem -t 2 ref.fa r.fq", failed)
    assert lines[lines.index(failed) + 1].strip().startswith("backend error: sbatch")
    assert any(short(records["md5sum"]) in l and "exit 1" in l
               for l in lines[lines.index(failed):])

    # it redraws what changes, and never locks the store against a writer
    path = os.path.join(state_dir, "jobs.sqlite")
    writer = sqlite3.connect(path, timeout=0, isolation_level=None)   # no wait for a lock
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE jobs SET reason = ? WHERE id = ?",
                       [f"note {time.monotonic()}", records["gzip"]])
        writer.execute("COMMIT")
    writer.execute("UPDATE jobs SET state = 'exited', exit_status = 0, ended = ?, "
                   "cpu_seconds = 30, max_rss = ? WHERE id = ?",
                   [store.now(), 50 << 20, records["samtools"]])
    writer.close()
    term.wait_screen(r"jobs 7: 1 queued, 1 running, 4 exited \(1 non-zero\), 1 failed")

    term.keys("q")
    assert term.exit_status() == 0
    before, after = term.stty()
    assert before == after                   # the terminal's modes are restored
    assert not term.alternate_screen()


def test_ctrl_c_leaves_with_status_0(terminal, state_dir, records):
    term = terminal(state_dir)
    term.wait_screen(r"jobs 7:")
    term.keys("C-c")
    assert term.exit_status() == 0
    before, after = term.stty()
    assert before == after
    assert not term.alternate_screen()


def test_one_run_by_id_or_suffix_and_scrolling(terminal, state_dir, records):
    db = store.Store(state_dir)
    for n in range(30):       # more running jobs than 24 lines can show
        db.insert({"id": store.new_id(), "run": records["old"], "parent": records["old"],
                   "kind": "job", "argv": ["tool", str(n)], "state": "running",
                   "backend": "slurm", "backend_id": str(1000 + n), "cpus": 1,
                   "started": ago(30 - n)})
    db.close()
    term = terminal(state_dir, short(records["old"]), width=80, height=10)
    lines = term.wait_screen(r"run %s  exit 0" % records["old"], r"more lines")
    assert len(lines) <= 10 and all(top.width_of(l) <= 80 for l in lines)
    assert "demo-pipeline" not in "\n".join(lines)
    term.keys("End")
    lines = term.wait_screen(r"SLOWEST")
    assert short(records["old_job"]) in "\n".join(lines)
    term.tmux("resize-window", "-t", "t", "-x", "50", "-y", "12")   # SIGWINCH: redrawn to fit

    def redrawn():
        lines = term.screen()
        fits = len(lines) == 12 and all(top.width_of(line) <= 50 for line in lines)
        return fits and any(line.startswith(" SLOWEST") for line in lines)
    wait_for(redrawn, what="a redraw at 50x12")
    term.keys("q")
    assert term.exit_status() == 0


def snapshot(state_dir, *args, env=None):
    return subprocess.run([sys.executable, "-c", TOP, state_dir, *args],
                          env=dict(env or os.environ, PYTHONPATH=SRC), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=30)


def test_snapshot_when_stdout_is_not_a_terminal(state_dir, records):
    before = database_bytes(state_dir)
    proc = snapshot(state_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert "\x1b" not in out                            # plain text
    assert f"run {records['run']}  running" in out
    assert "jobs 7: 1 queued, 2 running, 3 exited (1 non-zero), 1 failed" in out
    for name in ("busy", "samtools", "queued", "sort", "bwa"):
        assert records[name] in out                     # full ids, lines not cut
    assert "/data/" + "very-long-directory-name/" * 6 + "input.txt" in out
    assert "backend error: sbatch: Batch job submission failed: Invalid account" in out
    assert records["old"] not in out
    assert database_bytes(state_dir) == before          # read, never written

    proc = snapshot(state_dir, records["old"])
    assert proc.returncode == 0 and f"run {records['old']}  exit 0" in proc.stdout
    assert "jobs 1: 1 exited" in proc.stdout and records["run"] not in proc.stdout
    proc = snapshot(state_dir, records["old_job"])      # a job names its run
    assert f"run {records['old']}" in proc.stdout
    proc = snapshot(state_dir, "NOSUCHRUN")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("arv-wrap: no run or job NOSUCHRUN in ")


def test_no_records_say_so_in_one_line(tmp_path):
    missing = str(tmp_path / "nothing-here")
    proc = snapshot(missing)
    assert proc.returncode == 0
    assert proc.stdout.splitlines()[1:] == [f"no records in {missing}"]
    assert not os.path.exists(missing)                  # nothing created
    empty = str(tmp_path / "empty")
    store.Store(empty).close()
    proc = snapshot(empty)
    assert proc.returncode == 0 and proc.stdout.splitlines()[1:] == [f"no records in {empty}"]


def test_no_running_run_names_the_latest(state_dir):
    db = store.Store(state_dir)
    run = store.new_id()
    db.insert({"id": run, "run": run, "kind": "run", "argv": ["x"], "state": "exited",
               "exit_status": 0, "started": ago(70), "ended": ago(65)})
    db.insert({"id": store.new_id(), "run": run, "parent": run, "kind": "job",
               "argv": ["gzip", "x"], "state": "exited", "exit_status": 0,
               "started": ago(69), "ended": ago(67), "backend": "local", "backend_id": "5"})
    db.close()
    lines = snapshot(state_dir).stdout.splitlines()
    assert re.fullmatch(r"no running pipelines; the latest run, ended 1m0[5-9]s ago:", lines[1])
    assert lines[2].startswith(f"run {run}  exit 0 5.0s  x")
    assert lines[3] == " jobs 1: 1 exited"


def test_render_never_exceeds_the_width():
    now = time.time()
    run = {"id": store.new_id(), "kind": "run", "state": "running", "started": ago(5),
           "argv": ["pipe\nline", "日本語のパイプライン" * 5]}
    jobs = [{"id": store.new_id(), "run": run["id"], "kind": "job", "state": state,
             "argv": ["\udcff\udcfe-tool", "line\nbreak", "\x1b[31mred", "幅" * 40],
             "backend": "slurm", "backend_id": "123456789012345", "cpus": 0.25,
             "memory": 1536 << 20, "created": ago(9), "started": ago(8),
             "ended": ago(1) if state != "running" else None, "exit_status": 3,
             "signal": 9, "reason": "why\nnot " * 20}
            for state in ("running", "queued", "exited", "signaled", "failed", "cancelled")]
    view = top.View("/state", [run], jobs, now=now)
    for width in (80, 60, 40, 20):
        lines = top.render(view, width=width)
        assert all(top.width_of(text) <= width for text, _ in lines), (width, lines)
        assert all("\n" not in text and "\x1b" not in text for text, _ in lines)
    text = "\n".join(t for t, _ in top.render(view, width=None))
    assert "\\xff\\xfe-tool" in text and "\\x1b[31mred" in text and "SIGKILL" in text


def test_formats():
    assert [top.duration(s) for s in (0.04, 1.25, 42, 192, 3720, 2 * 86400 + 3 * 3600)] == [
        "0.04s", "1.2s", "42s", "3m12s", "1h02m", "2d03h"]
    assert [top.size(n) for n in (512, 300 << 20, 8 << 30, 1536 << 20, 1023 << 20, None)] == [
        "512B", "300M", "8G", "1.5G", "1G", "-"]
    assert [top.number(x) for x in (2, 0.25, 0.5, 0.003, 0, 1.94, 12.4, None)] == [
        "2", "0.25", "0.5", "0", "0", "1.9", "12", "-"]
    assert top.clip("abcdef", 4, "~") == "abc~" and top.clip("ab", 4) == "ab"
    assert top.width_of(top.clip("日本語日本語", 5, "~")) <= 5


def test_sampler_counts_a_tree_and_refuses_a_reused_pid():
    # the job's process only waits; its child (a grandchild here) burns CPU
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run("
                               "[sys.executable, '-c', 'while True: pass'])"],
                              start_new_session=True)
    try:
        sampler = top.ProcSampler()
        record = {"id": "J1", "state": "running", "backend": "local", "host": sampler.host,
                  "backend_id": str(os.getpid()), "created": ago(0.5), "started": ago(0)}
        # this test process began long before that record: a reused pid, not the job
        assert sampler.sample([record]) == {}
        record["backend_id"] = str(parent.pid)

        def burnt():
            """CPU seconds of the parent alone and of its whole tree, as the sampler sees them."""
            table = sampler._processes()
            return table[parent.pid][1], sum(cpu for ppid, cpu, _, _ in table.values()
                                              if ppid == parent.pid) + table[parent.pid][1]
        wait_for(lambda: burnt()[1] - burnt()[0] > 0.2, what="the child to burn CPU")
        cores, rss = sampler.sample([record])["J1"]       # first look: average since start
        assert cores > 0 and rss > 2 << 20                # two Pythons' memory
        wall, tree = time.monotonic(), burnt()[1]
        wait_for(lambda: burnt()[1] - tree > 0.1, what="more CPU burnt")
        cores, rss = sampler.sample([record])["J1"]       # since the previous sample
        assert 0 < cores <= os.cpu_count() + 0.5
        assert cores * (time.monotonic() - wall) >= 0.05  # the child's time is counted
        assert sampler.sample([dict(record, host="elsewhere")]) == {}
    finally:
        os.killpg(parent.pid, signal.SIGKILL)   # the group it leads: it and its child
        parent.wait()
