import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time

import pytest

from arvwrap import store
from conftest import until


def test_records_round_trip_newest_first(tmp_path):
    db = store.Store(str(tmp_path / "s"))
    first = store.new_id()
    db.insert({"id": first, "run": first, "kind": "run", "argv": [b"a", b"b c"], "state": "running"})
    time.sleep(0.002)   # ids order by their millisecond
    second = store.new_id()
    db.insert({"id": second, "run": first, "parent": first, "kind": "job",
               "argv": [b"sort", b"\xff\xfe", b""], "cwd": b"/tmp", "state": "queued"})
    db.update(second, state="exited", exit_status=3, ended=store.now())
    records = db.list()
    assert [r["id"] for r in records] == [second, first]
    job = records[0]
    assert job["argv"] == ["sort", "\udcff\udcfe", ""]   # surrogateescape, as Python names bytes
    assert os.fsencode(job["argv"][1]) == b"\xff\xfe"
    assert (job["state"], job["exit_status"], job["parent"]) == ("exited", 3, first)
    assert db.list(run="nope") == []
    assert len(db.list(run=first)) == 2


def test_an_undecodable_cwd_and_reason_are_kept_and_read_back_as_surrogateescape(tmp_path):
    db = store.Store(str(tmp_path / "s"))
    db.insert({"id": "A", "argv": [], "cwd": b"/data/\xff\xfe", "state": "queued"})
    db.update("A", reason=os.fsdecode(b"no such file: /data/\xff"), cwd=b"/data/\xff\xfe")
    record = db.get("A")
    assert os.fsencode(record["cwd"]) == b"/data/\xff\xfe"
    assert os.fsencode(record["reason"]) == b"no such file: /data/\xff"
    db.insert({"id": "B", "argv": [], "cwd": "/plain", "state": "queued"})
    conn = sqlite3.connect(db.path)
    assert conn.execute("SELECT typeof(cwd) FROM jobs WHERE id = 'B'").fetchone() == ("text",)


def test_ids_are_unique_and_sortable():
    ids = [store.new_id() for _ in range(2000)]
    assert len(set(ids)) == 2000 and all(len(i) == 26 for i in ids)
    assert ids[0][:10] <= ids[-1][:10]


def test_state_dir_and_database_are_private(tmp_path):
    db = store.Store(str(tmp_path / "s"))
    db.insert({"id": store.new_id(), "argv": [], "state": "queued"})
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700
    for name in os.listdir(tmp_path / "s"):
        assert stat.S_IMODE(os.stat(tmp_path / "s" / name).st_mode) & 0o077 == 0, name


WRITER = """
import sys
from arvwrap import store
db = store.Store(sys.argv[1])
i = 0
while True:
    job = store.new_id()
    db.insert({"id": job, "argv": [b"x"] * 50, "state": "queued"})
    db.update(job, state="exited", exit_status=i % 256)
    i += 1
    if i == 50:
        print("writing", flush=True)
"""


def test_a_killed_writer_leaves_a_readable_store(tmp_path):
    state = str(tmp_path / "s")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, state], stdout=subprocess.PIPE)
    assert writer.stdout.readline() == b"writing\n"
    time.sleep(0.3)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    conn = sqlite3.connect(os.path.join(state, "jobs.sqlite"))
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    records = store.Store(state).list()
    assert len(records) > 50
    assert all(r["state"] in ("queued", "exited") for r in records)


def test_a_removed_state_dir_is_recreated_by_a_long_lived_writer(tmp_path):
    import shutil
    state = str(tmp_path / "s")
    db = store.Store(state)
    db.insert({"id": store.new_id(), "argv": [], "state": "queued"})
    shutil.rmtree(state)
    job = store.new_id()
    db.insert({"id": job, "argv": [], "state": "queued"})
    assert [r["id"] for r in store.Store(state).list()] == [job]


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    # the dispatcher and `arv-wrap jobs` may create the same database together
    opener = ("import sys; from arvwrap import store; s = store.Store(sys.argv[1]); "
              "s.insert({'id': store.new_id(), 'kind': 'job', 'state': 'queued'}); "
              "print(len(s.list()) > 0)")
    for attempt in range(20):
        state = str(tmp_path / f"s{attempt}")
        procs = [subprocess.Popen([sys.executable, "-c", opener, state], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(8)]
        results = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err for _, err in results if err]
        assert len(store.Store(state).list()) == 8


# -- schema versions and migrations -----------------------------------------------

