"""`arv-wrap report`: one self-contained HTML file for one run.

    write(records, path, run=None)  -> the id of the record the report is about
    render(records, run=None)       -> the HTML text

records are the store's dicts (Store(state_dir).list()). run is a record id (or
an unambiguous prefix of one): a run, or any job, whose subtree is then reported;
by default the newest run record. The page holds the run's header, its failures
first, a timeline (one `.bar` element per job: queued part, then running part,
coloured by state, grouped by tool, argv and resources in its tooltip), CPU time
and peak memory per tool, and the whole tree. It needs nothing but itself: the
CSS is inline, it has no script, no image, no link outside the file, and a
Content-Security-Policy that forbids every fetch. Every string from the records
goes through esc(); undecodable bytes and control characters are shown, never
passed through.
"""
import datetime
import heapq
import html
import os
import re
import shlex
import signal
import sys

from arvwrap import __version__

FAILED_STATES = ("failed", "signaled", "cancelled")
KNOWN_STATES = ("queued", "running", "exited", "signaled", "cancelled", "failed")
CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; "
       "script-src 'none'; form-action 'none'; base-uri 'none'")
MAX_TEXT = 4000          # characters of one command line shown in a cell or tooltip
GUIDES = 12              # tree levels drawn as guides; deeper ones say their level
LANES_FROM = 8           # a tool with more jobs than this packs them into shared rows
FAILURES_SHOWN = 15      # more are folded into a <details> below them


INCLUSIVE_MARK = ("<span class=\"incl\" title=\"includes the local jobs below it: they are "
                  "its child processes\">*</span>")


class NoRun(LookupError):
    """No record to report on: the message says why (for the CLI to print)."""


# ------------------------------------------------------------------ public API

def write(records, path, run=None, now=None):
    """Write the report of run (default: the newest run) to path, replacing it
    atomically. Returns the id of the reported record. Raises NoRun."""
    root_id, text = _render(records, run, now)
    data = text.encode("utf-8")
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return root_id
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return root_id


def render(records, run=None, now=None):
    """The report's HTML text. now (a datetime or epoch seconds) is where the
    bars of unfinished jobs end; default: the current time."""
    return _render(records, run, now)[1]


# ------------------------------------------------------------------ text helpers

def visible(text):
    """str -> str that can be written as UTF-8 and shows what the record holds:
    an undecodable byte (surrogateescape) as \\xHH, a control character as \\xHH."""
    if text is None:
        return ""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        elif ch in "\t\n\r":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r"}[ch])
        elif code < 32 or code == 127:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def esc(text):
    """Any value from a record -> HTML-safe text (for element content or a
    double- or single-quoted attribute)."""
    return html.escape(visible(text), quote=True)


