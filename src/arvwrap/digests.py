"""Content digests of files, each file hashed once while it does not change.

A digest is remembered under the file's identity (device, inode, size, mtime, ctime):
a file rewritten with the same bytes keeps its digest (only its identity is new,
so it is hashed again), and a file whose mtime was reset by `touch -d` or a copy
with `cp -p` still has a new ctime, so it is never taken for unchanged. The memo
lives in the reuse cache's database (arvwrap.cache), so it outlasts a dispatcher.
"""
import hashlib
import os
import stat


def identity(st):
    """What must stay the same for a remembered digest to hold."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_of(path):
    """Hex SHA-256 of a file's bytes (read through, never mapped)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Digests:
    """digest(path) with a memo; memo is a mapping-like object with get/put (the
    cache's table), or None for one in memory."""

    def __init__(self, memo=None):
        self.memo = memo if memo is not None else _InMemory()

    def digest(self, path):
        """(hex digest, stat) of a regular file; ValueError if it is not one."""
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        key = identity(st)
        known = self.memo.get(key)
        if known:
            return known, st
        value = sha256_of(path)
        after = os.stat(path)
        if identity(after) == key:          # not written while we read it
            self.memo.put(key, value)
        return value, after


class _InMemory(dict):
    def put(self, key, value):
        self[key] = value