# The table exactly as HEAD before versioning created it (user_version 0).
HEAD_SCHEMA = """CREATE TABLE jobs (id TEXT PRIMARY KEY, run TEXT, parent TEXT, kind TEXT,
    argv TEXT, cwd TEXT, backend TEXT, backend_id TEXT, state TEXT, exit_status INTEGER,
    signal INTEGER, created TEXT, started TEXT, ended TEXT, cpus REAL, memory INTEGER,
    time_limit INTEGER, reason TEXT, rule TEXT, host TEXT, dispatcher INTEGER,
    queued_seconds REAL, cpu_seconds REAL, max_rss INTEGER)"""
# The first release's table, before it grew columns by ALTER TABLE ADD COLUMN.
FIRST_SCHEMA = """CREATE TABLE jobs (id TEXT PRIMARY KEY, run TEXT, parent TEXT, kind TEXT,
    argv TEXT, cwd TEXT, backend TEXT, backend_id TEXT, state TEXT, exit_status INTEGER,
    signal INTEGER, created TEXT, started TEXT, ended TEXT, cpus REAL, memory INTEGER,
    time_limit INTEGER, reason TEXT, rule TEXT, host TEXT)"""
NEW_COLUMNS = [name for name in store.COLUMNS if name not in (
    "id run parent kind argv cwd backend backend_id state exit_status signal created started "
    "ended cpus memory time_limit reason rule host dispatcher queued_seconds cpu_seconds "
    "max_rss").split()]