def shell_word(arg):
    """One argument as a shell would need it typed: shlex quoting, or bash's $'...'
    when it holds bytes or characters that do not print."""
    arg = "" if arg is None else str(arg)
    if arg.isprintable():
        return shlex.quote(arg)
    out = []
    for ch in arg:
        code = ord(ch)
        if ch in "\\'":
            out.append("\\" + ch)
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        elif ch in "\t\n\r":
            out.append({"\t": "\\t", "\n": "\\n", "\r": "\\r"}[ch])
        elif not ch.isprintable():
            out.append(f"\\x{code:02x}" if code < 256 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "$'" + "".join(out) + "'"


def command_line(argv, limit=MAX_TEXT):
    text = " ".join(shell_word(a) for a in argv or [])
    return text if len(text) <= limit else text[:limit] + f" ... ({len(argv)} arguments)"


_PATHLIKE = re.compile(r"[\w.+@%=:,~/-]*/[\w.+@%=:,~-]+/?")


def short_args(argv, skip):
    """The arguments after the tool's name, paths shortened to their last part."""
    words = []
    for arg in (argv or [])[skip:]:
        arg = "" if arg is None else str(arg)
        if _PATHLIKE.fullmatch(arg) and not arg.startswith("-"):
            arg = arg.rstrip("/").rsplit("/", 1)[-1]
        words.append(shell_word(arg))
        if sum(len(w) + 1 for w in words) > 200:
            words.append("...")
            break
    return " ".join(words)


class Subcommands:
    """The `when: subcommand` lists of the whitelist rules records name (`rule` is
    file:line), read once per file; nothing when the file is gone or unreadable."""

    def __init__(self):
        self.files = {}

    def of(self, rule):
        if not isinstance(rule, str) or ":" not in rule:
            return None
        path, _, line = rule.rpartition(":")
        if not os.path.isabs(path):     # the CLI records absolute paths; others are unknown
            return None
        if path not in self.files:
            self.files[path] = {}
            try:
                from arvwrap import whitelist
                for entry in whitelist.load([path]).rules:
                    if entry.when_subcommand:
                        self.files[path][entry.line] = set(entry.when_subcommand)
            except Exception:           # a label hint only: any failure means "no subcommands"
                pass
        try:
            return self.files[path].get(int(line))
        except ValueError:
            return None


def tool_of(argv, subcommands=None):
    """(name, words of argv it covers): the program's basename, with its first
    argument when the job's whitelist rule matched on it (`samtools sort`)."""
    if not argv:
        return "?", 0
    program = os.path.basename(str(argv[0]).rstrip("/")) or str(argv[0])
    if len(argv) > 1 and subcommands and argv[1] in subcommands:
        return f"{program} {argv[1]}", 2
    return program, 1


# ------------------------------------------------------------------ numbers

def parse_time(stamp):
    """ISO 8601 (the store's UTC stamps) -> epoch seconds, or None."""
    if not stamp or not isinstance(stamp, str):
        return None
    try:
        value = datetime.datetime.fromisoformat(stamp.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value.timestamp()


def number(value):
    """A record's numeric field -> float, or None when missing or not a number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None


def fmt_seconds(seconds):
    if seconds is None:
        return "–"
    if seconds < 0.0005:
        return "0 s"
    if seconds < 10:
        return f"{seconds:.3g} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600:02d}h"


def fmt_bytes(value):
    if value is None:
        return "–"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size:
            amount = value / size
            return f"{amount:.3g} {unit}" if amount < 100 else f"{amount:.0f} {unit}"
    return f"{value:.0f} B"


def fmt_cpus(value):
    return "–" if value is None else f"{value:g}"


def fmt_percent(fraction):
    if fraction is None:
        return "–"
    if 0 < fraction < 0.01:
        return "<1%"
    return f"{fraction * 100:.0f}%"


def fmt_stamp(epoch):
    if epoch is None:
        return "–"
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%d %H:%M:%S") + f".{stamp.microsecond // 1000:03d} UTC"


def fmt_offset(seconds, step):
    """An axis label: +1.5s, +2m, +1h30m (precision from the tick step)."""
    if seconds == 0:
        return "0"
    if step < 1:
        digits = max(0, -int(f"{step:e}".split("e")[1]))
        return f"+{seconds:.{digits}f}s"
    if step < 60:
        return f"+{seconds:.0f}s" if seconds < 60 else f"+{int(seconds) // 60}m{int(seconds) % 60:02d}s"
    if seconds < 3600:
        return f"+{int(seconds) // 60}m"
    return f"+{int(seconds) // 3600}h{int(seconds) % 3600 // 60:02d}m"


_STEPS = [m * 10.0 ** e for e in range(-3, 1) for m in (1, 2, 5)] + [
    10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400]


def tick_step(span, ticks=8):
    """A round step that divides span into at most `ticks` parts."""
    for step in _STEPS:
        if span / step <= ticks:
            return step
    step = 86400
    while span / step > ticks:
        step *= 2
    return step


# ------------------------------------------------------------------ the model

class Node:
    """One record with what the report derives from it."""

    def __init__(self, record, now, subcommands):
        self.r = record
        self.id = str(record.get("id") or "")
        self.kind = record.get("kind") or "job"
        state = record.get("state")
        self.state = state if state in KNOWN_STATES else "unknown"
        self.argv = [a for a in (record.get("argv") or []) if a is not None] \
            if isinstance(record.get("argv"), list) else []
        self.tool, self.tool_words = tool_of(self.argv, subcommands.of(record.get("rule")))
        self.exit = record.get("exit_status")
        self.signal = record.get("signal")
        self.created = parse_time(record.get("created"))
        self.started = parse_time(record.get("started"))
        self.ended = parse_time(record.get("ended"))
        self.open = self.ended is None and self.state in ("queued", "running", "unknown")
        self.cpus = number(record.get("cpus"))
        self.memory = number(record.get("memory"))
        self.cpu_seconds = number(record.get("cpu_seconds"))
        self.max_rss = number(record.get("max_rss"))
        self.children = []
        self.n_below = 0
        self.depth = 0
        self.orphan = False
        first = self.created if self.created is not None else self.started
        if first is None:
            first = self.ended if self.ended is not None else now
        self.t_created = first
        if self.started is not None:
            self.t_started = max(self.started, first)
        elif self.ended is not None:        # ended without starting: queued all along
            self.t_started = max(self.ended, first)
        elif self.open and self.state != "running":     # still waiting
            self.t_started = max(now, first)
        else:
            self.t_started = first
        end = self.ended if self.ended is not None else (now if self.open else self.t_started)
        self.t_ended = max(end, self.t_started)
        self.duration = self.t_ended - self.t_started if self.started is not None else None
        queued = number(record.get("queued_seconds"))
        if queued is None and self.created is not None:
            queued = self.t_started - self.t_created
        self.queued = queued

    @property
    def failed(self):
        return self.state in FAILED_STATES or (
            self.state == "exited" and self.exit not in (0, None))

    @property
    def css(self):
        if self.state == "exited" and self.exit not in (0, None):
            return "s-nonzero"
        return "s-" + self.state

    @property
    def outcome(self):
        """State and exit in a few words: `exited 0`, `signaled SIGKILL`, `running`."""
        if self.state == "exited":
            return f"exited {self.exit}" if self.exit is not None else "exited"
        if self.state == "signaled" and self.signal:
            return f"signaled {signal_name(self.signal)}"
        return self.state

    @property
    def inclusive(self):
        """Its cpu_seconds and max_rss include jobs below it: local jobs started from
        inside a (nested) job are its descendant processes."""
        return any(child.r.get("backend") in ("local", None) for child in self.children)

    @property
    def efficiency(self):
        """cpu_seconds / (duration * cpus asked), as Snakemake's Slurm plugin reports it."""
        if self.cpu_seconds is None or not self.duration or not self.cpus or self.inclusive:
            return None
        return self.cpu_seconds / (self.duration * self.cpus)

    @property
    def memory_efficiency(self):
        if self.max_rss is None or not self.memory:
            return None
        return self.max_rss / self.memory



def signal_name(number_):
    try:
        return signal.Signals(int(number_)).name
    except (ValueError, TypeError):
        return f"signal {visible(number_)}"


def pick_root(records, run):
    if run:
        run = str(run)
        exact = [r for r in records if str(r.get("id")) == run]
        if exact:
            return exact[0]
        matches = [r for r in records if str(r.get("id") or "").startswith(run)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise NoRun(f"{run} names {len(matches)} records; give more of the id")
        raise NoRun(f"no record {run}")
    runs = [r for r in records if r.get("kind") == "run"]
    if not runs:
        raise NoRun("no run recorded yet")
    return max(runs, key=lambda r: (str(r.get("created") or ""), str(r.get("id") or "")))


def build(records, run, now):
    """(root Node, the nodes of its tree in depth-first order, children by arrival)."""
    root_record = pick_root(records, run)
    root_id = str(root_record["id"])
    by_id, children_of = {}, {}
    for record in records:
        if record.get("id") is not None and str(record["id"]) not in by_id:
            by_id[str(record["id"])] = record
            children_of.setdefault(str(record.get("parent") or ""), []).append(str(record["id"]))
    # Members: the root's run (when it is a run), and everything whose parent is a member.
    members = {root_id}
    if root_record.get("kind") == "run":
        members.update(i for i, r in by_id.items() if str(r.get("run") or "") == root_id)
    stack = list(members)
    while stack:
        for child in children_of.get(stack.pop(), ()):
            if child not in members:
                members.add(child)
                stack.append(child)
    lookup = Subcommands()
    nodes = {i: Node(by_id[i], now, lookup) for i in members}
    arrival = lambda n: (n.t_created, n.id)
    for node in nodes.values():
        node.children = sorted((nodes[c] for c in children_of.get(node.id, ())
                                if c in nodes and c != root_id), key=arrival)
    root = nodes[root_id]
    # Members the walk from the root does not reach (a parent never recorded, or a
    # cycle of parents): under the root, marked.
    reached = set()
    order = walk(root, reached)
    for stray in sorted((nodes[i] for i in members if i not in reached), key=arrival):
        if stray.id not in reached:
            stray.orphan = True
            root.children.append(stray)
            order += walk(stray, reached, depth=1)
    for node in reversed(order):            # children come after their parent
        node.n_below = sum(child.n_below + 1 for child in node.children)
    return root, order


def walk(top, reached, depth=0):
    """Depth-first order below top (without recursion: any depth), each node once."""
    order, stack = [], [(top, depth)]
    while stack:
        node, level = stack.pop()
        if node.id in reached:
            continue
        reached.add(node.id)
        node.depth = level
        order.append(node)
        node.children = [c for c in node.children if c.id not in reached]
        stack.extend((child, level + 1) for child in reversed(node.children))
    return order


# ------------------------------------------------------------------ the page

CSS = """
:root{--ok:#2f9e5a;--nonzero:#e8663d;--failed:#c62f3b;--signaled:#8e44ad;--cancelled:#8d939c;
--running:#2f7fd8;--queued:#e9b949;--unknown:#b0b4ba;--ink:#1d232b;--mute:#66707c;--line:#e3e6ea;
--bg:#f6f7f9}
*{box-sizing:border-box}
body{margin:0;font:13px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Liberation Sans",Arial,sans-serif;
color:var(--ink);background:var(--bg)}
main{max-width:1400px;margin:0 auto;padding:14px 20px 30px}
code,.mono{font-family:ui-monospace,"SFMono-Regular","DejaVu Sans Mono","Liberation Mono",Menlo,monospace;
font-size:12px}
h1{font-size:18px;margin:0 0 4px;font-weight:600;display:flex;align-items:center;gap:10px;flex-wrap:wrap}
h1 .id{font-weight:400;color:var(--mute);font-size:13px}
h2{font-size:14px;margin:0 0 8px;font-weight:600}
h2 .n{color:var(--mute);font-weight:400}
section,header{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 14px;margin:0 0 12px;
overflow-x:auto}
.cmd{margin:4px 0 8px;padding:6px 8px;background:#f1f3f5;border-radius:5px;overflow-wrap:anywhere;
white-space:pre-wrap}
.facts{display:flex;flex-wrap:wrap;gap:4px 22px;margin:0}
.facts div{display:flex;gap:6px}.facts dt{color:var(--mute)}.facts dd{margin:0;font-variant-numeric:tabular-nums}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px;font-weight:600;
white-space:nowrap}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:5px;vertical-align:0}
.s-exited{--c:var(--ok)}.s-nonzero{--c:var(--nonzero)}.s-failed{--c:var(--failed)}
.s-signaled{--c:var(--signaled)}.s-cancelled{--c:var(--cancelled)}.s-running{--c:var(--running)}
.s-queued{--c:var(--queued)}.s-unknown{--c:var(--unknown)}
.pill,.dot{background:var(--c)}
.counts .pill{margin-right:4px}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th{font-weight:600;color:var(--mute);text-align:left;font-size:12px;border-bottom:1px solid var(--line);
padding:3px 8px;white-space:nowrap}
td{padding:3px 8px;border-bottom:1px solid #f0f1f3;vertical-align:top;white-space:nowrap}
td.num,th.num{text-align:right}
td.wrap{white-space:normal;overflow-wrap:anywhere}
tr:target td{background:#fff6d8}
a{color:inherit;text-decoration:none}a:hover .name{text-decoration:underline}
.failures{border-color:#f0c2c6;background:#fffafa}.failures h2{color:var(--failed)}
.failures .reason{color:#8b1d27}
.failures summary{cursor:pointer;color:var(--mute);margin-top:6px}
.ok{color:var(--ok);font-weight:600;margin:0}
.mute{color:var(--mute)}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;margin:0 0 8px;color:var(--mute);font-size:12px}
.legend span{display:inline-flex;align-items:center;gap:5px}
.legend i{display:inline-block;width:18px;height:9px;border-radius:2px;background:var(--c)}
.legend i.q,.bar .q{background:repeating-linear-gradient(135deg,#f3dca6 0 3px,#fbeed0 3px 6px)}
.tl{position:relative}
.tl .grp{display:flex;border-top:1px solid var(--line)}
.tl .grp.axis{border-top:0}
.tl .gname{flex:0 0 190px;padding:2px 10px 2px 0;font-weight:600;overflow:hidden;text-overflow:ellipsis;
white-space:nowrap;line-height:18px}
.tl .gname small{font-weight:400;color:var(--mute);font-size:11px;margin-left:6px}
.tl .rows{flex:1;min-width:0;padding:2px 0}
.tl .row{display:flex;align-items:center;height:18px}
.tl .label{flex:0 0 190px;overflow:hidden;white-space:nowrap;text-overflow:ellipsis;padding-right:10px;
color:var(--mute);font-size:11px}
.tl .track{position:relative;flex:1;height:100%;
background-image:linear-gradient(to right,#e9ecef 1px,transparent 1px);background-size:var(--step) 100%}
.tl .axis .track{background:none}
.tl .tick{position:absolute;top:1px;font-size:11px;color:var(--mute);transform:translateX(-50%);
white-space:nowrap}
.tl .tick:first-child{transform:none}
.bar{position:absolute;top:3px;height:12px;display:flex;min-width:3px;border-radius:2px;overflow:hidden}
.bar .q{flex:0 1 auto;height:100%}
.bar .r{flex:1 0 2px;height:100%;background:var(--c)}
.bar.s-queued .r{display:none}
.bar.s-queued .q{flex:1 1 auto}
.bar.open,.legend i.open{border-right:3px solid #1d232b;border-radius:2px 0 0 2px}
.legend i.open{background:var(--running)}
.bar:hover{outline:2px solid #1d232b;z-index:2}
.span{position:absolute;top:7px;height:4px;background:#9aa3ad;border-radius:2px;min-width:3px}
.span.open{background:repeating-linear-gradient(90deg,#9aa3ad 0 6px,transparent 6px 9px)}
.scroll{overflow-x:auto}
td.cmdcell{width:100%;max-width:0}
td.cmdcell div{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
td.id{font-size:10.5px;color:var(--mute)}
.eff{display:inline-block;width:46px;height:7px;background:#edf0f3;border-radius:4px;overflow:hidden;
margin-left:6px;vertical-align:1px}
.eff b{display:block;height:100%;background:#5b8fd0}
.tree .name{display:inline-block}
.tree .kids{color:var(--mute);font-size:11px;margin-left:6px}
.tree .guide{color:#b5bcc4;margin-right:4px;font-family:ui-monospace,"DejaVu Sans Mono",monospace}
.tree tr.run td{background:#fafbfc}.tree tr.run .name{font-weight:600}
footer{color:var(--mute);font-size:11px;text-align:center}
.incl{color:var(--mute);margin-left:1px}
"""


def _render(records, run, now):
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc).timestamp()
    elif isinstance(now, datetime.datetime):
        now = now.timestamp()
    root, order = build(list(records), run, now)
    jobs = [n for n in order if n is not root]
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">",
        "<meta name=\"referrer\" content=\"no-referrer\">",
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">",
        f"<title>arv-wrap report: {esc(root.tool)} ({esc(root.id)})</title>",
        f"<style>{CSS}</style></head><body><main>",
        header(root, jobs, now),
        failures(root, jobs),
        timeline(root, jobs, now),
        per_tool(jobs),
        tree(root, order),
        f"<footer>arv-wrap {esc(__version__)} report, made {esc(fmt_stamp(now))}. "
        "Times are UTC; CPU efficiency is CPU time / (run time × CPUs asked), "
        "memory efficiency peak RSS / memory asked. * includes the local jobs below it "
        "(its child processes).</footer>",
        "</main></body></html>\n",
    ]
    return root.id, "\n".join(parts)


def pill(node):
    return f"<span class=\"pill {node.css}\">{esc(node.outcome)}</span>"


def job_link(node, text):
    return f"<a href=\"#job-{esc(node.id)}\">{text}</a>"


def header(root, jobs, now):
    title = "run" if root.kind == "run" else "job"
    counts = {}
    for job in jobs:
        key = (job.css, job.outcome if job.css == "s-nonzero" else job.state)
        counts[key] = counts.get(key, 0) + 1
    order = {"s-failed": 0, "s-signaled": 1, "s-nonzero": 2, "s-cancelled": 3, "s-running": 4,
             "s-queued": 5, "s-exited": 6}
    count_html = " ".join(
        f"<span class=\"pill {css}\">{n} {esc(label)}</span>"
        for (css, label), n in sorted(counts.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0])))
    cpu = [j.cpu_seconds for j in jobs if j.cpu_seconds is not None and not j.inclusive]
    rss = [j.max_rss for j in jobs if j.max_rss is not None]
    hosts = sorted({visible(n.r.get("host")) for n in [root, *jobs] if n.r.get("host")})
    backends = sorted({visible(j.r.get("backend")) for j in jobs if j.r.get("backend")})
    wall = (root.t_ended - root.t_started) if root.started is not None else None
    facts = [
        ("started", fmt_stamp(root.started if root.started is not None else root.created)),
        ("ended", fmt_stamp(root.ended) if root.ended is not None else "still running"),
        ("wall time", fmt_seconds(wall) + (" so far" if root.open else "")),
        ("jobs", str(len(jobs))),
        ("CPU time of jobs", fmt_seconds(sum(cpu)) if cpu else "–"),
        ("largest peak RSS", fmt_bytes(max(rss)) if rss else "–"),
        ("backends", ", ".join(backends) or "–"),
        ("host", ", ".join(hosts) or "–"),
        ("cwd", visible(root.r.get("cwd")) or "–"),
    ]
    facts_html = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in facts)
    return (f"<header><h1>arv-wrap {title} {pill(root)} <span class=\"id mono\">{esc(root.id)}</span>"
            f"</h1><div class=\"cmd mono\">$ {esc(command_line(root.argv))}</div>"
            f"<dl class=\"facts\">{facts_html}</dl>"
            + (f"<p class=\"counts\" style=\"margin:8px 0 0\">{count_html}</p>" if count_html else "")
            + "</header>")


