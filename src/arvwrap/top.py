"""`arv-wrap top [RUN]`: a live terminal view of running pipelines, read from the store.

top is a command of its own: it draws on its own terminal (curses, from Python's
standard library) and never on a pipeline's streams. It reads the state dir's
records read-only (a `mode=ro` SQLite connection with `query_only`, one short
autocommit read per refresh, so it never writes the database and never holds a
lock that would make the dispatcher wait), and redraws about once a second.

Per run (the running ones, or the one named): its jobs by state, the running and
queued jobs with their elapsed time, backend id and the CPUs and memory asked
against used, the slowest finished jobs and the failures with their reason. What
a job used is in its record once it ends (cpu_seconds, max_rss); for a running
local job on this host it is sampled from /proc (the tool's process tree), for
other running jobs it is not known yet and shows as `-`.

Every line is cut to the terminal's width (never wrapped), so it works over SSH in
an 80-column terminal; `q` or Ctrl-C leaves with status 0 and the terminal as it
was. With stdout not a terminal, one snapshot is printed as plain text (lines not
cut) and top exits 0.
"""
import datetime
import json
import locale
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import sys
import time
import unicodedata
import urllib.parse

from arvwrap import store

REFRESH = 1.0           # seconds between redraws
ACTIVE = ("queued", "running")
MAX_RUNNING, MAX_QUEUED, MAX_SLOWEST, MAX_FAILED = 8, 3, 3, 3
SHORT_ID = 8            # a job id is shown by its last (random) characters...
FULL_IDS_FROM = 110     # ...unless the terminal is at least this wide (or not a terminal)


class Reader:
    """Read-only access to a state dir's records.

    Unlike store.Store, it creates nothing (no state dir, no database, no schema)
    and cannot write: each read opens the database with SQLite's `mode=ro` and
    `PRAGMA query_only`, runs one SELECT in autocommit mode and closes it, so no
    snapshot or lock outlives the read (WAL readers never block the writer), and a
    database replaced or removed meanwhile is simply read anew. (SQLite may create
    the empty `-wal`/`-shm` companions beside a WAL database, as for any reader,
    with the database's own 0600 mode; the database itself is never modified.)
    """

    def __init__(self, state_dir):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "jobs.sqlite")

    def query(self, where="", params=()):
        """Records matching `where` (the SQL after FROM jobs), argv decoded; None
        when the state dir holds no database (or no table) yet."""
        if not os.path.isfile(self.path):
            return None
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        db = sqlite3.connect(uri, uri=True, timeout=5, isolation_level=None)
        try:
            db.execute("PRAGMA query_only = ON")
            cursor = db.execute(f"SELECT * FROM jobs {where}", list(params))
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):    # the database is being created right now
                return None
            raise
        finally:
            db.close()
        records = []
        for row in rows:
            # a value stored as the BLOB of its bytes (not UTF-8) reads as store.text names it
            record = {name: store.text(value) for name, value in zip(names, row)}
            try:
                record["argv"] = json.loads(record.get("argv") or "[]")
            except ValueError:
                record["argv"] = [str(record.get("argv"))]
            records.append(record)
        return records

    def has_records(self):
        return bool(self.query("LIMIT 1"))

    def get(self, record_id):
        rows = self.query("WHERE id = ?", [record_id])
        return rows[0] if rows else None

    def running_runs(self):
        return self.query("WHERE kind = 'run' AND state IN ('queued', 'running') "
                          "ORDER BY id DESC") or []

    def latest_run(self):
        rows = self.query("WHERE kind = 'run' ORDER BY id DESC LIMIT 1")
        return rows[0] if rows else None

    def jobs_of(self, run_ids):
        """The job records of these runs, newest first."""
        if not run_ids:
            return []
        marks = ", ".join("?" for _ in run_ids)
        return self.query(f"WHERE run IN ({marks}) AND kind = 'job' ORDER BY id DESC",
                          list(run_ids)) or []

    def resolve(self, ident):
        """The run named by ident: a run id, a job id (its run), or a unique prefix
        or suffix of one (top shows job ids by their last characters).
        Returns (run_id, None) or (None, why not)."""
        exact = self.get(ident)
        if exact is None and ident.isalnum():
            ident = ident.upper()
            rows = self.query("WHERE id LIKE ? OR id LIKE ?", [ident + "%", "%" + ident]) or []
            if len(rows) > 1:
                return None, f"{ident} names {len(rows)} records; give more of the id"
            exact = rows[0] if rows else None
        if exact is None:
            return None, f"no run or job {ident} in {self.state_dir}"
        return (exact.get("run") or exact["id"]), None


