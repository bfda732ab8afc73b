import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time

from arvwrap import store


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
