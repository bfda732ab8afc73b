"""The reuse cache of one state dir: finished jobs' results, by key.

    <state>/cache/cache.sqlite   entries (key -> result) and the digest memo
    <state>/cache/blobs/ab/abcd…  file contents by SHA-256, each written once
    <state>/cache/tmp/           captures and copies on their way in or out

Everything is 0700/0600 like the store. A blob is written under a temporary name
and renamed into place, so concurrent writers never leave a torn one; an entry
is one row written in one transaction after its blobs exist. Blobs are shared by
the entries that have the same bytes; gc and clear remove the blobs no entry
names any more. Outputs leave the cache as copies (a reflink where the file
system can), never as links the pipeline could write through.
"""
import json
import os
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from arvwrap import digests, paths, store

TMP_AGE = 7 * 86400     # s: a file in tmp/ older than this belongs to nobody
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, job TEXT, tool TEXT,"
    " parts TEXT, status INTEGER, stdout TEXT, stderr TEXT, outputs TEXT, size INTEGER,"
    " created TEXT, used TEXT)",
    "CREATE INDEX IF NOT EXISTS entries_tool ON entries(tool)",
    "CREATE TABLE IF NOT EXISTS digests (dev INTEGER, ino INTEGER, size INTEGER,"
    " mtime INTEGER, ctime INTEGER, digest TEXT, PRIMARY KEY (dev, ino))",
)


@dataclass
class Output:
    path: str           # absolute
    digest: str
    mode: int
    size: int


@dataclass
class Entry:
    key: str
    job: str
    tool: str
    parts: dict
    stdout: str         # blob digests of the captured streams
    stderr: str
    outputs: list = field(default_factory=list)
    status: int = 0
    size: int = 0
    created: str = ""
    used: str = ""


