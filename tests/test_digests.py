"""Content digests, remembered while a file keeps its identity (arvwrap.digests)."""
import hashlib
import os

import pytest

from arvwrap import digests


class CountingMemo(dict):
    def __init__(self):
        super().__init__()
        self.puts = 0

    def put(self, key, value):
        self.puts += 1
        self[key] = value


def test_a_file_is_hashed_once_while_it_does_not_change(tmp_path):
    f = tmp_path / "data"
    f.write_bytes(b"x" * 3_000_000)
    memo = CountingMemo()
    d = digests.Digests(memo)
    value = d.digest(str(f))[0]
    assert value == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    assert d.digest(str(f))[0] == value and memo.puts == 1
    f.write_bytes(b"y" * 3_000_000)                 # same size, new content
    assert d.digest(str(f))[0] == hashlib.sha256(b"y" * 3_000_000).hexdigest()
    assert memo.puts == 2


def test_a_reset_mtime_does_not_hide_a_change(tmp_path):
    """touch -d or cp -p give back the old mtime; the ctime still moves."""
    f = tmp_path / "data"
    f.write_bytes(b"aaaa")
    st = os.stat(f)
    d = digests.Digests()
    before = d.digest(str(f))[0]
    f.write_bytes(b"bbbb")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert d.digest(str(f))[0] != before


def test_only_regular_files_have_digests(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        digests.Digests().digest(str(tmp_path))