def failures(root, jobs):
    """Failed, signaled and non-zero exits in the order they ended (the first is
    usually the cause), then the cancelled ones (usually its consequences)."""
    bad = sorted((j for j in jobs if j.failed),
                 key=lambda j: (j.state == "cancelled", j.t_ended, j.id))
    if not bad:
        return ("<section class=\"failures-none\" id=\"failures\"><p class=\"ok\">"
                "No job failed.</p></section>")

    def table(rows):
        return ("<table><thead><tr><th>tool</th><th>state</th><th>reason</th>"
                "<th class=\"num\">ended at</th><th>job</th><th>command</th></tr></thead><tbody>"
                + "".join(rows) + "</tbody></table>")

    rows = []
    for job in bad:
        name = job_link(job, f"<span class=\"name\">{esc(job.tool)}</span>")
        reason = esc(job.r.get("reason") or "") or "<span class=\"mute\">–</span>"
        rows.append(
            f"<tr class=\"failure\"><td>{name}</td><td>{pill(job)}</td>"
            f"<td class=\"wrap reason\">{reason}</td>"
            f"<td class=\"num\">+{esc(fmt_seconds(job.t_ended - root.t_created))}</td>"
            f"<td class=\"mono\">{esc(job.id)}</td>"
            f"<td class=\"wrap mono\">{esc(command_line(job.argv, 600))}</td></tr>")
    more = ""
    if len(rows) > FAILURES_SHOWN:
        more = (f"<details><summary>{len(rows) - FAILURES_SHOWN} more</summary>"
                f"{table(rows[FAILURES_SHOWN:])}</details>")
    return (f"<section class=\"failures\" id=\"failures\"><h2>Failures <span class=\"n\">{len(bad)}"
            f"</span></h2>{table(rows[:FAILURES_SHOWN])}{more}</section>")


