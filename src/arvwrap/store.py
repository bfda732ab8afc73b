"""Job records: one SQLite database per state dir.

SQLite in WAL mode gives atomic commits, so a process killed at any moment leaves
either the old record or the new one, never a torn one. The database and its
WAL files are created 0600 inside a 0700 state dir. Nothing from a job's
environment is ever stored (secrets live there).
"""
import datetime
import json
import os
import secrets
import socket
import sqlite3
import threading
import time

from arvwrap import paths

STATES = ("queued", "running", "exited", "signaled", "cancelled", "failed")
FINAL_STATES = ("exited", "signaled", "cancelled", "failed")

COLUMNS = {
    "id": "TEXT PRIMARY KEY",
    "run": "TEXT",
    "parent": "TEXT",
    "kind": "TEXT",          # 'run' for a top-level record, 'job' for a redirected call
    "argv": "TEXT",          # JSON list of str (surrogateescape'd bytes)
    "cwd": "TEXT",
    "backend": "TEXT",
    "backend_id": "TEXT",
    "state": "TEXT",
    "exit_status": "INTEGER",
    "signal": "INTEGER",
    "created": "TEXT",
    "started": "TEXT",
    "ended": "TEXT",
    "cpus": "REAL",
    "memory": "INTEGER",
    "time_limit": "INTEGER",
    "reason": "TEXT",
    "rule": "TEXT",
    "host": "TEXT",
    "dispatcher": "INTEGER",    # pid of the dispatcher that holds the job (on host)
    "queued_seconds": "REAL",   # from the call's arrival to its start
    "cpu_seconds": "REAL",      # user + system of the tool and its children
    "max_rss": "INTEGER",       # bytes
}

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id():
    """A ULID: 48-bit millisecond time + 80 random bits, sortable and unique across machines."""
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def now():
    """ISO 8601 UTC with milliseconds."""
    stamp = datetime.datetime.now(datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z"


def text(raw):
    """bytes -> str the way Python names undecodable bytes (surrogateescape)."""
    return os.fsdecode(raw) if isinstance(raw, bytes) else raw


class Store:
    """Thread-safe access to the records of one state dir."""

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "jobs.sqlite")
        self._lock = threading.Lock()
        self._open()

    def _open(self):
        paths.private_dir(self.state_dir)
        if not os.path.exists(self.path):
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False,
                                   isolation_level=None)
        self._inode = os.stat(self.path).st_ino
        deadline = time.monotonic() + 30
        while True:
            try:
                return self._prepare()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _prepare(self):
        """WAL mode and the schema. While another process creates the same database,
        SQLite refuses the mode change at once, without its busy timeout: _open retries."""
        if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS.items())
        self._db.execute(f"CREATE TABLE IF NOT EXISTS jobs ({columns})")
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name in COLUMNS.keys() - have:     # a database made by an older release
            try:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {COLUMNS[name]}")
            except sqlite3.OperationalError as e:
                if "duplicate column" not in str(e):   # another process added it first
                    raise
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_run ON jobs(run)")

    def _current(self):
        """The connection, reopened if the database file was removed or replaced
        under this (long-lived) process, so new records are never written to a
        file nobody can see any more."""
        try:
            same = os.stat(self.path).st_ino == self._inode
        except FileNotFoundError:
            same = False
        if not same:
            self._db.close()
            self._open()
        return self._db

    def close(self):
        with self._lock:
            self._db.close()

    def insert(self, record):
        record = dict(record)
        record.setdefault("created", now())
        record.setdefault("host", socket.gethostname())
        record["argv"] = json.dumps([text(a) for a in record.get("argv", [])])
        if "cwd" in record:
            record["cwd"] = text(record["cwd"])
        names = [name for name in record if name in COLUMNS]
        sql = (f"INSERT INTO jobs ({', '.join(names)}) "
               f"VALUES ({', '.join('?' for _ in names)})")
        with self._lock:
            self._current().execute(sql, [record[name] for name in names])

    def update(self, job_id, **fields):
        unknown = set(fields) - set(COLUMNS)
        if unknown:
            raise KeyError(f"unknown record fields: {sorted(unknown)}")
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._lock:
            self._current().execute(f"UPDATE jobs SET {assignments} WHERE id = ?",
                                    [*fields.values(), job_id])

    def orphans(self, alive):
        """Ids of this host's unfinished jobs whose dispatcher is gone (alive(pid) is
        False): it was killed while it held them."""
        rows = self.query("WHERE kind = 'job' AND host = ? AND state IN ('queued', 'running')",
                          [socket.gethostname()])
        return [r["id"] for r in rows if not r["dispatcher"] or not alive(r["dispatcher"])]

    def get(self, job_id):
        rows = self.query("WHERE id = ?", [job_id])
        return rows[0] if rows else None

    def list(self, run=None):
        """Records, newest first; with run, only that run's."""
        if run:
            return self.query("WHERE run = ? ORDER BY id DESC", [run])
        return self.query("ORDER BY id DESC", [])

    def query(self, where, params):
        with self._lock:
            cursor = self._db.execute(f"SELECT * FROM jobs {where}", params)
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        records = []
        for row in rows:
            record = dict(zip(names, row))
            record["argv"] = json.loads(record["argv"] or "[]")
            records.append(record)
        return records
