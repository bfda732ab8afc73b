"""The text views of the records, from records made here."""
from arvwrap import listing


def record(id, parent=None, run=None, state="exited", **fields):
    base = {"id": id, "parent": parent, "run": run or id, "kind": "job" if parent else "run",
            "argv": ["tool", id], "state": state, "exit_status": 0 if state == "exited" else None,
            "signal": None, "backend": "local", "backend_id": None, "cpus": 1, "memory": None,
            "started": "2026-12-01T10:00:00.000Z", "ended": "2026-12-01T10:00:02.000Z",
            "cpu_seconds": None, "max_rss": None}
    return {**base, **fields}


RECORDS = [record("R"), record("A", "R", "R"), record("B", "A", "R", cpu_seconds=1.0),
           record("C", "A", "R", state="failed"), record("S", run="S", state="running",
                                                          ended=None)]


def test_descendants_and_the_tree_follow_parent_links_to_any_depth():
    assert sorted(r["id"] for r in listing.descendants(RECORDS, "R")) == ["A", "B", "C"]
    lines = listing.tree(RECORDS, "R").splitlines()
    assert [line.split()[0] for line in lines] == ["JOB", "R", "A", "B", "C"]
    assert [len(line) - len(line.lstrip()) for line in lines[1:]] == [0, 2, 4, 4]


def test_runs_count_their_jobs_by_state():
    text = listing.runs(RECORDS)
    [r_line] = [line for line in text.splitlines() if line.startswith("R ")]
    assert "2 exited" in r_line and "1 failed" in r_line
    assert listing.runs([]) == "no runs recorded"


def test_efficiency_is_cpu_time_over_what_was_asked_for_the_time_it_ran():
    assert listing.efficiency(RECORDS[2]) == 0.5          # 1 s of CPU in 2 s on 1 CPU
    assert listing.efficiency(RECORDS[1]) is None         # not measured
    text = listing.show(RECORDS[2], RECORDS)
    assert "cpu efficiency  50% of 1 CPU for 2.0s" in text


def test_durations_and_sizes_read_as_people_write_them():
    assert [listing.seconds(s) for s in (None, 0.0234, 2.5, 125, 7300)] == [
        "-", "0.023s", "2.5s", "2m05s", "2h01m"]
    assert [listing.size(n) for n in (None, 512, 1536, 3 << 30)] == ["-", "512B", "1.5K", "3.0G"]