def tooltip(job, t0):
    """A bar's title: the command, then how it ended, where, what it asked and used, when."""
    outcome = job.outcome + (f" — {visible(job.r.get('reason'))}" if job.r.get("reason") else "")
    if job.kind == "run":
        wall = fmt_seconds(job.t_ended - job.t_created) + (" so far" if job.open else "")
        lines = [command_line(job.argv, 1500), "", outcome, f"run {job.id}, {wall}"]
        return multiline(lines)
    limit = number(job.r.get("time_limit"))
    if job.duration is None:
        when = "still queued" if job.open else "never started"
    else:
        when = f"ran {fmt_seconds(job.duration)}" + (" so far" if job.open else "")
    lines = [command_line(job.argv, 1500), "", outcome,
             f"job {job.id} · {visible(job.r.get('backend') or '?')} "
             f"{visible(job.r.get('backend_id') or '')}".rstrip(),
             f"asked: {fmt_cpus(job.cpus)} CPU, {fmt_bytes(job.memory)}"
             + (f", {fmt_seconds(limit)} limit" if limit else ""),
             f"used: {fmt_seconds(job.cpu_seconds)} CPU, {fmt_bytes(job.max_rss)} peak RSS"
             + (" (with the local jobs below it)" if job.inclusive
                else f", CPU efficiency {fmt_percent(job.efficiency)}"),
             f"arrived at +{fmt_seconds(job.t_created - t0)}, queued "
             f"{fmt_seconds(job.t_started - job.t_created)}, {when}"]
    return multiline(lines)


