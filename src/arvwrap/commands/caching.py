"""Job reuse from the command line: `arv-wrap cache ...` and `check --reuse`."""
import os

from arvwrap import cache as cache_mod, paths, redact, reuse
from arvwrap.reuse_jobs import shown_parts
from arvwrap.errors import UsageError
from arvwrap.whitelist import parse_memory

ACTIONS = ("ls", "stats", "clear", "gc")


def cache(options, words):
    if len(words) != 1 or words[0] not in ACTIONS:
        raise UsageError(f"cache needs one of {', '.join(ACTIONS)} (see arv-wrap cache --help)")
    action = words[0]
    if options.get("max_size") and action != "gc":
        raise UsageError("--max-size goes with cache gc")
    kept = cache_mod.Cache(paths.state_dir())
    try:
        return {"ls": _ls, "stats": _stats, "clear": _clear, "gc": _gc}[action](kept, options)
    finally:
        kept.close()


def _ls(kept, _options):
    print(f"{'JOB':26}  {'TOOL':12}  {'SIZE':>9}  {'OUTPUTS':>7}  LAST USED")
    for entry in kept.entries():
        print(f"{entry.job:26}  {entry.tool[:12]:12}  {size_text(entry.size):>9}  "
              f"{len(entry.outputs):>7}  {entry.used}")
    return 0


def _stats(kept, _options):
    stats = kept.stats()
    print(f"entries: {stats['entries']}   results: {size_text(stats['size'])}   "
          f"on disk: {size_text(stats['blobs'])}   in {kept.dir}")
    return 0


def _clear(kept, _options):
    print(f"removed {kept.clear()} entries")
    return 0


def _gc(kept, options):
    if not options.get("max_size"):
        raise UsageError("cache gc needs --max-size SIZE (such as 50G)")
    try:
        limit = parse_memory(options["max_size"])
    except ValueError:
        raise UsageError(f"--max-size: not a size: {options['max_size']!r} (such as 50G)") from None
    evicted, left = kept.gc(limit)
    print(f"evicted {evicted} entries; {size_text(left)} kept")
    return 0


def size_text(n):
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024


def check_reuse(rule, command, path, env):
    """Lines saying whether this call would reuse an earlier job's result, or why not."""
    if rule.reuse is None:
        return ["reuse: no (the rule does not say reuse)"]
    kept = cache_mod.Cache(paths.state_dir(env))
    try:
        stdin = reuse.stdin_part(0, rule.stdin)
        if stdin in ("spool", "file"):
            stdin = "(what stdin holds when the call runs)"
        plan = reuse.plan(rule.reuse, path, command, os.getcwd(),
                          {os.fsencode(k): os.fsencode(v) for k, v in env.items()},
                          kept.digests, stdin)
        entry = kept.get(plan.key)
        if entry is not None:
            return [f"reuse: yes, the result of job {entry.job} ({len(entry.outputs)} outputs)"]
        parts = shown_parts(plan.parts, redact.Redactor(redact.patterns_from(env), env))
        nearest = kept.nearest(os.path.basename(os.fsdecode(command[0])), parts)
        if nearest is None:
            return ["reuse: no earlier job of this tool is kept"]
        return [f"reuse: no; the nearest kept job, {nearest.job}, differs in:"] + [
            f"  {part}" + (f" {detail}" if detail else "")
            for part, detail in cache_mod.differences(nearest.parts, parts)]
    except (OSError, ValueError) as e:
        return [f"reuse: no, the call cannot be keyed: {e}"]
    finally:
        kept.close()
