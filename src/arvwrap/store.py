"""Job records: one SQLite database per state dir.

SQLite in WAL mode gives atomic commits, so a process killed at any moment leaves
either the old record or the new one, never a torn one. The database and its
-wal and -shm files are 0600 inside a 0700 state dir. Nothing from a job's
environment is ever stored (secrets live there).

The schema is versioned (`PRAGMA user_version`, see VERSIONS): opening a database
of an earlier version migrates it in one transaction, which one process does while
the others wait and then see the new version.
"""
import functools
import json
import os
import re
import sqlite3
import stat
import threading
import time

from arvwrap import paths

HOST = os.uname().nodename   # this machine, as the records name it (gethostname)


def _log():
    """The store's logger. logging is imported only when there is something to say:
    `arv-wrap COMMAND` opens the store at every start and usually says nothing."""
    import logging
    return logging.getLogger("arvwrap.store")

STATES = ("queued", "running", "exited", "signaled", "cancelled", "failed")
FINAL_STATES = ("exited", "signaled", "cancelled", "failed")

# The schema, one entry per version: the columns that version adds (in order) and the
# statements it runs after adding them. A published version is never edited: a change
# is a new entry. Every version only adds nullable columns and indexes, so a database
# migrated by a newer release still works for an older one that is still running.
VERSIONS = (
    # 1: the schema of every release before it was versioned (user_version 0): the
    # first release's columns up to `host`, then four that were added with ALTER TABLE
    # ADD COLUMN one at a time, outside a transaction, so an unversioned database may
    # hold any subset of them: the migration adds whichever are missing.
    ({
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
    }, (
        "CREATE INDEX IF NOT EXISTS jobs_run ON jobs(run)",
    )),
    # 2: issue 9 (the tree, gc) and the contract's `reused_from` (issue 7)
    ({
        "reused_from": "TEXT",      # id of the job whose result was reused, or null
        "shell_pid": "INTEGER",     # a run: the process its end waits for (the shell
        "shell_start": "INTEGER",   # of `arv-wrap env`, else arv-wrap), and its start
                                    # time (clock ticks after boot)
    }, (
        "CREATE INDEX IF NOT EXISTS jobs_parent ON jobs(parent)",
        "CREATE INDEX IF NOT EXISTS jobs_kind_state ON jobs(kind, state)",
    )),
)
SCHEMA_VERSION = len(VERSIONS)
COLUMNS = {name: kind for columns, _ in VERSIONS for name, kind in columns.items()}

BUSY_TIMEOUT = 30          # seconds SQLite itself waits for a lock (its busy handler)
RETRY_DEADLINE = 30        # seconds we go on retrying what SQLite refuses at once
WAL_SIZE_LIMIT = 32 << 20  # bytes the -wal file is truncated to when it is reset
CHECKPOINT_EVERY = 0.25    # s between looks at the -wal of a store that checkpoints aside
CHECKPOINT_AT = 1 << 20    # bytes of -wal that it copies back into the database
RESTART_FRAMES = 4096      # frames (16 MiB) of -wal after which the writer starts it over
AUTOCHECKPOINT = 4 * RESTART_FRAMES   # frames of -wal after which any other commit checkpoints
VACUUM_LIMIT = 256 << 20   # a legacy database larger than this is never VACUUMed whole
VACUUM_CHUNK = 256         # pages freed per (short) write transaction by gc
GC_BATCH = 200             # runs removed per write transaction by gc

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_BUSY = (sqlite3.SQLITE_BUSY, getattr(sqlite3, "SQLITE_PROTOCOL", 15))


# Every two Crockford digits (10 bits): a ULID is 13 lookups. (base64.b32encode
# slices bits in a Python loop before 3.13, at twice the time.)
_DIGIT_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
_PAIR_SHIFTS = range(120, -1, -10)


def new_id():
    """A ULID: 48-bit millisecond time + 80 random bits, sortable and unique across machines."""
    n = (int(time.time() * 1000) & (1 << 48) - 1) << 80 | int.from_bytes(os.urandom(10), "big")
    return "".join([_DIGIT_PAIRS[n >> shift & 1023] for shift in _PAIR_SHIFTS])