class Cache:
    def __init__(self, state_dir):
        self.dir = os.path.join(state_dir, "cache")
        self.blobs = os.path.join(self.dir, "blobs")
        self.tmp = os.path.join(self.dir, "tmp")
        for d in (state_dir, self.dir, self.blobs, self.tmp):
            paths.private_dir(d)
        path = os.path.join(self.dir, "cache.sqlite")
        for suffix in ("", "-wal", "-shm"):        # 0600 before SQLite makes them
            store._private_file(path + suffix, create=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=store.BUSY_TIMEOUT, check_same_thread=False,
                                   isolation_level=None)
        store._retry(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
        self._db.execute("PRAGMA synchronous=NORMAL")
        for statement in SCHEMA:
            store._retry(lambda: self._db.execute(statement))
        self.digests = digests.Digests(_Memo(self))

    def close(self):
        with self._lock:
            self._db.close()

    def _sql(self, sql, params=()):
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    # -- blobs --

    def blob_path(self, digest):
        return os.path.join(self.blobs, digest[:2], digest)

    def new_tmp(self, name):
        """A fresh private file path under tmp/ (the caller creates it)."""
        return os.path.join(self.tmp, f"{store.new_id()}.{name}")

    def put_file(self, path, move=False):
        """(digest, size) of a file, whose bytes are then in a blob: copied (or, for
        a capture of our own under tmp/, moved)."""
        digest, st = self.digests.digest(path)
        target = self.blob_path(digest)
        if os.path.exists(target) and os.path.getsize(target) == st.st_size:
            if move:
                os.unlink(path)
            return digest, st.st_size
        paths.private_dir(os.path.dirname(target))
        if move:
            os.chmod(path, 0o600)
            os.replace(path, target)
        else:
            part = self.new_tmp("in")
            copy(path, part, 0o600)
            os.replace(part, target)
        return digest, st.st_size

    def intact(self, digest, size=None):
        """Whether the blob is there with its bytes (hashed again only if it changed);
        size, when known, is checked first."""
        path = self.blob_path(digest)
        try:
            return (size is None or os.path.getsize(path) == size) and \
                self.digests.digest(path)[0] == digest
        except OSError:
            return False

    def restore(self, output):
        """Put an output back where the job wrote it: a copy, renamed into place."""
        part = os.path.join(os.path.dirname(output.path),
                            f".{os.path.basename(output.path)}.arv-wrap-{store.new_id()}")
        try:
            copy(self.blob_path(output.digest), part, output.mode & 0o7777)
            os.replace(part, output.path)
        except BaseException:
            if os.path.exists(part):
                os.unlink(part)
            raise

    # -- entries --

    def get(self, key):
        rows = self._sql("SELECT * FROM entries WHERE key = ?", (key,))
        return _entry(rows[0]) if rows else None

    def touch(self, key):
        self._sql("UPDATE entries SET used = ? WHERE key = ?", (store.now(), key))

    def put(self, entry):
        entry.created = entry.used = store.now()
        self._sql("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (entry.key, entry.job, entry.tool, json.dumps(entry.parts), entry.status,
                   entry.stdout, entry.stderr,
                   json.dumps([o.__dict__ for o in entry.outputs]), entry.size,
                   entry.created, entry.used))

    def nearest(self, tool, parts):
        """The newest entry of the same tool whose parts differ least from parts."""
        rows = self._sql("SELECT * FROM entries WHERE tool = ? ORDER BY created DESC LIMIT 200",
                         (tool,))
        entries = [_entry(r) for r in rows]
        return min(entries, key=lambda e: len(differences(e.parts, parts)), default=None)

    def entries(self):
        return [_entry(r) for r in self._sql("SELECT * FROM entries ORDER BY used DESC, rowid DESC")]

    def stats(self):
        count, size = self._sql("SELECT count(*), coalesce(sum(size), 0) FROM entries")[0]
        return {"entries": count, "size": size, "blobs": self._blob_bytes()}

    def _blob_bytes(self):
        total = 0
        for root, _, files in os.walk(self.blobs):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total

    def remove(self, keys):
        with self._lock:
            self._db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in keys])
        self._sweep()

    def clear(self):
        keys = [e.key for e in self.entries()]
        self.remove(keys)
        return len(keys)

    def gc(self, max_size):
        """Evict the least recently used entries until the entries' size fits."""
        evicted, total = [], self.stats()["size"]
        for entry in reversed(self.entries()):       # least recently used first
            if total <= max_size:
                break
            evicted.append(entry.key)
            total -= entry.size
        self.remove(evicted)
        return len(evicted), total

    def _sweep(self):
        """Remove the blobs no entry names, and what a dispatcher that died left in
        tmp/ (anything older than TMP_AGE: a capture of a running job is younger)."""
        named = set()
        for entry in self.entries():
            named.update([entry.stdout, entry.stderr, *(o.digest for o in entry.outputs)])
        for root, _, files in os.walk(self.blobs):
            for name in files:
                if name not in named:
                    os.unlink(os.path.join(root, name))
        old = time.time() - TMP_AGE
        for name in os.listdir(self.tmp):
            path = os.path.join(self.tmp, name)
            if os.lstat(path).st_mtime < old:
                os.unlink(path)


def differences(old, new):
    """[(part, detail)] where two keys' parts differ: the explanation of a miss."""
    out = []
    for part in sorted(set(old) | set(new)):
        a, b = old.get(part), new.get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for name in sorted(set(a) | set(b)):
                if a.get(name) != b.get(name):
                    out.append((part, name))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            out += [(part, f"{i}: {x!r} -> {y!r}") for i, (x, y) in enumerate(zip(a, b)) if x != y]
        else:
            out.append((part, None))
    return out


def copy(source, target, mode):
    """Copy bytes to a new private file (the kernel's copy_file_range, which clones
    where the file system can), then give it mode."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(source, "rb") as src:
            try:
                while os.copy_file_range(src.fileno(), fd, 1 << 30):
                    pass
            except OSError:                 # not between these file systems
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                src.seek(0)
                with os.fdopen(os.dup(fd), "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _entry(row):
    key, job, tool, parts, status, out, err, outputs, size, created, used = row
    return Entry(key=key, job=job, tool=tool, parts=json.loads(parts), status=status,
                 stdout=out, stderr=err, outputs=[Output(**o) for o in json.loads(outputs)],
                 size=size, created=created, used=used)


class _Memo:
    """The digest memo in the cache's database."""

    def __init__(self, cache):
        self.cache = cache

    def get(self, key):
        rows = self.cache._sql("SELECT digest, size, mtime, ctime FROM digests "
                               "WHERE dev = ? AND ino = ?", key[:2])
        if rows and tuple(rows[0][1:]) == key[2:]:
            return rows[0][0]
        return None

    def put(self, key, value):
        self.cache._sql("INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?, ?)",
                        (*key, value))
