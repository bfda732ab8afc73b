"""The reuse key and the outputs of a job (arvwrap.reuse), on real files."""
import os

import pytest

from arvwrap import digests, reuse
from arvwrap.whitelist import Reuse

ENV = {b"PATH": b"/usr/bin:/bin", b"LANG": b"C"}


@pytest.fixture
def work(tmp_path):
    (tmp_path / "in.txt").write_text("hello\n")
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\ncat \"$@\"\n")
    tool.chmod(0o755)
    return tmp_path


def plan(work, argv, spec=Reuse(), env=ENV, stdin="null", program=None):
    return reuse.plan(spec, str(program or work / "tool"), [a.encode() for a in argv],
                      str(work).encode(), env, digests.Digests(), stdin)


def test_the_same_call_has_the_same_key_and_each_part_changes_it(work):
    first = plan(work, ["tool", "in.txt", "-o", "out.txt"])
    assert plan(work, ["tool", "in.txt", "-o", "out.txt"]).key == first.key
    assert first.parts["inputs"] == {"in.txt": digests.sha256_of(work / "in.txt")}
    assert "interpreter" in first.parts["program"]          # a #! script: /bin/sh counts
    changed = {
        "argv": plan(work, ["tool", "in.txt", "-o", "other.txt"]),
        "env": plan(work, ["tool", "in.txt", "-o", "out.txt"], env={**ENV, b"LANG": b"de"}),
        "stdin": plan(work, ["tool", "in.txt", "-o", "out.txt"], stdin="tty"),
    }
    for part, other in changed.items():
        assert other.key != first.key, part
    (work / "in.txt").write_text("hullo\n")
    assert plan(work, ["tool", "in.txt", "-o", "out.txt"]).key != first.key
    (work / "tool").write_text("#!/bin/sh\ncat \"$@\" # changed\n")
    (work / "in.txt").write_text("hello\n")
    assert plan(work, ["tool", "in.txt", "-o", "out.txt"]).key != first.key


def test_an_input_rewritten_with_the_same_bytes_keeps_the_key(work):
    """A new mtime is not a new input (Nextflow's false misses)."""
    first = plan(work, ["tool", "in.txt"])
    os.utime(work / "in.txt", (1, 1))
    (work / "in.txt").write_text("hello\n")
    assert plan(work, ["tool", "in.txt"]).key == first.key


def test_ignored_flags_and_variables_do_not_change_the_key(work):
    spec = Reuse(ignore=("-t", "--threads"), env=("OMP_NUM_THREADS",))
    first = plan(work, ["tool", "-t", "4", "--threads=4", "in.txt"], spec)
    assert plan(work, ["tool", "-t", "8", "--threads=2", "in.txt"], spec).key == first.key
    noisy = {**ENV, b"OMP_NUM_THREADS": b"8", b"USER": b"someone", b"ARV_WRAP_JOB": b"X",
             b"MAKEFLAGS": b" -j16 --jobserver-auth=3,4", b"PWD": b"/elsewhere"}
    assert plan(work, ["tool", "-t", "1", "in.txt"], spec, env=noisy).key == first.key


def test_a_search_path_counts_only_by_the_directories_that_exist(work):
    first = plan(work, ["tool"], env={b"PATH": b"/usr/bin:/bin"})
    same = plan(work, ["tool"], env={b"PATH": b"/no/such:/usr/bin:/usr/bin::/bin"})
    assert same.key == first.key
    assert plan(work, ["tool"], env={b"PATH": f"{work}:/usr/bin:/bin".encode()}).key != first.key


def test_environment_values_are_not_kept_in_the_parts(work):
    secret = b"s3cr3t-value"
    parts = plan(work, ["tool"], env={**ENV, b"API_TOKEN": secret}).parts
    assert "API_TOKEN" in parts["env"] and secret.decode() not in repr(parts)


def test_outputs_are_what_argv_names_and_the_job_created_or_its_output_flags_wrote(work):
    (work / "old.txt").write_text("old\n")
    p = plan(work, ["tool", "in.txt", "new.txt", "-o", "old.txt", "missing/dir/x"],
             Reuse(outputs=("-o",)))
    assert "old.txt" not in p.parts["inputs"]       # an output flag's value is not an input
    (work / "new.txt").write_text("new\n")
    (work / "old.txt").write_text("rewritten\n")
    assert sorted(reuse.outputs(p)) == [str(work / "new.txt"), str(work / "old.txt")]


def test_siblings_of_named_files_are_outputs(work):
    p = plan(work, ["tool", "index", "in.txt"], Reuse(siblings=(".idx", ".bai")))
    (work / "in.txt.idx").write_text("index\n")
    assert reuse.outputs(p) == [str(work / "in.txt.idx")]


@pytest.mark.parametrize("damage, why", [
    (lambda w: (w / "in.txt").write_text("changed\n"), "it changed"),
    (lambda w: (w / "in.txt").unlink(), "it removed"),
    (lambda w: (w / "made").mkdir(), "not a regular file"),
])
def test_a_job_whose_writes_cannot_be_replayed_is_not_kept(work, damage, why):
    p = plan(work, ["tool", "in.txt", "made"])
    damage(work)
    with pytest.raises(reuse.NotReusable, match=why):
        reuse.outputs(p)


def test_how_stdin_enters_the_key(work):
    with open(os.devnull) as null, open(work / "in.txt") as f:
        assert reuse.stdin_part(null.fileno(), "auto") == "null"
        assert reuse.stdin_part(f.fileno(), "auto") == "file"
        assert reuse.stdin_part(f.fileno(), "none") == "none"
    r, w = os.pipe()
    try:
        assert reuse.stdin_part(r, "auto") == "spool"
    finally:
        os.close(r)
        os.close(w)