def _stamp(moment):
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


_last_second = (None, "")   # the last whole second now() formatted, and its text


def now():
    """ISO 8601 UTC with milliseconds."""
    global _last_second
    seconds, fraction = divmod(time.time(), 1)
    last = _last_second         # one read: another thread may replace it meanwhile
    if seconds != last[0]:      # the dispatcher stamps many records per second
        last = _last_second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return f"{last[1]}.{int(fraction * 1000):03d}Z"


def text(raw):
    """bytes -> str the way Python names undecodable bytes (surrogateescape)."""
    return os.fsdecode(raw) if isinstance(raw, bytes) else raw


def _storable(value):
    """A str that is not valid UTF-8 (a cwd with undecodable bytes, which text() names
    with lone surrogates) cannot be bound as TEXT: it is stored as the BLOB of its
    bytes, and read back as text() names them."""
    if isinstance(value, str) and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            try:
                return os.fsencode(value)
            except UnicodeEncodeError:
                return value.encode("utf-8", "backslashreplace")
    return value


def _storables(values):
    """[_storable(v) for v in values], without a call for the usual ASCII or non-str."""
    return [v if type(v) is not str or v.isascii() else _storable(v) for v in values]


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smhdw])", re.I)


def parse_duration(value):
    """Seconds (float) from `30d`, `12h`, `90m`, `45s`, `2w`, `1d12h` or a plain number of
    seconds; 0 is allowed (everything finished). m is minutes, as in the whitelist's
    `time`; there are no months or years. ValueError if bad or negative."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        s = str(value).strip().replace(" ", "")
        try:
            seconds = float(s)
        except ValueError:
            if not s or _DURATION_PART.sub("", s):
                raise ValueError(f"not a duration (like 30d, 12h, 90m): {value!r}") from None
            seconds = sum(float(n) * _DURATION_UNITS[u.lower()]
                          for n, u in _DURATION_PART.findall(s))
    if not seconds >= 0 or seconds == float("inf"):      # also refuses nan
        raise ValueError(f"not a duration >= 0: {value!r}")
    return seconds


def _busy(error):
    """Whether an sqlite3 error is a lock another connection holds (worth retrying)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return isinstance(error, sqlite3.OperationalError) and code & 0xFF in _BUSY
    return isinstance(error, sqlite3.OperationalError) and "database is locked" in str(error)


# the same few column sets come back for every job: each statement is made once
@functools.lru_cache(maxsize=256)
def _insert_sql(names):
    return f"INSERT INTO jobs ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"


@functools.lru_cache(maxsize=256)
def _update_sql(names):
    unknown = set(names) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown record fields: {sorted(unknown)}")
    return f"UPDATE jobs SET {', '.join(f'{name} = ?' for name in names)} WHERE id = ?"


def _retry(step, deadline=RETRY_DEADLINE):
    """step(), again while SQLite says another connection holds the lock. SQLite's busy
    handler already waits BUSY_TIMEOUT for most locks; this covers the few it refuses
    at once (the journal-mode change of a database another process is creating, the
    WAL recovery of a database another process is opening)."""
    end = time.monotonic() + deadline
    pause = 0.005
    while True:
        try:
            return step()
        except sqlite3.OperationalError as e:
            if not _busy(e) or time.monotonic() > end:
                raise
        time.sleep(pause * (0.5 + int.from_bytes(os.urandom(2), "big") / 65536))
        pause = min(pause * 2, 0.1)


def _private_file(path, create):
    """Make path 0600: created so when create and missing (mknod: no descriptor, and
    its mode is only ever narrowed by the umask), else narrowed with chmod if ours and
    wider. Never opens the file: closing any descriptor of a file drops every POSIX
    lock this process holds on it, SQLite's own connections' included, which lets
    another process reset a -shm this one has mapped (it then dies of SIGBUS)."""
    if create:
        try:
            os.mknod(path, stat.S_IFREG | 0o600)
            return
        except FileExistsError:
            pass
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_mode & 0o7177:
        os.chmod(path, 0o600)