# ---- what a running local job uses now, from /proc -------------------------------

class ProcSampler:
    """CPU (cores in use) and resident memory of running local jobs of this host,
    summed over the tool's process tree. A record's pid counts only if that process
    began between the job's arrival and its start (a reused pid does not)."""

    def __init__(self, proc="/proc"):
        self.proc = proc
        self.host = socket.gethostname()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.boot = self._boot_time()
        self._last = {}       # job id -> (monotonic time, cpu seconds)

    def _boot_time(self):
        try:
            with open(os.path.join(self.proc, "stat")) as f:
                for line in f:
                    if line.startswith("btime "):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def _processes(self):
        """pid -> (ppid, cpu seconds incl. reaped children, start (epoch s), rss bytes)."""
        table = {}
        try:
            names = os.listdir(self.proc)
        except OSError:
            return table
        for name in names:
            if not name.isdigit():
                continue
            try:
                with open(os.path.join(self.proc, name, "stat"), "rb") as f:
                    data = f.read()
            except OSError:
                continue                       # gone meanwhile
            fields = data[data.rfind(b")") + 2:].split()   # after "pid (comm) "
            try:
                ppid = int(fields[1])
                ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
                start = self.boot + int(fields[19]) / self.tick
                rss = int(fields[21]) * self.page
            except (IndexError, ValueError):
                continue
            table[int(name)] = (ppid, ticks / self.tick, start, rss)
        return table

    def sample(self, records, now_wall=None, now_mono=None):
        """{job id: (cores in use or None, rss bytes)} for the running local jobs
        of this host among records."""
        candidates = [r for r in records
                      if r.get("state") == "running" and r.get("backend") == "local"
                      and (r.get("host") in (None, self.host))
                      and str(r.get("backend_id") or "").isdigit()]
        if not candidates or self.boot is None:
            return {}
        now_wall = time.time() if now_wall is None else now_wall
        now_mono = time.monotonic() if now_mono is None else now_mono
        table = self._processes()
        children = {}
        for pid, (ppid, *_rest) in table.items():
            children.setdefault(ppid, []).append(pid)
        out, seen = {}, set()
        for r in candidates:
            pid = int(r["backend_id"])
            if pid not in table or not self._plausible(r, table[pid][2]):
                continue
            cpu = rss = 0
            stack, tree = [pid], set()
            while stack:
                p = stack.pop()
                if p in tree:
                    continue
                tree.add(p)
                cpu += table[p][1]
                rss += table[p][3]
                stack.extend(children.get(p, ()))
            last = self._last.get(r["id"])
            if last and now_mono > last[0]:
                cores = max(0.0, (cpu - last[1]) / (now_mono - last[0]))
            else:                              # first look: the average since its start
                started = epoch(r.get("started"))
                cores = cpu / (now_wall - started) if started and now_wall > started else None
            self._last[r["id"]] = (now_mono, cpu)
            seen.add(r["id"])
            out[r["id"]] = (cores, rss)
        for job_id in set(self._last) - seen:
            del self._last[job_id]
        return out

    @staticmethod
    def _plausible(record, proc_start):
        created, started = epoch(record.get("created")), epoch(record.get("started"))
        if started is None:
            return False
        return (created or started) - 2 <= proc_start <= started + 2


# ---- formatting ------------------------------------------------------------------

def epoch(stamp):
    """ISO 8601 UTC (2026-12-01T09:01:50.123Z) -> seconds since the epoch, or None."""
    if not stamp:
        return None
    try:
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except (TypeError, ValueError):
        return None


def duration(seconds):
    """0.04s, 1.2s, 42s, 3m12s, 1h02m, 2d03h."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 0.995:
        return f"{seconds:.2f}s"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n):
    """Bytes, powers of 1024, at most 4 characters: 512B 300M 1.2G 8G."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "K", "M", "G", "T", "P"):
        if n < 999.5 or unit == "P":
            break
        n /= 1024
    if unit != "B" and n < 9.95 and round(n, 1) != round(n):
        return f"{n:.1f}{unit}"
    return f"{n:.0f}{unit}"


def number(x):
    """CPUs: 2, 0.5, 12; cores in use: 1.9, 0.0, 14."""
    if x is None:
        return "-"
    if x >= 9.95 or float(x).is_integer():
        return f"{x:.0f}"
    return f"{x:.1f}" if x >= 0.95 else f"{x:.2f}".rstrip("0").rstrip(".")


def command(argv, basename=True):
    """One line for an argv: the program's basename (for jobs) and its arguments,
    quoted as a shell would need them."""
    if not argv:
        return "?"
    argv = list(argv)
    if basename:
        argv[0] = os.path.basename(argv[0]) or argv[0]
    return shlex.join(argv)