def multiline(lines):
    """Lines of a title attribute: each line made visible, joined by real newlines."""
    return html.escape("\n".join(visible(line) for line in lines), quote=True)


def timeline(root, jobs, now):
    if not jobs:
        return ("<section id=\"timeline\"><h2>Timeline</h2><p class=\"mute\">No jobs in this run."
                "</p></section>")
    t0 = min([root.t_created, *(j.t_created for j in jobs)])
    t1 = max([root.t_ended, *(j.t_ended for j in jobs)])
    span = max(t1 - t0, 0.001)
    step = tick_step(span)

    def pct(t):
        return f"{max(0.0, min(100.0, (t - t0) / span * 100)):.3f}%"

    ticks = "".join(
        f"<span class=\"tick\" style=\"left:{pct(t0 + k * step)}\">{esc(fmt_offset(k * step, step))}</span>"
        for k in range(int(span / step * 1.0001) + 1))
    blocks = [f"<div class=\"grp axis\"><div class=\"gname\"></div><div class=\"rows\"><div class=\"row\">"
              f"<div class=\"label\"></div><div class=\"track\">{ticks}</div></div></div></div>"]
    kind = "run" if root.kind == "run" else "job"
    blocks.append(
        f"<div class=\"grp\"><div class=\"gname\">{esc(root.tool)}<small>the {kind}</small></div>"
        f"<div class=\"rows\"><div class=\"row\"><div class=\"label\"></div><div class=\"track\">"
        f"<span class=\"span{' open' if root.open else ''}\" style=\"left:{pct(root.t_created)};"
        f"width:{(root.t_ended - root.t_created) / span * 100:.3f}%\" title=\"{tooltip(root, t0)}\">"
        "</span></div></div></div></div>")
    groups = {}
    for job in jobs:
        groups.setdefault(job.tool, []).append(job)
    for name, members in sorted(groups.items(), key=lambda kv: (min(j.t_created for j in kv[1]), kv[0])):
        members.sort(key=lambda j: (j.t_created, j.id))
        busy = sum(j.duration or 0 for j in members)
        if len(members) > LANES_FROM:
            # many jobs of one tool: pack them into as few rows as overlap allows
            lanes, free, gap = [], [], span / 400    # free: heap of (end of its last bar, lane)
            for job in members:
                if free and free[0][0] + gap <= job.t_created:
                    _, index = heapq.heappop(free)
                else:
                    index = len(lanes)
                    lanes.append([])
                lanes[index].append(job)
                heapq.heappush(free, (job.t_ended, index))
        else:
            lanes = [[job] for job in members]
        rows, packed = [], len(lanes) < len(members) or len(members) > LANES_FROM
        for lane in lanes:
            label = "" if packed else short_args(lane[0].argv, lane[0].tool_words)
            title = "" if packed else command_line(lane[0].argv, 1500)
            bars = []
            for job in lane:
                total = job.t_ended - job.t_created
                queued = (job.t_started - job.t_created) / total * 100 if total > 0 else 0.0
                bars.append(
                    f"<a class=\"bar {job.css}{' open' if job.open else ''}\" href=\"#job-{esc(job.id)}\" "
                    f"style=\"left:{pct(job.t_created)};width:{total / span * 100:.3f}%\" "
                    f"title=\"{tooltip(job, t0)}\"><span class=\"q\" style=\"width:{queued:.2f}%\"></span>"
                    "<span class=\"r\"></span></a>")
            title = f" title=\"{esc(title)}\"" if title else ""
            rows.append(f"<div class=\"row\"><div class=\"label mono\"{title}>"
                        f"{esc(label)}</div><div class=\"track\">{''.join(bars)}</div></div>")
        count_text = (f"×{len(members)} · " if len(members) > 1 else "") + esc(fmt_seconds(busy))
        blocks.append(f"<div class=\"grp\"><div class=\"gname\" title=\"{esc(name)}\">{esc(name)}"
                      f"<small>{count_text}</small></div>"
                      f"<div class=\"rows\">{''.join(rows)}</div></div>")
    legend = "".join(
        f"<span><i class=\"{css}\"></i>{label}</span>" for css, label in (
            ("q", "queued"), ("s-running", "running"), ("s-exited", "exited 0"),
            ("s-nonzero", "non-zero exit"), ("s-signaled", "signaled"), ("s-failed", "failed"),
            ("s-cancelled", "cancelled"), ("open", "still running, drawn to now")))
    return (f"<section id=\"timeline\"><h2>Timeline <span class=\"n\">{len(jobs)} jobs over "
            f"{esc(fmt_seconds(span))}, grouped by tool; hover a bar for its command and resources"
            f"</span></h2><div class=\"legend\">{legend}</div>"
            f"<div class=\"tl\" style=\"--step:{step / span * 100:.4f}%\">{''.join(blocks)}</div></section>")


