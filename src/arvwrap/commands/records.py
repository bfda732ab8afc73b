"""The records: `arv-wrap jobs`, `show`, `logs`, `cancel`, `gc`."""
import json
import os
import socket
import sys
import time

from arvwrap import backends, listing, paths, protocol, runs, store
from arvwrap.errors import UsageError

LOCAL_LOGS = ("its stderr went straight to the caller's own stderr, which arv-wrap never "
              "copies (so that it stays the caller's descriptor); redirect the pipeline's "
              "stderr to a file (2> log) to keep it")


def open_store():
    db = store.Store(paths.state_dir())
    runs.close_ended(db)
    return db


def find(records, word):
    """The record a user named: its id, or a unique prefix or suffix of one."""
    exact = [r for r in records if r["id"] == word]
    if exact:
        return exact[0]
    near = [r for r in records if word and (r["id"].startswith(word) or r["id"].endswith(word))]
    if len(near) == 1:
        return near[0]
    raise UsageError(f"no job {word}" if not near else
                     f"{word} names {len(near)} jobs; give more of the id")


def one_word(words, what):
    if len(words) != 1:
        raise UsageError(f"expected one {what} (see arv-wrap --help)")
    return words[0]


def jobs(options, words):
    records = open_store().list(run=options.get("run"))
    if options.get("json"):
        json.dump(records, sys.stdout, indent=1)
        print()
        return 0
    root = find(records, words[0])["id"] if words else None
    if options.get("tree") or root or options.get("run"):
        print(listing.tree(records, root or options.get("run")))
    else:
        print(listing.runs(records))
    return 0


def log_path(job_id):
    return os.path.join(paths.state_dir(), "logs", f"{job_id}.stderr")


def log_tail(job_id, lines=20):
    try:
        with open(log_path(job_id), "rb") as f:
            text = f.read()[-16384:].decode(errors="replace")
    except OSError:
        return None
    return "\n".join(text.splitlines()[-lines:])


def show(options, words):
    records = open_store().list()
    record = find(records, one_word(words, "JOB"))
    failed = record["state"] in listing.FAILED or (record["exit_status"] or 0) != 0
    print(listing.show(record, records, log_tail(record["id"]) if failed else None))
    return 0


def logs(options, words):
    db = open_store()
    record = find(db.list(), one_word(words, "JOB"))
    try:
        log = open(log_path(record["id"]), "rb")
    except FileNotFoundError:
        relays = getattr(backends.find_quietly(record["backend"] or ""), "relays_streams", True)
        why = LOCAL_LOGS if not relays else "nothing of its stderr was kept"
        print(f"arv-wrap: job {record['id']} ran on the {record['backend']} backend: {why}",
              file=sys.stderr)
        return 1
    with log:
        out = sys.stdout.buffer
        while True:
            chunk = log.read(65536)
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            if not options.get("follow") or db.get(record["id"])["state"] in store.FINAL_STATES:
                out.write(log.read())    # what came between the read and the check
                return 0
            time.sleep(0.2)


def cancel(options, words):
    db = open_store()
    records = db.list()
    record = find(records, one_word(words, "JOB"))
    live = [r for r in [record, *listing.descendants(records, record["id"])]
            if r["state"] in ("queued", "running") and r["kind"] == "job"]
    if not live and record["state"] not in ("queued", "running"):
        print(f"arv-wrap: job {record['id']} is already {record['state']}", file=sys.stderr)
        return 1
    answer = ask_dispatcher(protocol.cancel_message(record["id"]))
    if answer != "ok":
        print(f"arv-wrap: the dispatcher does not know job {record['id']} ({answer})",
              file=sys.stderr)
        return 1
    print(f"cancelled {record['id']}" + (f" and {len(live) - (record in live)} below it"
                                        if len(live) > (record in live) else ""))
    return 0


def ask_dispatcher(message, timeout=10):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(paths.socket_path())
            sock.sendall(message)
            return sock.makefile().readline().strip()
    except OSError as e:
        return f"no dispatcher: {e.strerror or e}"


def gc(options, _words):
    age = options.get("older_than")
    if not age:
        raise UsageError("gc needs --older-than AGE (e.g. 30d)")
    try:
        seconds = store.parse_duration(age)
    except ValueError as e:
        raise UsageError(f"--older-than: {e}") from None
    removed_runs, removed_jobs = open_store().gc(seconds)
    print(f"removed {removed_runs} runs and {removed_jobs} jobs that ended more than {age} ago")
    return 0