def printable(text):
    """text with what a terminal would act on (control characters, line breaks) or
    could not show (surrogate-escaped bytes) written as escapes, on one line."""
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:             # an undecodable byte, surrogateescape'd
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\t":
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cs", "Cn", "Zl", "Zp"):
            out.append(f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def cells(ch):
    """How many terminal columns a character takes."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def width_of(text):
    return sum(cells(ch) for ch in text)


def clip(text, width, marker="~"):
    """text cut to at most width columns (the last one a marker when cut)."""
    if width is None or width_of(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        w = cells(ch)
        if used + w > width - len(marker):
            break
        out.append(ch)
        used += w
    return "".join(out) + marker


# ---- the view ----------------------------------------------------------------------

class View:
    """What one refresh read: the runs to show and their jobs."""

    def __init__(self, state_dir, runs=(), jobs=(), empty=False, idle=False, error=None,
                 usage=None, now=None):
        self.state_dir = state_dir
        self.runs = list(runs)
        self.jobs = {}
        for job in jobs:
            self.jobs.setdefault(job.get("run"), []).append(job)
        self.empty = empty        # no records at all
        self.idle = idle          # no run is running: runs holds the latest one
        self.error = error
        self.usage = usage or {}
        self.now = time.time() if now is None else now


def collect(reader, run=None, sampler=None, now=None):
    """Read one View: the given run, or every running one."""
    now = time.time() if now is None else now
    try:
        if not reader.has_records():
            return View(reader.state_dir, empty=True, now=now)
        if run:
            record = reader.get(run)
            runs = [record] if record else []
            idle = False
        else:
            runs = reader.running_runs()
            idle = not runs
            if idle:
                latest = reader.latest_run()
                runs = [latest] if latest else []
        jobs = reader.jobs_of([r["id"] for r in runs])
    except (OSError, sqlite3.Error) as e:
        return View(reader.state_dir, error=f"cannot read {reader.path}: {e}", now=now)
    usage = sampler.sample(jobs, now_wall=now) if sampler else {}
    return View(reader.state_dir, runs, jobs, idle=idle, usage=usage, now=now)


def result(job):
    """How a finished job ended, in at most 7 characters."""
    state = job.get("state")
    if state == "exited":
        text = f"exit {job.get('exit_status')}"
        return text if len(text) <= 7 else text.replace(" ", "")
    if state == "signaled":
        try:
            return signal.Signals(job.get("signal")).name
        except (ValueError, TypeError):
            return f"sig {job.get('signal')}"
    return {"cancelled": "cancel"}.get(state, state or "?")


def failed(job):
    state = job.get("state")
    return state in ("failed", "signaled", "cancelled") or (
        state == "exited" and job.get("exit_status") not in (0, None))


def render(view, width=None, marker="~", hint=""):
    """The view as [(text, style)] lines, the first a title (hint in it), each cut
    to width columns (None: not cut), marker ending a cut line.
    Styles: 'title', 'run', 'head', 'bad', or None."""
    full_ids = width is None or width >= FULL_IDS_FROM
    id_width = 26 if full_ids else SHORT_ID
    lines = []

    def add(text, style=None):
        lines.append((clip(printable(text), width, marker), style))

    clock = time.strftime("%H:%M:%S", time.localtime(view.now))
    add(f"arv-wrap top  {clock}  {hint}{view.state_dir}", "title")
    if view.error:
        add(view.error, "bad")
        return lines
    if view.empty:
        add(f"no records in {view.state_dir}")
        return lines
    if view.idle:
        if not view.runs:
            add("no running pipelines, and no runs")
            return lines
        ended = epoch(view.runs[0].get("ended"))
        add("no running pipelines; the latest run" + (
            f", ended {duration(view.now - ended)} ago:" if ended else ":"))

    def job_id(job):
        return (job.get("id") or "?")[-id_width:]

    def where(job):
        text = " ".join(str(x) for x in (job.get("backend"), job.get("backend_id")) if x)
        return clip(text or "-", 14)

    def asked_cpus(job):
        return number(job.get("cpus")) if job.get("cpus") is not None else "-"

    def asked_memory(job):
        return size(job.get("memory")) if job.get("memory") else "-"

    def used(job):
        """(cores, rss) known for a job: sampled now, or from its record once ended."""
        if job.get("id") in view.usage:
            return view.usage[job["id"]]
        started, ended = epoch(job.get("started")), epoch(job.get("ended"))
        cores = None
        if job.get("cpu_seconds") is not None and started and ended and ended > started:
            cores = job["cpu_seconds"] / (ended - started)
        return cores, job.get("max_rss")

    def row(first, when, job, cmd=None):
        cores, rss = used(job) if job else (None, None)
        cpu = f"{number(cores)}/{asked_cpus(job)}" if job else "CPU/ASK"
        mem = f"{size(rss)}/{asked_memory(job)}" if job else "MEM/ASK"
        location = where(job) if job else "BACKEND ID"
        cmd = command(job.get("argv")) if job else (cmd or "COMMAND")
        return (f" {first:<{id_width}} {when:>7} {location:<14} {cpu:<7} {mem:<9} {cmd}")

    def more(n, what):
        if n > 0:
            add(f" ... {n} more {what}")

    # runs with queued or running jobs first, newest first within each group
    order = sorted(view.runs, key=lambda r: r["id"], reverse=True)
    order.sort(key=lambda r: not any(j.get("state") in ACTIVE
                                     for j in view.jobs.get(r["id"], [])))
    for n, run in enumerate(order):
        if n:
            add("")
        jobs = view.jobs.get(run["id"], [])
        started, ended = epoch(run.get("started")), epoch(run.get("ended"))
        elapsed = ((ended or view.now) - started) if started else None
        state = run.get("state") or "?"
        if state in store.FINAL_STATES:
            state = result(run) if state in ("exited", "signaled") else state
        add(f"run {run['id']}  {state} {duration(elapsed)}  "
            f"{command(run.get('argv'), basename=False)}", "run")
        counts = {}
        for job in jobs:
            counts[job.get("state")] = counts.get(job.get("state"), 0) + 1
        if not jobs:
            add(" no jobs yet")
            continue
        parts = []
        for state in (*store.STATES, *sorted(set(counts) - set(store.STATES), key=str)):
            if counts.get(state):
                part = f"{counts[state]} {state}"
                if state == "exited":
                    bad = sum(1 for j in jobs if j.get("state") == "exited"
                              and j.get("exit_status") not in (0, None))
                    part += f" ({bad} non-zero)" if bad else ""
                parts.append(part)
        add(f" jobs {len(jobs)}: " + ", ".join(parts))

        running = sorted((j for j in jobs if j.get("state") == "running"),
                         key=lambda j: epoch(j.get("started")) or view.now)
        if running:
            add(row("RUNNING", "ELAPSED", None), "head")
            for job in running[:MAX_RUNNING]:
                start = epoch(job.get("started"))
                add(row(job_id(job), duration(view.now - start) if start else "-", job))
            more(len(running) - MAX_RUNNING, "running")
        queued = sorted((j for j in jobs if j.get("state") == "queued"),
                        key=lambda j: epoch(j.get("created")) or view.now)
        if queued:
            add(row("QUEUED", "WAITING", None), "head")
            for job in queued[:MAX_QUEUED]:
                since = epoch(job.get("created"))
                add(row(job_id(job), duration(view.now - since) if since else "-", job))
            more(len(queued) - MAX_QUEUED, "queued")

        def took(job):
            start, end = epoch(job.get("started")), epoch(job.get("ended"))
            return end - start if start and end else None

        done = [j for j in jobs if j.get("state") in store.FINAL_STATES and took(j) is not None]
        done.sort(key=took, reverse=True)
        if done:
            add(row("SLOWEST", "TOOK", None), "head")
            for job in done[:MAX_SLOWEST]:
                add(row(job_id(job), duration(took(job)), job))
        failures = [j for j in jobs if failed(j)]     # newest first
        if failures:
            add(row("FAILED", "RESULT", None, "COMMAND / REASON"), "head")
            for job in failures[:MAX_FAILED]:
                add(row(job_id(job), result(job), job), "bad")
                if job.get("reason"):
                    add(f" {'':<{id_width}} {job['reason']}", "bad")
            more(len(failures) - MAX_FAILED, "failures")
    return lines


# ---- the command ---------------------------------------------------------------------

def main(state_dir, run=None, out=None):
    """`arv-wrap top [RUN]`: the live view on a terminal, one plain-text snapshot
    otherwise. Returns the exit status (0; 1 when RUN names nothing)."""
    out = sys.stdout if out is None else out
    reader = Reader(state_dir)
    if run:
        try:
            found, why = reader.resolve(run) if reader.has_records() else (
                None, f"no records in {state_dir}")
        except (OSError, sqlite3.Error) as e:
            found, why = None, f"cannot read {reader.path}: {e}"
        if found is None:
            print(f"arv-wrap: {why}", file=sys.stderr)
            return 1
        run = found
    if not _is_terminal(out):
        return snapshot(reader, run, out)
    try:
        return live(reader, run)
    except _TerminalError as e:
        print(f"arv-wrap: no live view ({e}): one snapshot", file=sys.stderr)
        return snapshot(reader, run, out, width=shutil.get_terminal_size().columns)


def _is_terminal(stream):
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def snapshot(reader, run, out, width=None):
    view = collect(reader, run, sampler=ProcSampler())
    for text, _style in render(view, width=width):
        print(text, file=out)
    out.flush()
    return 0


class _TerminalError(Exception):
    pass


class _Leave(Exception):
    """SIGTERM or SIGHUP: restore the terminal, then exit."""


def live(reader, run):
    try:
        import curses
    except ImportError as e:           # a Python built without curses
        raise _TerminalError(e)
    try:
        locale.setlocale(locale.LC_ALL, "")      # wide characters, the terminal's encoding
    except locale.Error:
        pass

    def leave(signum, _frame):
        raise _Leave(signum)

    handlers = {signal.SIGTERM: leave, signal.SIGHUP: leave,
                signal.SIGINT: signal.default_int_handler}   # even where SIGINT was ignored
    previous = {}
    for signum, handler in handlers.items():
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:             # not the main thread
            pass
    try:
        curses.wrapper(_loop, curses, reader, run)
    except KeyboardInterrupt:          # Ctrl-C: the terminal is restored by wrapper
        pass
    except _Leave as e:
        return 128 + e.args[0]
    except curses.error as e:
        raise _TerminalError(e)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def _loop(screen, curses, reader, run):
    try:
        curses.curs_set(0)
    except curses.error:
        pass
    styles = {"title": curses.A_REVERSE, "run": curses.A_BOLD, "head": curses.A_UNDERLINE,
              "bad": curses.A_BOLD, None: curses.A_NORMAL}
    if curses.has_colors():
        try:
            curses.use_default_colors()
            curses.init_pair(1, curses.COLOR_RED, -1)
            styles["bad"] = curses.color_pair(1) | curses.A_BOLD
        except curses.error:
            pass
    encoding = getattr(screen, "encoding", None) or locale.getpreferredencoding(False)
    marker = "…" if "utf" in encoding.lower().replace("-", "") else "~"
    try:
        curses.set_escdelay(25)        # a lone Esc quits without a second's wait
    except (AttributeError, curses.error):
        pass
    sampler = ProcSampler()
    scroll, view, next_read = 0, None, 0.0
    screen.keypad(True)
    while True:
        now = time.monotonic()
        if now >= next_read:
            view = collect(reader, run, sampler)
            next_read = now + REFRESH
        height, width = screen.getmaxyx()
        lines = render(view, width=width, marker=marker, hint="q quits  ")
        title, body = lines[0], lines[1:]
        room = max(0, height - 1)
        scroll = max(0, min(scroll, len(body) - room))
        shown = body[scroll:scroll + room]
        below = len(body) - scroll - len(shown)
        if below > 0 and room > 0:
            shown = shown[:-1] + [(f"-- {below + 1} more lines: arrows, PgDn, End --", "title")]
        screen.erase()
        for y, (text, style) in enumerate([title, *shown]):
            text = _encodable(clip(text, width, marker), encoding)
            if style == "title":
                text += " " * (width - width_of(text))
            try:
                screen.addstr(y, 0, text, styles.get(style, curses.A_NORMAL))
            except curses.error:       # the bottom-right cell: written, then the cursor cannot move
                pass
        screen.refresh()
        screen.timeout(max(1, int((next_read - time.monotonic()) * 1000)))
        key = screen.getch()
        if key in (ord("q"), ord("Q"), 3, 27):         # 3: Ctrl-C as a key; 27: Esc
            return
        step = {curses.KEY_DOWN: 1, ord("j"): 1, curses.KEY_UP: -1, ord("k"): -1,
                curses.KEY_NPAGE: room - 1, ord(" "): room - 1, curses.KEY_PPAGE: 1 - room,
                curses.KEY_HOME: -len(body), ord("g"): -len(body),
                curses.KEY_END: len(body), ord("G"): len(body)}.get(key)
        if step:
            scroll += step
        elif key in (ord("r"), 12):                      # r, Ctrl-L: read and redraw now
            next_read = 0.0
            if key == 12:
                screen.clear()


def _encodable(text, encoding):
    """What the terminal's encoding cannot carry, as '?'."""
    try:
        text.encode(encoding)
        return text
    except (UnicodeError, LookupError):
        try:
            return text.encode(encoding, "replace").decode(encoding)
        except LookupError:
            return text.encode("ascii", "replace").decode("ascii")