def per_tool(jobs):
    if not jobs:
        return ""
    groups = {}
    for job in jobs:
        groups.setdefault(job.tool, []).append(job)
    rows = []

    def total(values):
        values = [v for v in values if v is not None]
        return sum(values) if values else None

    def peak(values):
        values = [v for v in values if v is not None]
        return max(values) if values else None

    stats = []
    for name, members in groups.items():
        cpu = total(j.cpu_seconds for j in members)
        inclusive = any(j.inclusive for j in members)
        measured = [j for j in members if j.efficiency is not None]
        asked = sum(j.duration * j.cpus for j in measured)
        eff = sum(j.cpu_seconds for j in measured) / asked if asked else None
        rss = peak(j.max_rss for j in members)
        memory = peak(j.memory for j in members)
        mem_eff = peak(j.memory_efficiency for j in members)
        stats.append((name, members, cpu, eff, rss, memory, mem_eff, inclusive))
    stats.sort(key=lambda s: (s[7], -(s[2] or 0), s[0]))    # pipelines (inclusive) last
    for name, members, cpu, eff, rss, memory, mem_eff, inclusive in stats:
        mark = INCLUSIVE_MARK if inclusive and cpu is not None else ""
        failed = sum(1 for j in members if j.failed)
        wall = total(j.duration for j in members)
        longest = peak(j.duration for j in members)
        cpus = sorted({j.cpus for j in members if j.cpus is not None})
        cpus_text = "–" if not cpus else (fmt_cpus(cpus[0]) if len(cpus) == 1
                                          else f"{fmt_cpus(cpus[0])}–{fmt_cpus(cpus[-1])}")
        rows.append(
            f"<tr><td><b>{esc(name)}</b></td><td class=\"num\">{len(members)}</td>"
            f"<td class=\"num\">{failed or ''}</td>"
            f"<td class=\"num\">{esc(fmt_seconds(wall))}</td><td class=\"num\">{esc(fmt_seconds(longest))}</td>"
            f"<td class=\"num\">{esc(cpus_text)}</td>"
            f"<td class=\"num\">{esc(fmt_seconds(cpu))}{mark}</td><td class=\"num\">{efficiency_cell(eff)}</td>"
            f"<td class=\"num\">{esc(fmt_bytes(rss))}{mark}</td><td class=\"num\">{esc(fmt_bytes(memory))}</td>"
            f"<td class=\"num\">{efficiency_cell(mem_eff)}</td></tr>")
    return ("<section id=\"tools\"><h2>CPU time and peak memory per tool</h2><table><thead><tr>"
            "<th>tool</th><th class=\"num\">jobs</th><th class=\"num\">failed</th>"
            "<th class=\"num\">run time</th><th class=\"num\">longest</th><th class=\"num\">CPUs asked</th>"
            "<th class=\"num\">CPU time</th><th class=\"num\">CPU efficiency</th>"
            "<th class=\"num\">peak RSS</th><th class=\"num\">memory asked</th>"
            "<th class=\"num\">memory efficiency</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></section>")


