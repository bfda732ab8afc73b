"""The reuse cache's storage (arvwrap.cache): blobs, entries, eviction, modes."""
import os
import stat
import threading

from arvwrap import cache as cache_mod


def entry(kept, key, files, tool="t", job="J"):
    outputs = []
    for path in files:
        digest, size = kept.put_file(str(path))
        outputs.append(cache_mod.Output(path=str(path), digest=digest,
                                        mode=os.stat(path).st_mode, size=size))
    empty = kept.new_tmp("empty")
    open(empty, "w").close()
    out, _ = kept.put_file(empty, move=True)
    e = cache_mod.Entry(key=key, job=job, tool=tool, parts={"argv": [key]}, stdout=out,
                        stderr=out, outputs=outputs, size=sum(o.size for o in outputs))
    kept.put(e)
    return e


def test_an_output_comes_back_as_a_copy_never_a_link(tmp_path):
    kept = cache_mod.Cache(str(tmp_path / "state"))
    out = tmp_path / "out.bin"
    out.write_bytes(b"result")
    out.chmod(0o640)
    e = entry(kept, "K", [out])
    out.unlink()
    kept.restore(kept.get("K").outputs[0])
    assert out.read_bytes() == b"result" and stat.S_IMODE(os.stat(out).st_mode) == 0o640
    blob = kept.blob_path(e.outputs[0].digest)
    assert os.stat(out).st_ino != os.stat(blob).st_ino
    out.write_bytes(b"changed through the pipeline's file")
    assert kept.intact(e.outputs[0].digest, 6)       # the cache is not written through


def test_a_damaged_blob_is_not_intact(tmp_path):
    kept = cache_mod.Cache(str(tmp_path / "state"))
    out = tmp_path / "out"
    out.write_bytes(b"abcdef")
    e = entry(kept, "K", [out])
    blob = kept.blob_path(e.outputs[0].digest)
    assert kept.intact(e.outputs[0].digest, 6)
    os.chmod(blob, 0o600)
    with open(blob, "r+b") as f:
        f.write(b"X")
    assert not kept.intact(e.outputs[0].digest, 6)
    os.unlink(blob)
    assert not kept.intact(e.outputs[0].digest, 6)


def test_gc_evicts_the_least_recently_used_and_their_unshared_blobs(tmp_path):
    kept = cache_mod.Cache(str(tmp_path / "state"))
    files = []
    for n in range(3):
        f = tmp_path / f"f{n}"
        f.write_bytes(bytes([65 + n]) * 1000)
        files.append(f)
    entry(kept, "old", [files[0]], job="J0")
    entry(kept, "mid", [files[1]], job="J1")
    entry(kept, "new", [files[2], files[1]], job="J2")   # shares f1's blob
    kept.touch("new")
    evicted, left = kept.gc(3000)        # entries: 1000 + 1000 + 2000 bytes
    assert (evicted, left) == (1, 3000)
    assert {e.key for e in kept.entries()} == {"mid", "new"}
    blobs = {name for _, _, names in os.walk(kept.blobs) for name in names}
    assert kept.get("mid").outputs[0].digest in blobs
    assert len(blobs) == 3                              # f1, f2 and the empty stream
    assert kept.clear() == 2 and not any(n for _, _, n in os.walk(kept.blobs))


def test_the_cache_is_private(tmp_path):
    kept = cache_mod.Cache(str(tmp_path / "state"))
    f = tmp_path / "f"
    f.write_text("x")
    entry(kept, "K", [f])
    for root, dirs, names in os.walk(kept.dir):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o700, root
        for name in names:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o600, name


def test_concurrent_writers_of_the_same_content_leave_one_whole_blob(tmp_path):
    kept = cache_mod.Cache(str(tmp_path / "state"))
    data = os.urandom(1 << 20)
    sources = []
    for n in range(8):
        f = tmp_path / f"s{n}"
        f.write_bytes(data)
        sources.append(f)
    digests = []
    threads = [threading.Thread(target=lambda f=f: digests.append(kept.put_file(str(f))[0]))
               for f in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(digests)) == 1
    with open(kept.blob_path(digests[0]), "rb") as f:
        assert f.read() == data
    assert not os.listdir(kept.tmp)


def test_differences_name_the_part_that_changed():
    old = {"argv": ["t", "a"], "inputs": {"x": "1"}, "env": {"A": "1"}, "cwd": "/a"}
    new = {"argv": ["t", "b"], "inputs": {"x": "2"}, "env": {"A": "1", "B": "2"}, "cwd": "/a"}
    assert cache_mod.differences(old, new) == [
        ("argv", "1: 'a' -> 'b'"), ("env", "B"), ("inputs", "x")]


def test_gc_removes_what_a_dead_dispatcher_left_in_tmp_but_not_what_is_in_use(tmp_path):
    kept = cache_mod.Cache(str(tmp_path / "state"))
    stale, fresh = kept.new_tmp("fd1"), kept.new_tmp("fd2")
    for path in (stale, fresh):
        open(path, "w").close()
    os.utime(stale, (1, 1))
    kept.gc(1 << 30)
    assert not os.path.exists(stale) and os.path.exists(fresh)
