"""The reuse cache through its commands: cache ls, stats, gc, clear."""
import subprocess

import pytest

from conftest import arv_wrap, job_records, write_tool


def out(*args, env):
    result = arv_wrap(*args, env=env, capture_output=True, text=True)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture
def kept(tools, base_env, whitelist_file, tmp_path):
    """Two kept results of `blob N` (N KiB of output in a file)."""
    write_tool(tools, "blob", 'head -c "$(( $1 * 1024 ))" /dev/zero > "$2"\n')
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file("tools:\n  - name: blob\n    reuse: true\n")
    for size in (4, 8):
        assert arv_wrap("--reuse", "--", "blob", str(size), f"out{size}", env=base_env,
                        cwd=tmp_path,
                        stdin=subprocess.DEVNULL).returncode == 0
    return base_env


def test_ls_and_stats_show_what_is_kept(kept):
    status, text, _ = out("cache", "ls", env=kept)
    assert status == 0
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["JOB", "TOOL", "SIZE"] and len(lines) == 3
    ids = {r["id"] for r in job_records(kept)}
    assert {line.split()[0] for line in lines[1:]} == ids
    assert "8.0K" in lines[1] and "4.0K" in lines[2]           # the most recently used first
    status, text, _ = out("cache", "stats", env=kept)
    assert status == 0 and text.startswith("entries: 2   results: 12.0K")


def test_gc_evicts_down_to_the_size_and_clear_removes_all(kept):
    status, text, _ = out("cache", "gc", "--max-size", "10K", env=kept)
    assert (status, text) == (0, "evicted 1 entries; 8.0K kept\n")
    assert out("cache", "clear", env=kept)[:2] == (0, "removed 1 entries\n")
    assert "entries: 0" in out("cache", "stats", env=kept)[1]


@pytest.mark.parametrize("args, said", [
    ((), "cache needs one of ls, stats, clear, gc"),
    (("gc",), "cache gc needs --max-size SIZE"),
    (("gc", "--max-size", "lots"), "--max-size: not a size: 'lots'"),
    (("ls", "--max-size", "1G"), "--max-size goes with cache gc"),
])
def test_bad_cache_commands_say_what_is_wrong_in_one_line(base_env, args, said):
    status, _, err = out("cache", *args, env=base_env)
    assert status == 2 and err.startswith(f"arv-wrap: {said}") and err.count("\n") == 1