def efficiency_cell(fraction):
    if fraction is None:
        return "–"
    width = max(0.0, min(100.0, fraction * 100))
    return (f"{esc(fmt_percent(fraction))}<span class=\"eff\"><b style=\"width:{width:.1f}%\"></b>"
            "</span>")


def tree(root, order):
    rows = []
    for node in order:
        if node.depth > GUIDES:
            guide = ("<span class=\"guide\">" + "│ " * (GUIDES - 2) + "┆ └─</span>"
                     f"<span class=\"kids\">level {node.depth}</span> ")
        else:
            guide = "<span class=\"guide\">" + "│ " * (node.depth - 1) + "└─</span>" if node.depth else ""
        kids = node.n_below
        kids_html = f"<span class=\"kids\">{kids} below</span>" if kids and node.depth else ""
        stray = (f" <span class=\"mute\">(parent {esc(node.r.get('parent'))} not recorded)</span>"
                 if node.orphan else "")
        cells = [
            f"<td>{guide}<span class=\"dot {node.css}\"></span><span class=\"name\">{esc(node.tool)}"
            f"</span>{kids_html}{stray}</td>",
            f"<td>{esc(node.outcome)}</td>",
        ]
        mark = INCLUSIVE_MARK if node.inclusive and node.cpu_seconds is not None else ""
        if node is root and node.kind == "run":
            cells.append("<td colspan=\"7\"></td>")
        else:
            cells += [
                f"<td>{esc(node.r.get('backend') or '–')} <span class=\"mono mute\">"
                f"{esc(node.r.get('backend_id') or '')}</span></td>",
                f"<td class=\"num\">{esc(fmt_cpus(node.cpus))}</td>",
                f"<td class=\"num\">{esc(fmt_bytes(node.memory))}</td>",
                f"<td class=\"num\">{esc(fmt_seconds(node.cpu_seconds))}{mark}</td>",
                f"<td class=\"num\">{esc(fmt_bytes(node.max_rss))}{mark}</td>",
                f"<td class=\"num\">{efficiency_cell(node.efficiency)}</td>",
                f"<td class=\"num\">{esc(fmt_seconds(node.queued))}</td>",
            ]
        running = " so far" if node.open and node.started is not None else ""
        cells += [
            f"<td class=\"num\">{esc(fmt_seconds(node.duration))}{running}</td>",
            f"<td class=\"mono id\">{esc(node.id)}</td>",
            f"<td class=\"cmdcell\"><div class=\"mono\" title=\"{esc(command_line(node.argv, 1500))}\">"
            f"{esc(command_line(node.argv, 300))}</div></td>",
        ]
        rows.append(f"<tr id=\"job-{esc(node.id)}\" class=\"{'run' if node is root else 'job'}\">"
                    + "".join(cells) + "</tr>")
    depth = max(n.depth for n in order)
    return (f"<section id=\"tree\" class=\"tree\"><h2>Tree <span class=\"n\">{len(order) - 1} jobs, "
            f"{depth} level{'s' if depth != 1 else ''} below the {'run' if root.kind == 'run' else 'job'}"
            "</span></h2><div class=\"scroll\"><table><thead><tr><th>job</th><th>state</th><th>backend</th>"
            "<th class=\"num\">CPUs</th><th class=\"num\">memory</th>"
            "<th class=\"num\">CPU time</th><th class=\"num\">peak RSS</th>"
            "<th class=\"num\">CPU efficiency</th><th class=\"num\">queued</th>"
            "<th class=\"num\">ran</th><th>id</th><th class=\"wide\">command</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></div></section>")
