"""The end of a run whose process is gone without recording it.

`arv-wrap env` prints its variables and leaves: the run it opens belongs to the
shell that evals them, and the programs that shell starts. `arv-wrap COMMAND` (and
`doctor`) record their run's end themselves, unless they are killed first (SIGKILL,
the OOM killer). Either record names the process it waits for (pid and start time,
so a recycled pid is not taken for it): the run is ended once that process has gone
and none of the run's jobs is queued or running. The dispatcher checks now and
then, and so do the commands that show records.
"""
import socket

from arvwrap import store


def start_time(pid):
    """The process's start time in clock ticks after boot, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def shell_fields(pid):
    """The record fields naming the process a run's end waits for."""
    return {"shell_pid": pid, "shell_start": start_time(pid)}


def close_ended(db):
    """End the runs of this host whose shell is gone and whose jobs have all ended."""
    open_runs = db.query("WHERE kind = 'run' AND state = 'running' AND shell_pid IS NOT NULL "
                         "AND host = ?", [socket.gethostname()])
    for run in open_runs:
        if start_time(run["shell_pid"]) == run["shell_start"]:
            continue
        busy = db.query("WHERE run = ? AND kind = 'job' AND state IN ('queued', 'running')",
                        [run["id"]])
        if busy:
            continue
        if run["argv"][:2] == ["arv-wrap", "env"]:
            db.update(run["id"], state="exited", ended=last_end(db, run), reason=(
                "its shell ended (a shell's exit status is not known to arv-wrap)"))
        else:
            db.update(run["id"], state="failed", ended=last_end(db, run), reason=(
                "arv-wrap ended before it recorded the run's end (killed?)"))


def last_end(db, run):
    ends = [r["ended"] for r in db.query("WHERE run = ? AND ended IS NOT NULL", [run["id"]])]
    return max(ends) if ends else store.now()
