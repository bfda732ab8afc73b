"""Text views of the job records: the runs, the provenance tree, one record in full.

Pure functions of the records (dicts as arvwrap.store gives them); the commands
in arvwrap.commands print what they return.
"""
import datetime
import shlex

from arvwrap import store

FAILED = ("failed", "signaled", "cancelled")


def parse_time(stamp):
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc) if stamp else None


def duration(record, now=None):
    """Seconds the job ran (up to now while it runs); None if it never started."""
    start = parse_time(record.get("started"))
    if start is None:
        return None
    end = parse_time(record.get("ended")) or now or datetime.datetime.now(datetime.timezone.utc)
    return max(0.0, (end - start).total_seconds())


def seconds(value):
    if value is None:
        return "-"
    if value < 1:
        return f"{value:.3f}s"
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{int(value // 60)}m{int(value % 60):02d}s"
    return f"{int(value // 3600)}h{int(value % 3600 // 60):02d}m"


def size(value):
    if not value:
        return "-"
    for unit in ("B", "K", "M", "G", "T"):
        if value < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024


def result(record):
    """exit N / sig N / the state."""
    if record["state"] == "exited":
        return f"exit {record['exit_status']}"
    if record["state"] == "signaled":
        return f"sig {record['signal']}"
    return record["state"]


def command(record, width=60):
    text = shlex.join(record["argv"] or [])
    return text if len(text) <= width else text[:width - 3] + "..."


def efficiency(record):
    """CPU time used against what was asked for the time it ran, or None."""
    ran = duration(record)
    if record.get("cpu_seconds") is None or not ran or not record.get("cpus"):
        return None
    return record["cpu_seconds"] / (ran * record["cpus"])


def children_of(records):
    """{parent id: [records, oldest first]}."""
    out = {}
    for r in sorted(records, key=lambda r: r["id"]):
        out.setdefault(r["parent"], []).append(r)
    return out


def descendants(records, job_id):
    """Every record below job_id (any depth)."""
    below, frontier = [], [job_id]
    kids = children_of(records)
    while frontier:
        for child in kids.get(frontier.pop(), ()):
            below.append(child)
            frontier.append(child["id"])
    return below


def table(rows):
    """Left-aligned columns; the last one is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
                     for row in rows)


def runs(records):
    """The top-level runs, newest first: state, duration, counts of their jobs by state."""
    tops = [r for r in records if not r["parent"]]
    if not tops:
        return "no runs recorded"
    below = {}
    for r in records:
        if r["parent"]:
            below.setdefault(r["run"], []).append(r)
    rows = [("RUN", "STATE", "STARTED", "DURATION", "JOBS", "COMMAND")]
    for run in sorted(tops, key=lambda r: r["id"], reverse=True):
        counts = {}
        for job in below.get(run["id"], ()):
            counts[job["state"]] = counts.get(job["state"], 0) + 1
        summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"
        rows.append((run["id"], result(run), (run["started"] or "")[:19].replace("T", " "),
                     seconds(duration(run)), summary, command(run, 50)))
    return table(rows)


def tree(records, root=None):
    """The provenance tree: every run (or the one given), its jobs below it."""
    kids = children_of(records)
    tops = ([r for r in records if r["id"] == root] if root
            else [r for r in records if not r["parent"]][::-1])
    rows = [("JOB", "RESULT", "BACKEND", "ASKED", "USED", "TIME", "COMMAND")]

    def walk(record, depth):
        used = "-"
        if record.get("cpu_seconds") is not None:
            used = f"{record['cpu_seconds']:.1f}s cpu, {size(record.get('max_rss'))}"
        asked = f"{record['cpus'] or 0:g} cpu, {size(record['memory'])}"
        backend = record["backend"] or "-"
        if record.get("backend_id"):
            backend += f" {record['backend_id']}"
        rows.append(("  " * depth + record["id"], result(record), backend, asked, used,
                     seconds(duration(record)), command(record, 50)))
        for child in kids.get(record["id"], ()):
            walk(child, depth + 1)

    for top in sorted(tops, key=lambda r: r["id"], reverse=True):
        walk(top, 0)
    return table(rows) if len(rows) > 1 else f"no run {root}" if root else "no runs recorded"


FIELDS = ("id", "kind", "run", "parent", "state", "exit_status", "signal", "backend",
          "backend_id", "host", "cwd", "created", "started", "ended", "queued_seconds",
          "cpus", "memory", "time_limit", "cpu_seconds", "max_rss", "rule", "reused_from",
          "reason")


def show(record, records, log_tail=None):
    """One record in full, what it used beside what it asked, and its children."""
    lines = [f"{'argv':15} {shlex.join(record['argv'] or [])}"]
    for name in FIELDS:
        value = record.get(name)
        if value is None:
            continue
        if name in ("memory", "max_rss"):
            value = f"{value} ({size(value)})"
        lines.append(f"{name:15} {value}")
    ran = duration(record)
    lines.append(f"{'duration':15} {seconds(ran)}")
    eff = efficiency(record)
    if eff is not None:
        cpus = record["cpus"]
        lines.append(f"{'cpu efficiency':15} {eff:.0%} of {cpus:g} CPU{'s' * (cpus != 1)} for "
                     f"{seconds(ran)}")
    if record.get("max_rss") and record.get("memory"):
        lines.append(f"{'memory use':15} {record['max_rss'] / record['memory']:.0%} of "
                     f"{size(record['memory'])}")
    kids = children_of(records).get(record["id"], [])
    if kids:
        counts = {}
        for k in descendants(records, record["id"]):
            counts[k["state"]] = counts.get(k["state"], 0) + 1
        lines.append(f"{'below':15} {len(kids)} direct, "
                     + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if log_tail:
        lines.append("stderr (last lines kept):")
        lines += ["  " + line for line in log_tail.splitlines()]
    return "\n".join(lines)


def is_final(record):
    return record["state"] in store.FINAL_STATES