class Store:
    """Thread-safe access to the records of one state dir."""

    def __init__(self, state_dir, checkpoint_aside=False):
        """checkpoint_aside: SQLite's automatic checkpoint (run by the commit that
        crosses its threshold, fsyncs included) is off; a thread of this store copies
        the -wal back without the write lock, and the writer itself finishes a copy
        between two commits only when the -wal has grown long (_start_wal_over)."""
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "jobs.sqlite")
        self._lock = threading.Lock()
        self._batch = None      # see begin_batch
        self._checkpoint_aside = checkpoint_aside
        self._closed = threading.Event()
        self._wrote = threading.Event()   # a commit since the checkpointer last looked
        self._restart = threading.Event()  # the -wal is long and mostly copied back
        self._open()
        if checkpoint_aside:
            threading.Thread(target=self._checkpoints, name="arvwrap-checkpoints",
                             daemon=True).start()

    # -- opening and migrating ----------------------------------------------------

    def _open(self):
        paths.private_dir(self.state_dir)
        self._private_files(before=True)
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, check_same_thread=False,
                             isolation_level=None)
        try:
            self._inode = os.stat(self.path).st_ino
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            # Checkpoints are the dispatcher's (checkpoint_aside). Another process's
            # commit runs one only past what a dispatcher lets the -wal reach, so a
            # run's start and end do not wait for one (with its fsyncs) behind a
            # dispatcher at work.
            db.execute(f"PRAGMA wal_autocheckpoint={0 if self._checkpoint_aside else AUTOCHECKPOINT}")
            self.schema_version = _retry(lambda: self._prepare(db))
            self._private_files(before=False)
        except BaseException:
            db.close()
            raise
        self._db = db

    def _private_files(self, before):
        """The database and its -wal and -shm files are 0600, whichever process creates
        them. SQLite creates -wal and -shm with the database's own mode (past the umask);
        before connecting we also create any that is missing 0600 ourselves (an empty
        -wal or -shm is what SQLite would create), and after connecting we narrow any
        that something else made wider. No os.umask: it is process-wide and the
        dispatcher is multithreaded."""
        for suffix in ("", "-wal", "-shm"):
            _private_file(self.path + suffix, create=before)

    def _prepare(self, db):
        """WAL mode, then the schema brought to SCHEMA_VERSION in one IMMEDIATE
        transaction: a second process waits for the first's write lock, then sees the
        new version and has nothing to do. Returns the version the database is at."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:      # the usual case: nothing written at open
            return version
        if db.execute("PRAGMA page_count").fetchone()[0] == 0:
            # a new database: gc frees pages with incremental vacuum. Only possible
            # before its first page is written, which the switch to WAL does.
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number in range(version + 1, SCHEMA_VERSION + 1):
                self._migrate(db, number)
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return max(version, SCHEMA_VERSION)

    @staticmethod
    def _migrate(db, number):
        """Bring the schema from version number - 1 to number (inside the caller's
        transaction): create the table, or add the version's columns it lacks."""
        columns, statements = VERSIONS[number - 1]
        have = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
        if not have:
            defined = {n: k for cols, _ in VERSIONS[:number] for n, k in cols.items()}
            db.execute(f"CREATE TABLE jobs ({', '.join(f'{n} {k}' for n, k in defined.items())})")
        else:
            for name, kind in columns.items():
                if name not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        for statement in statements:
            db.execute(statement)

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
        self._closed.set()
        self._wrote.set()
        with self._lock:
            self._db.close()

    def _checkpoints(self):
        """Copy the -wal back into the database once it has grown, on a connection of
        its own: a PASSIVE checkpoint takes no write lock, so writers go on. It wakes
        only after commits (an idle dispatcher stays asleep), at most once per
        CHECKPOINT_EVERY. A -wal longer than RESTART_FRAMES it leaves to the writer
        to start over (_start_wal_over)."""
        said = None
        while self._wrote.wait() and not self._closed.wait(CHECKPOINT_EVERY):
            self._wrote.clear()
            try:
                if os.path.getsize(self.path + "-wal") < CHECKPOINT_AT:
                    continue
                db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
                try:
                    _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                finally:
                    db.close()
                if frames > RESTART_FRAMES:
                    self._restart.set()
            except (OSError, sqlite3.Error) as e:   # the next round tries again
                if str(e) != said:
                    _log().warning("checkpointing %s: %s", self.path, e)
                said = str(e)

    def _start_wal_over(self):
        """A commit starts the -wal over only if it was all copied back when the commit
        began. Under a steady stream of commits the checkpointer's passes never get
        there (commits append while it copies), and the -wal grew without end (1.2 GB
        in 6 s of back-to-back commits). So now and then the writer itself, between
        two of its commits, copies back the little that came since the last pass."""
        try:
            busy, frames, copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as e:
            _log().warning("checkpointing %s: %s", self.path, e)
            self._restart.clear()           # until the checkpointer finds it long again
            return
        if not busy and copied == frames:   # busy: the checkpointer is at it; next commit
            self._restart.clear()

    # -- records ------------------------------------------------------------------

    def _write(self, sql, params, on_error=None):
        with self._lock:
            if self._batch is None:
                db = self._current()
                _retry(lambda: db.execute(sql, params))
                self._wrote.set()
                return
            if not self._db.in_transaction:      # the batch's first write begins it
                db = self._current()
                _retry(lambda: db.execute("BEGIN IMMEDIATE"))
            try:
                self._db.execute(sql, params)    # no busy wait: we hold the write lock
            except sqlite3.Error:
                if not self._db.in_transaction:  # SQLite rolled the whole batch back
                    self._replay()
                raise
            self._batch.append((sql, params, on_error))

    # -- batches: many writes, one commit -------------------------------------------

    def begin_batch(self):
        """Writes from now until end_batch share one transaction, begun by the first:
        the dispatcher's loop writes each round's records with one commit instead of
        one each. The writer must not act on a batched write (tell a caller) before
        end_batch: a write that fails at the commit is reported only then."""
        with self._lock:
            self._batch = []
            self._failed = []

    @property
    def pending(self):
        """Whether the open batch holds writes not yet committed."""
        return bool(self._batch)

    def end_batch(self):
        """Commit the batch. Should the commit fail, each of its writes is tried again
        on its own, and those that fail again go to their on_error (or the log)."""
        with self._lock:
            batch, self._batch = self._batch, None
            if self._db.in_transaction:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.Error as e:
                    _log().warning("a batch of %d record writes failed at commit (%s); "
                                   "writing them one by one", len(batch), e)
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    self._batch = batch
                    self._replay()
                    self._batch = None
                self._wrote.set()
                if self._restart.is_set():
                    self._start_wal_over()
            failed, self._failed = self._failed, []
        for on_error, error in failed:
            if on_error is None:
                _log().error("cannot write a record: %s", error)
            else:
                on_error(error)

    def _replay(self):
        """The batch's writes again, each its own transaction (with the lock held):
        its transaction was rolled back."""
        for sql, params, on_error in self._batch:
            try:
                _retry(lambda: self._db.execute(sql, params))
            except sqlite3.Error as e:
                self._failed.append((on_error, e))
        self._batch = []

    def insert(self, record, on_error=None):
        record = dict(record)
        record.setdefault("created", now())
        record.setdefault("host", HOST)
        record["argv"] = json.dumps([text(a) for a in record.get("argv", [])])
        if "cwd" in record:
            record["cwd"] = text(record["cwd"])
        names = tuple(name for name in record if name in COLUMNS)
        self._write(_insert_sql(names), _storables([record[name] for name in names]), on_error)

    def update(self, job_id, on_error=None, **fields):
        self._write(_update_sql(tuple(fields)),
                    [*_storables(fields.values()), job_id], on_error)

    def orphans(self, alive):
        """Ids of this host's unfinished jobs whose dispatcher is gone (alive(pid) is
        False): it was killed while it held them."""
        rows = self.query("WHERE kind = 'job' AND host = ? AND state IN ('queued', 'running')",
                          [HOST])
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
        def select():
            cursor = self._db.execute(f"SELECT * FROM jobs {where}", params)
            return [d[0] for d in cursor.description], cursor.fetchall()
        with self._lock:
            names, rows = _retry(select)
        records = []
        for row in rows:
            record = {name: text(value) for name, value in zip(names, row)}
            record["argv"] = json.loads(record["argv"] or "[]")
            records.append(record)
        return records

    # -- pruning ------------------------------------------------------------------

    def gc(self, older_than_seconds):
        """Remove the runs that finished (kind 'run', a final state) with `ended` more
        than older_than_seconds (a number, or a duration parse_duration reads) ago, with every record of those runs (run = its id);
        a run any of whose records is not in a final state is kept whole. Then give
        the freed pages back to the filesystem. Each batch of GC_BATCH runs, and each
        VACUUM_CHUNK pages freed, is its own short write transaction, so writers wait
        milliseconds, not the whole gc. Returns (runs removed, other records removed)."""
        seconds = parse_duration(older_than_seconds)
        try:
            import datetime
            cutoff = _stamp(datetime.datetime.now(datetime.timezone.utc)
                            - datetime.timedelta(seconds=seconds))
        except OverflowError:       # before year 1: nothing is that old
            return 0, 0
        final = ", ".join("?" for _ in FINAL_STATES)
        eligible = (f"SELECT r.id FROM jobs r WHERE r.kind = 'run' AND r.state IN ({final}) "
                    f"AND julianday(r.ended) < julianday(?) AND NOT EXISTS ("
                    f"SELECT 1 FROM jobs j WHERE j.run = r.id "
                    f"AND (j.state IS NULL OR j.state NOT IN ({final}))) "
                    f"ORDER BY r.id LIMIT {GC_BATCH}")
        params = [*FINAL_STATES, cutoff, *FINAL_STATES]
        runs = records = 0
        while True:
            with self._lock:
                db = self._current()
                ids, removed = _retry(lambda: self._remove_batch(db, eligible, params))
            runs += len(ids)
            records += removed - len(ids)
            if len(ids) < GC_BATCH:
                break
        if runs:
            self._reclaim()
        return runs, records

    @staticmethod
    def _remove_batch(db, eligible, params):
        """One batch in one IMMEDIATE transaction (the choice and the removal see the
        same records): (run ids removed, records removed including those runs')."""
        db.execute("BEGIN IMMEDIATE")
        try:
            ids = [row[0] for row in db.execute(eligible, params)]
            removed = 0
            if ids:
                marks = ", ".join("?" for _ in ids)
                removed = db.execute(f"DELETE FROM jobs WHERE run IN ({marks}) OR id IN ({marks})",
                                     ids + ids).rowcount
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return ids, removed

    def _reclaim(self):
        """Shrink the file by the pages gc freed. A database made by this release has
        incremental auto-vacuum: free VACUUM_CHUNK pages per transaction. One made
        before (auto_vacuum none) is converted once by a VACUUM, which holds the write
        lock while it copies the database; a database above VACUUM_LIMIT is left as it
        is (SQLite reuses its free pages for new records). Then a PASSIVE checkpoint,
        which never waits, lets SQLite truncate the database file."""
        def pragma(sql):
            with self._lock:
                db = self._current()
                return _retry(lambda: db.execute(sql).fetchall())
        mode = pragma("PRAGMA auto_vacuum")[0][0]
        if mode == 0:
            size = pragma("PRAGMA page_count")[0][0] * pragma("PRAGMA page_size")[0][0]
            if size <= VACUUM_LIMIT and pragma("PRAGMA freelist_count")[0][0]:
                pragma("PRAGMA auto_vacuum=INCREMENTAL")
                pragma("VACUUM")
        elif mode == 2:
            free = pragma("PRAGMA freelist_count")[0][0]
            while free:
                pragma(f"PRAGMA incremental_vacuum({VACUUM_CHUNK})")   # fetchall: a page a row
                left = pragma("PRAGMA freelist_count")[0][0]
                if left >= free:        # no progress (cannot happen): do not spin
                    break
                free = left
        pragma("PRAGMA wal_checkpoint(PASSIVE)")