def old_database(state, schema=HEAD_SCHEMA, alter=(), records=3, user_version=0):
    """A state dir as an earlier release left it: WAL, its table, its records."""
    os.makedirs(state, mode=0o700)
    conn = sqlite3.connect(os.path.join(state, "jobs.sqlite"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(schema)
    for column in alter:
        conn.execute(f"ALTER TABLE jobs ADD COLUMN {column}")
    conn.execute("CREATE INDEX IF NOT EXISTS jobs_run ON jobs(run)")
    if user_version:
        conn.execute(f"PRAGMA user_version={user_version}")
    ids = [f"OLD{n:04d}" for n in range(records)]
    for n, job in enumerate(ids):
        conn.execute("INSERT INTO jobs (id, run, parent, kind, argv, cwd, state, exit_status, "
                     "ended) VALUES (?, 'OLD0000', 'OLD0000', ?, ?, '/old', 'exited', ?, ?)",
                     [job, "run" if n == 0 else "job", json.dumps(["tool", str(n)]), n,
                      "2020-01-01T00:00:00.000Z"])
    conn.close()
    return ids


def columns_of(state):
    conn = sqlite3.connect(os.path.join(state, "jobs.sqlite"))
    try:
        return ([row[1] for row in conn.execute("PRAGMA table_info(jobs)")],
                conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_a_new_database_is_at_the_current_version_in_wal_with_incremental_vacuum(tmp_path):
    db = store.Store(str(tmp_path / "s"))
    assert db.schema_version == store.SCHEMA_VERSION >= 2
    names, version = columns_of(str(tmp_path / "s"))
    assert names == list(store.COLUMNS) and version == store.SCHEMA_VERSION
    conn = sqlite3.connect(db.path)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)   # incremental


def test_a_state_dir_of_heads_unversioned_schema_keeps_its_records_with_new_columns_null(tmp_path):
    state = str(tmp_path / "s")
    ids = old_database(state)
    assert columns_of(state)[1] == 0 and NEW_COLUMNS == ["reused_from", "shell_pid", "shell_start"]
    db = store.Store(state)
    names, version = columns_of(state)
    assert version == store.SCHEMA_VERSION and set(names) == set(store.COLUMNS)
    records = db.list()
    assert [r["id"] for r in records] == ids[::-1]
    for n, record in enumerate(reversed(records)):
        assert (record["argv"], record["cwd"], record["exit_status"]) == (["tool", str(n)], "/old", n)
        assert all(record[name] is None for name in NEW_COLUMNS)
    # and the old records take the new columns, new records too
    db.update(ids[1], reused_from=ids[2])
    db.insert({"id": "NEW", "argv": [b"x"], "state": "queued", "reused_from": ids[1]})
    assert db.get(ids[1])["reused_from"] == ids[2] and db.get("NEW")["reused_from"] == ids[1]


def test_a_first_release_database_that_alter_table_grew_part_way_is_completed(tmp_path):
    # HEAD added its four columns one ALTER TABLE at a time, outside a transaction:
    # a database may hold any of them
    state = str(tmp_path / "s")
    ids = old_database(state, FIRST_SCHEMA, alter=["dispatcher INTEGER", "queued_seconds REAL"])
    db = store.Store(state)
    names, version = columns_of(state)
    assert version == store.SCHEMA_VERSION and sorted(names) == sorted(store.COLUMNS)
    record = db.get(ids[2])
    assert record["exit_status"] == 2 and record["argv"] == ["tool", "2"]
    assert all(record[name] is None for name in
               ["dispatcher", "queued_seconds", "cpu_seconds", "max_rss", *NEW_COLUMNS])
    db.update(ids[2], cpu_seconds=1.5, max_rss=1 << 20)
    assert (db.get(ids[2])["cpu_seconds"], db.get(ids[2])["max_rss"]) == (1.5, 1 << 20)


@pytest.mark.parametrize("alter", [
    [], ["dispatcher INTEGER", "queued_seconds REAL", "cpu_seconds REAL", "max_rss INTEGER"]],
    ids=["first-release", "grown-by-alter-table"])
def test_a_first_release_database_as_it_was_or_grown_by_alter_table_is_migrated(tmp_path, alter):
    state = str(tmp_path / "s")
    ids = old_database(state, FIRST_SCHEMA, alter=alter)
    db = store.Store(state)
    assert sorted(columns_of(state)[0]) == sorted(store.COLUMNS)
    assert [r["id"] for r in db.list(run="OLD0000")] == ids[::-1]
    assert all(r[name] is None for r in db.list() for name in NEW_COLUMNS)


def test_a_migration_that_fails_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    state = str(tmp_path / "s")
    ids = old_database(state)
    broken = store.VERSIONS + (({"extra": "TEXT"}, ("CREATE INDEX broken ON nosuch(x)",)),)
    monkeypatch.setattr(store, "VERSIONS", broken)
    monkeypatch.setattr(store, "SCHEMA_VERSION", len(broken))
    monkeypatch.setattr(store, "COLUMNS", {**store.COLUMNS, "extra": "TEXT"})
    try:
        store.Store(state)
        raise AssertionError("the broken migration was not refused")
    except sqlite3.OperationalError as e:
        assert "nosuch" in str(e)
    names, version = columns_of(state)   # not half-migrated: none of versions 1..3 applied
    assert version == 0 and "reused_from" not in names and "extra" not in names
    monkeypatch.undo()
    assert [r["id"] for r in store.Store(state).list()] == ids[::-1]


OPEN_AT_GO = """
import sys
from arvwrap import store
print("ready", flush=True)
sys.stdin.read(1)
db = store.Store(sys.argv[1])
db.insert({"id": sys.argv[2], "run": "OLD0000", "kind": "job", "argv": [b"x"], "state": "queued"})
db.update(sys.argv[2], state="exited", exit_status=0, reused_from="OLD0001")
print(db.schema_version, flush=True)
"""


def start_at_once(count, script, args_of):
    """count interpreters that each print ready, then wait for the same go; their
    outputs once all succeeded (no traceback, status 0)."""
    procs = [subprocess.Popen([sys.executable, "-c", script, *args_of(n)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for n in range(count)]
    for p in procs:
        assert p.stdout.readline() == b"ready\n"
    for p in procs:
        p.stdin.write(b"g")
        p.stdin.flush()
    results = [p.communicate(timeout=120) for p in procs]
    errors = [err.decode() for _, err in results if err]
    assert errors == [] and [p.returncode for p in procs] == [0] * count, errors[:3]
    return [out for out, _ in results]


def test_processes_opening_an_old_database_at_once_migrate_it_once_and_all_succeed(tmp_path):
    for attempt in range(4):
        state = str(tmp_path / f"s{attempt}")
        ids = old_database(state, FIRST_SCHEMA if attempt % 2 else HEAD_SCHEMA)
        outs = start_at_once(16, OPEN_AT_GO, lambda n: [state, f"NEW{n:02d}"])
        assert outs == [f"{store.SCHEMA_VERSION}\n".encode()] * 16   # never "duplicate column"
        names, version = columns_of(state)
        assert version == store.SCHEMA_VERSION and sorted(names) == sorted(store.COLUMNS)
        records = {r["id"]: r for r in store.Store(state).list()}
        assert set(records) == set(ids) | {f"NEW{n:02d}" for n in range(16)}
        assert all(records[f"NEW{n:02d}"]["reused_from"] == "OLD0001" for n in range(16))


def test_a_database_of_a_newer_release_is_used_as_it_is(tmp_path):
    state = str(tmp_path / "s")
    old_database(state, HEAD_SCHEMA, alter=["reused_from TEXT", "future TEXT"], user_version=99)
    db = store.Store(state)
    assert db.schema_version == 99
    db.insert({"id": "NEW", "argv": [], "state": "queued"})
    assert db.get("NEW")["future"] is None and columns_of(state)[1] == 99


def test_opening_an_up_to_date_database_waits_for_no_writer(tmp_path):
    state = str(tmp_path / "s")
    store.Store(state).insert({"id": "A", "argv": [], "state": "queued"})
    writer = sqlite3.connect(os.path.join(state, "jobs.sqlite"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")        # another process in the middle of a write
    writer.execute("UPDATE jobs SET state = 'running'")
    started = time.monotonic()
    assert store.Store(state).get("A")["state"] == "queued"
    assert time.monotonic() - started < 2
    writer.execute("ROLLBACK")


def test_update_still_refuses_unknown_fields(tmp_path):
    db = store.Store(str(tmp_path / "s"))
    db.insert({"id": "A", "argv": [], "state": "queued"})
    try:
        db.update("A", colour="red")
        raise AssertionError("unknown field accepted")
    except KeyError as e:
        assert "colour" in str(e)


# -- many writers -------------------------------------------------------------------

WRITERS = 200
JOBS_PER_WRITER = 10
# One interpreter forks the writers (200 interpreters starting on 2 cores take longer
# than the writing): each child opens its own Store after the fork, and all wait on
# one pipe so that they open and write at the same moment.
CONCURRENT_WRITERS = """
import os, sys, time, traceback
from arvwrap import store
state, writers, jobs_per_writer = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def write(me):
    db = store.Store(state)
    run = f"R{me:03d}"
    db.insert({"id": run, "run": run, "kind": "run", "argv": [f"pipeline {me}".encode()],
               "cwd": "/w", "state": "running", "started": store.now(), "cpus": 0, "memory": 0})
    jobs = [f"{run}J{k}" for k in range(jobs_per_writer)]
    for k, job in enumerate(jobs):
        db.insert({"id": job, "run": run, "parent": run, "kind": "job", "cwd": b"/w/\\xff",
                   "argv": [b"tool", str(me).encode(), str(k).encode(), b"x" * 200],
                   "state": "queued", "cpus": 0.5 + k, "memory": me * 1024 + k})
    for k, job in enumerate(jobs):
        db.update(job, state="running", backend_id=str(me * 10 + k), started=store.now())
    for k, job in enumerate(jobs):
        db.update(job, state="exited", exit_status=(me + k) % 256, ended=store.now(),
                  cpu_seconds=me + k / 10, max_rss=me * 1000 + k)
    db.update(run, state="exited", exit_status=0, ended=store.now())
    db.close()

go_r, go_w = os.pipe()
pids = []
for me in range(writers):
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.read(go_r, 1)
        try:
            write(me)
            status = 0
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stderr.flush()
        os._exit(status)
    pids.append(pid)
os.close(go_r)
started = time.monotonic()
os.write(go_w, b"g" * writers)
failed = sum(os.waitpid(pid, 0)[1] != 0 for pid in pids)
print(failed, time.monotonic() - started)
"""


CREATORS = """
import os, sys, traceback
from arvwrap import store
base, attempts, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
failed = 0
for attempt in range(attempts):
    state = os.path.join(base, f"s{attempt}")
    go_r, go_w = os.pipe()
    pids = []
    for me in range(count):
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.read(go_r, 1)
            try:
                store.Store(state).insert({"id": f"{me}", "argv": [], "state": "queued"})
                os._exit(0)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)
        pids.append(pid)
    os.close(go_r)
    os.write(go_w, b"g" * count)
    os.close(go_w)
    failed += sum(os.waitpid(pid, 0)[1] != 0 for pid in pids)
print(failed)
"""


def test_processes_creating_one_database_at_once_never_see_database_is_locked(tmp_path):
    # SQLite refuses the switch to WAL of a database another process is creating at
    # once, without waiting: without the retry, a few of these 800 openings fail
    done = subprocess.run([sys.executable, "-c", CREATORS, str(tmp_path), "40", "20"],
                          capture_output=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"0\n", b""), done.stderr.decode()[-2000:]
    for attempt in range(40):
        assert len(store.Store(str(tmp_path / f"s{attempt}")).list()) == 20


def test_200_concurrent_writers_lose_nothing_and_never_see_database_is_locked(tmp_path):
    state = str(tmp_path / "s")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", CONCURRENT_WRITERS, state, str(WRITERS),
                           str(JOBS_PER_WRITER)], capture_output=True, timeout=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()[-2000:]
    failed, writing = done.stdout.split()
    assert failed == b"0"                                        # no writer raised
    print(f"{WRITERS} writers: {elapsed:.2f} s, {float(writing):.2f} s of it writing")
    records = {r["id"]: r for r in store.Store(state).list()}
    assert len(records) == WRITERS * (1 + JOBS_PER_WRITER)
    for me in range(WRITERS):
        run = records[f"R{me:03d}"]
        assert (run["state"], run["exit_status"], run["argv"]) == ("exited", 0, [f"pipeline {me}"])
        for k in range(JOBS_PER_WRITER):
            job = records[f"R{me:03d}J{k}"]
            assert job["argv"] == ["tool", str(me), str(k), "x" * 200]
            assert (job["run"], job["parent"], job["cwd"]) == (run["id"], run["id"], "/w/\udcff")
            assert (job["state"], job["exit_status"], job["backend_id"]) == (
                "exited", (me + k) % 256, str(me * 10 + k))
            assert (job["cpus"], job["memory"]) == (0.5 + k, me * 1024 + k)
            assert (job["cpu_seconds"], job["max_rss"]) == (me + k / 10, me * 1000 + k)
            assert job["started"] <= job["ended"]
    conn = sqlite3.connect(os.path.join(state, "jobs.sqlite"))
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert elapsed < 30, elapsed


def test_opening_another_store_in_the_same_process_keeps_the_first_ones_locks(tmp_path):
    # closing any descriptor of a file drops the process's POSIX locks on it: the
    # store must never open the database, -wal or -shm files itself, or another
    # process could reset the -shm this one has mapped (SIGBUS)
    state = str(tmp_path / "s")
    first = store.Store(state)
    first.insert({"id": "A", "argv": [], "state": "queued"})
    shm = os.stat(first.path + "-shm").st_ino

    def our_shm_locks():
        with open("/proc/locks") as f:
            return [line for line in f if line.split()[4] == str(os.getpid())
                    and line.split()[5].endswith(f":{shm}")]
    held = our_shm_locks()
    assert held
    second = store.Store(state)
    second.insert({"id": "B", "argv": [], "state": "queued"})
    second.close()
    assert our_shm_locks() == held
    assert len(first.list()) == 2


# -- gc -------------------------------------------------------------------------------

OLD = "2020-01-01T00:00:00.000Z"


def add_run(db, run, state="exited", ended=OLD, jobs=("exited",), argv=(b"x",)):
    db.insert({"id": run, "run": run, "kind": "run", "argv": list(argv), "state": state,
               "started": OLD, "ended": ended})
    for k, job_state in enumerate(jobs):
        db.insert({"id": f"{run}-{k}", "run": run, "parent": run, "kind": "job",
                   "argv": list(argv), "state": job_state,
                   "ended": ended if job_state in store.FINAL_STATES else None})


def test_gc_removes_old_finished_runs_with_every_record_and_keeps_the_rest(tmp_path):
    db = store.Store(str(tmp_path / "s"))
    add_run(db, "gone1", jobs=("exited", "failed", "signaled"))
    add_run(db, "gone2", state="signaled", jobs=("cancelled",))
    add_run(db, "gone3", state="failed", jobs=())
    db.insert({"id": "gone1-nested", "run": "gone1", "parent": "gone1-0", "kind": "job",
               "argv": [], "state": "exited"})
    add_run(db, "recent", ended=store.now())
    add_run(db, "running", state="running", ended=None)
    add_run(db, "old-but-a-job-runs", jobs=("exited", "running"))
    add_run(db, "old-but-a-job-queued", jobs=("queued",))
    add_run(db, "old-but-a-job-has-no-state", jobs=(None,))
    add_run(db, "old-without-ended", ended=None)
    db.insert({"id": "loose", "argv": [], "kind": "job", "state": "exited", "ended": OLD})
    assert db.gc(30 * 86400) == (3, 5)
    left = {r["id"] for r in db.list()}
    assert not any(i.startswith("gone") for i in left)
    for run in ("recent", "running", "old-but-a-job-runs", "old-but-a-job-queued",
                "old-but-a-job-has-no-state", "old-without-ended"):
        assert {run, f"{run}-0"} <= left
    assert "old-but-a-job-runs-1" in left and "loose" in left
    assert db.gc(30 * 86400) == (0, 0)


def test_gc_older_than_zero_removes_every_finished_run_and_refuses_a_negative_age(tmp_path):
    db = store.Store(str(tmp_path / "s"))
    add_run(db, "just-now", ended=store.now())
    add_run(db, "running", state="running", ended=None)
    time.sleep(0.002)
    assert db.gc(0) == (1, 1)
    assert db.gc(store.parse_duration("30d")) == (0, 0)
    assert db.gc(10 ** 15) == (0, 0)   # older than year 1
    for bad in (-1, "-1d"):
        try:
            db.gc(bad)
            raise AssertionError(f"{bad!r} accepted")
        except ValueError:
            pass
    assert {r["id"] for r in db.list()} == {"running", "running-0"}


def fill(db, runs, jobs, prefix="old"):
    big = [b"y" * 2000]
    for n in range(runs):
        add_run(db, f"{prefix}{n:05d}", jobs=("exited",) * jobs, argv=big)


def test_gc_gives_the_freed_space_back_to_the_filesystem(tmp_path):
    db = store.Store(str(tmp_path / "s"))
    fill(db, 400, 9)
    add_run(db, "keep", state="running", ended=None)
    db._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = os.path.getsize(db.path)
    assert before > 8 << 20
    assert db.gc(86400) == (400, 3600)
    assert os.path.getsize(db.path) < before / 10
    assert {r["id"] for r in db.list()} == {"keep", "keep-0"}
    conn = sqlite3.connect(db.path)
    assert conn.execute("PRAGMA freelist_count").fetchone() == (0,)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_gc_of_an_old_release_database_converts_it_to_incremental_vacuum(tmp_path):
    state = str(tmp_path / "s")
    old_database(state, records=0)          # auto_vacuum none, as every earlier release
    db = store.Store(state)
    fill(db, 300, 4)
    db._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = os.path.getsize(db.path)
    assert db.gc(86400) == (300, 1200)
    conn = sqlite3.connect(db.path)
    assert conn.execute("PRAGMA auto_vacuum").fetchone() == (2,)
    assert os.path.getsize(db.path) < before / 10
    fill(db, 50, 4, prefix="again")
    assert db.gc(86400) == (50, 200)
    assert conn.execute("PRAGMA freelist_count").fetchone() == (0,)


GC_TIME_WRITER = """
import sys, time
from arvwrap import store
db = store.Store(sys.argv[1])
db.insert({"id": "live", "run": "live", "kind": "run", "argv": [], "state": "running"})
print("writing", flush=True)
n = 0
worst = 0
while True:
    started = time.monotonic()
    db.insert({"id": f"live-{n:06d}", "run": "live", "parent": "live", "kind": "job",
               "argv": [b"z" * 500], "state": "queued"})
    db.update(f"live-{n:06d}", state="exited", exit_status=0)
    worst = max(worst, time.monotonic() - started)
    n += 1
    if n == 300:
        print("300", flush=True)
    if n >= 300 and open(sys.argv[2]).read():
        break
print(n, worst, flush=True)
"""


def test_a_writer_keeps_writing_during_gc_and_loses_nothing(tmp_path):
    state = str(tmp_path / "s")
    db = store.Store(state)
    fill(db, 1000, 4)
    stop = tmp_path / "stop"
    stop.write_text("")
    writer = subprocess.Popen([sys.executable, "-c", GC_TIME_WRITER, state, str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert writer.stdout.readline() == b"writing\n"
    assert db.gc(86400) == (1000, 4000)
    stop.write_text("stop")
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0 and err == b"", err
    lines = out.split(b"\n")
    assert lines[0] == b"300"
    count, worst = lines[1].split()
    print(f"writer's longest insert + update during gc: {float(worst) * 1000:.0f} ms")
    assert float(worst) < 5          # one gc transaction at a time: short waits
    live = store.Store(state).list(run="live")
    assert len(live) == int(count) + 1
    assert all(r["state"] == "exited" for r in live if r["kind"] == "job")


def test_parse_duration_reads_days_hours_minutes_seconds_and_weeks():
    cases = {"30d": 30 * 86400, "12h": 43200, "90m": 5400, "45s": 45, "2w": 14 * 86400,
             "1d12h": 129600, "1.5h": 5400, " 7D ": 7 * 86400, "3600": 3600, "0": 0, 0: 0,
             2.5: 2.5, "0.5m": 30}
    for text, seconds in cases.items():
        assert store.parse_duration(text) == seconds, text
    for bad in ("", "abc", "-1d", "3x", "30 days", "1mo", "1y", "d", "nan", "inf", -5, True,
                "1d-2h"):
        try:
            store.parse_duration(bad)
            raise AssertionError(f"{bad!r} accepted")
        except ValueError:
            pass


# -- permissions ------------------------------------------------------------------------

MODES = """
import os, stat, sys
os.umask(0)                      # the most permissive caller
from arvwrap import store
db = store.Store(sys.argv[1])
db.insert({"id": store.new_id(), "argv": [], "state": "queued"})
db.list()
names = [sys.argv[1]] + [db.path + s for s in ("", "-wal", "-shm")]
print(" ".join(oct(stat.S_IMODE(os.stat(n).st_mode)) for n in names))
"""


def test_state_dir_is_0700_and_database_wal_and_shm_are_0600_under_umask_0(tmp_path):
    state = str(tmp_path / "s")
    modes = lambda: subprocess.run([sys.executable, "-c", MODES, state], check=True,
                                   capture_output=True).stdout.split()
    assert modes() == [b"0o700", b"0o600", b"0o600", b"0o600"]      # the process creating all
    # the last connection's close removed -wal and -shm: a later process makes them anew
    assert not os.path.exists(os.path.join(state, "jobs.sqlite-wal"))
    assert modes() == [b"0o700", b"0o600", b"0o600", b"0o600"]
    # an older release, or any SQLite client, creating them: SQLite gives -wal and -shm
    # the database's own mode whatever the umask
    plain = ("import os, sqlite3, stat, sys; os.umask(0); "
             "c = sqlite3.connect(sys.argv[1] + '/jobs.sqlite', isolation_level=None); "
             "c.execute(\"UPDATE jobs SET state = 'exited'\"); "
             "print(*(oct(stat.S_IMODE(os.stat(sys.argv[1] + n).st_mode)) "
             "for n in ('', '/jobs.sqlite', '/jobs.sqlite-wal', '/jobs.sqlite-shm')))")
    assert not os.path.exists(os.path.join(state, "jobs.sqlite-shm"))
    assert subprocess.run([sys.executable, "-c", plain, state], check=True,
                          capture_output=True).stdout.split() == [b"0o700", b"0o600", b"0o600", b"0o600"]


def test_database_files_made_wider_by_something_else_are_narrowed_to_0600(tmp_path):
    state = str(tmp_path / "s")
    old_database(state)
    path = os.path.join(state, "jobs.sqlite")
    for suffix in ("", "-wal", "-shm"):
        if not os.path.exists(path + suffix):
            open(path + suffix, "wb").close()
        os.chmod(path + suffix, 0o666)
    db = store.Store(state)
    db.insert({"id": "A", "argv": [], "state": "queued"})
    for suffix in ("", "-wal", "-shm"):
        assert stat.S_IMODE(os.stat(path + suffix).st_mode) == 0o600, suffix
    assert len(db.list()) == 4


def test_a_state_dir_others_can_enter_is_refused(tmp_path):
    state = tmp_path / "s"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    try:
        store.Store(str(state))
        raise AssertionError("a 0755 state dir was accepted")
    except PermissionError:
        pass


# -- batches: the dispatcher's rounds --

def job(job_id, **fields):
    return {"id": job_id, "kind": "job", "argv": ["tiny"], "state": "running", **fields}


def test_a_batch_is_seen_by_others_only_once_committed(tmp_path):
    db = store.Store(str(tmp_path / "s"))
    other = store.Store(str(tmp_path / "s"))
    db.insert(job("before"))
    db.begin_batch()
    assert not db.pending
    db.insert(job("A"))
    db.update("A", state="exited", exit_status=0)
    db.update("before", state="exited", exit_status=1)
    assert db.pending and db.get("A")["state"] == "exited"   # its own writes: seen
    assert other.get("A") is None and other.get("before")["state"] == "running"
    db.end_batch()
    assert not db.pending
    assert other.get("A")["exit_status"] == 0 and other.get("before")["exit_status"] == 1
    db.insert(job("after"))                                   # no batch: committed at once
    assert other.get("after") is not None
    db.close()
    other.close()


def test_a_batch_that_fails_at_its_commit_is_written_one_by_one_and_reports_each_failure(
        tmp_path, small_tmpfs, caplog):
    """A real full disk: the records fit SQLite's page cache, so the disk is only
    found full at the commit. Each write is tried again on its own, each failure
    goes to that write's on_error, and nothing half-written is left."""
    state = small_tmpfs / "state"
    db = store.Store(str(state))
    db.insert(job("kept"))
    subprocess.run(["dd", "if=/dev/zero", f"of={small_tmpfs}/filler", "bs=4k"],
                   stderr=subprocess.DEVNULL)
    failures = []
    db.begin_batch()
    big = ["x" * 4000] * 60           # 240 KB a record: more than the -wal's spare room
    for n in range(4):
        db.insert(job(f"J{n}", argv=big), on_error=lambda e, n=n: failures.append((n, str(e))))
    db.end_batch()
    assert "failed at commit" in caplog.text
    assert [n for n, _ in failures] == [0, 1, 2, 3]
    assert all("full" in e for _, e in failures), failures
    os.unlink(small_tmpfs / "filler")
    reader = store.Store(str(state))
    assert [r["id"] for r in reader.list()] == ["kept"]
    db.insert(job("later"))           # the store goes on once there is room again
    assert db.get("later") is not None
    db.close()
    reader.close()


def test_the_checkpoint_thread_sleeps_while_nothing_is_written(tmp_path, monkeypatch):
    """An idle dispatcher does not wake to look at its -wal: the thread looks only
    after a commit."""
    looks = []
    real = store.os.path.getsize
    monkeypatch.setattr(store.os.path, "getsize", lambda p: looks.append(p) or real(p))
    db = store.Store(str(tmp_path / "s"), checkpoint_aside=True)
    time.sleep(store.CHECKPOINT_EVERY * 2)
    assert looks == []
    db.begin_batch()
    db.insert(job("J1"))
    db.end_batch()
    until(lambda: looks, what="a look at the -wal after a commit")
    db.close()


def test_the_wal_starts_over_under_a_steady_stream_of_commits(tmp_path, monkeypatch):
    """A commit starts the -wal over only if all of it was copied back as the commit
    began: the checkpointer alone never gets there while commits keep coming (the
    -wal grew to 1.2 GB in 6 s), so the writer copies the rest between two commits.
    The -wal header's checkpoint sequence number counts the restarts."""
    monkeypatch.setattr(store, "RESTART_FRAMES", 256)
    db = store.Store(str(tmp_path / "s"), checkpoint_aside=True)
    wal = tmp_path / "s" / "jobs.sqlite-wal"

    def restarts():
        with open(wal, "rb") as f:
            return int.from_bytes(f.read(16)[12:16], "big")

    db.begin_batch()
    db.insert(job("J0"))
    db.end_batch()
    first, n, deadline = restarts(), 1, time.monotonic() + 20
    while restarts() == first:
        assert time.monotonic() < deadline, \
            f"the -wal never started over: {n} commits, {wal.stat().st_size >> 20} MiB"
        db.begin_batch()
        db.insert(job(f"J{n}", argv=["x" * 2000]))
        db.end_batch()
        n += 1
    db.close()
    assert len(store.Store(str(tmp_path / "s")).list()) == n


def test_a_store_that_checkpoints_aside_still_gets_its_wal_copied_back(tmp_path):
    """No commit of it runs a checkpoint (so the dispatcher never waits for one), yet
    the -wal does not grow without end: its own thread copies it back."""
    db = store.Store(str(tmp_path / "s"), checkpoint_aside=True)
    assert db._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    other = store.Store(str(tmp_path / "s"))     # a run's, a command's: only far past it
    assert other._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == store.AUTOCHECKPOINT
    other.close()
    database = tmp_path / "s" / "jobs.sqlite"
    before = database.stat().st_size
    for n in range(400):              # well over CHECKPOINT_AT of -wal
        db.begin_batch()
        db.insert(job(f"J{n}", argv=["x" * 3000]))
        db.end_batch()
    until(lambda: database.stat().st_size > before + store.CHECKPOINT_AT,
          what="a checkpoint copying the -wal back")
    assert len(store.Store(str(tmp_path / "s")).list()) == 400
    db.close()
