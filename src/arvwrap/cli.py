"""The arv-wrap command: its options, and which function serves each subcommand.

The subcommands live in arvwrap.commands, one module per group: running
(COMMAND, env), checking (check, doctor, preload-path), records (jobs, show,
logs, cancel, gc) and views (top, report).
"""
import importlib
import sqlite3
import sys
from typing import NamedTuple

from arvwrap import __version__, paths
from arvwrap.errors import UsageError, WhitelistError

USAGE = """\
usage: arv-wrap [-w FILE]... [-b BACKEND] [--reuse|--no-reuse] [-v] [--] COMMAND [ARGS...]
       arv-wrap --as-job [-w FILE]... [-b BACKEND] [--cpus N] [-v] -- COMMAND [ARGS...]
       arv-wrap env [-w FILE]... [-b BACKEND] [--reuse|--no-reuse]
       arv-wrap check [-w FILE]... [-b BACKEND] [--reuse] -- COMMAND [ARGS...]
       arv-wrap jobs [--json] [--tree] [--run ID] [RUN]
       arv-wrap show JOB
       arv-wrap logs JOB [--follow]
       arv-wrap cancel JOB
       arv-wrap top [RUN]
       arv-wrap report [RUN] -o FILE.html
       arv-wrap gc --older-than AGE
       arv-wrap cache ls|stats|clear|gc [--max-size SIZE]
       arv-wrap doctor [-w FILE]... [-b BACKEND] [-- COMMAND]
       arv-wrap preload-path
       arv-wrap --version

Run COMMAND with its whitelisted tools redirected as jobs; COMMAND's exit status
is arv-wrap's. The first word after the options names a subcommand if it is one;
put `--` before a program called like a subcommand.

options:
  -w, --whitelist FILE  a whitelist YAML (repeatable; default $ARV_WRAP_WHITELIST,
                        else ./arv-wrap.yaml)
  -b, --backend NAME    run the jobs there (default $ARV_WRAP_BACKEND, else the
                        whitelist's backend, else local)
  --as-job              run COMMAND itself as a job (a pipeline: its tools become
                        its child jobs), taking --cpus N (default 0.1 on local, 1
                        on Slurm)
  --reuse               reuse the results of earlier jobs of the tools whose rule
                        says reuse (and keep theirs); --no-reuse: neither
  -v, --verbose         one line on stderr as each job starts and ends
  -h, --help            show this help
  --version             show the version
"""

# options that take a value, and the key they set
VALUES = {"-w": "whitelists", "--whitelist": "whitelists", "-b": "backend",
          "--backend": "backend", "--run": "run", "--cpus": "cpus", "-o": "output",
          "--output": "output", "--older-than": "older_than", "--max-size": "max_size"}
FLAGS = {"-h": "help", "--help": "help", "--version": "version", "-v": "verbose",
         "--verbose": "verbose", "--as-job": "as_job", "--json": "json", "--tree": "tree",
         "--follow": "follow", "-f": "follow", "--reuse": "reuse", "--no-reuse": "no_reuse"}
RUN_OPTIONS = ("-w", "--whitelist", "-b", "--backend", "--cpus", "-h", "--help", "--version",
               "-v", "--verbose", "--as-job", "--reuse", "--no-reuse")


class Command(NamedTuple):
    serve: str               # "module.function" in arvwrap.commands: function(options,
                             # words) -> exit status (imported when used: a run of a
                             # pipeline does not pay for the other commands' imports)
    usage: str               # first line: the synopsis; then what it does
    options: tuple = ()      # the options it takes, besides -h
    words: str = "none"      # none | some (its own arguments) | command (after --)


COMMANDS = {
    "env": Command("running.env", "env [-w FILE]... [-b BACKEND]\n\nPrint export lines that "
                   "activate interception for the programs started\nafter them:  "
                   "eval \"$(arv-wrap env -w whitelist.yaml)\"", ("-w", "--whitelist", "-b",
                                                                  "--backend", "--reuse",
                                                                  "--no-reuse")),
    "check": Command("checking.check", "check [-w FILE]... [-b BACKEND] [--reuse] -- COMMAND "
                     "[ARGS...]\n\nSay, without running anything, whether that exec would be "
                     "redirected;\n--reuse: and whether an earlier job's result would be reused, "
                     "or why not.", ("-w", "--whitelist", "-b", "--backend", "--reuse"),
                     "command"),
    "jobs": Command("records.jobs", "jobs [--json] [--tree] [--run ID] [RUN]\n\nThe runs (with "
                    "counts of their jobs by state); --tree: every job under\nits parent; "
                    "--json: every record, newest first.", ("--json", "--tree", "--run"),
                    "some"),
    "show": Command("records.show", "show JOB\n\nOne record in full: what it asked for and what "
                    "it used.", (), "some"),
    "logs": Command("records.logs", "logs JOB [--follow]\n\nThe stderr kept for a job (on "
                    "backends that relay the tool's streams).", ("--follow", "-f"), "some"),
    "cancel": Command("records.cancel", "cancel JOB\n\nCancel a job and every job below it, on "
                      "their backends.", (), "some"),
    "gc": Command("records.gc", "gc --older-than AGE\n\nRemove the records of runs that ended "
                  "more than AGE ago (30d, 12h, 90m).", ("--older-than",)),
    "cache": Command("caching.cache", "cache ls|stats|clear|gc [--max-size SIZE]\n\nThe "
                     "results kept for job reuse: list them, their total, remove\nthem all, or "
                     "the least recently used until they fit SIZE (50G).", ("--max-size",),
                     "some"),
    "top": Command("views.top", "top [RUN]\n\nA live view of running pipelines (q quits).",
                   (), "some"),
    "report": Command("views.report", "report [RUN] -o FILE.html\n\nOne self-contained HTML "
                      "file: the run's tree, a timeline, what each tool used.",
                      ("-o", "--output"), "some"),
    "doctor": Command("checking.doctor", "doctor [-w FILE]... [-b BACKEND] [-- COMMAND]\n\n"
                      "Check that the shim loads and intercepts, and that the backend "
                      "answers;\nwith COMMAND, also whether the execs it makes can be "
                      "intercepted.", ("-w", "--whitelist", "-b", "--backend"), "command"),
    "preload-path": Command("checking.preload_path", "preload-path\n\nPrint the absolute path "
                            "of the shim library."),
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        options, rest, forced = parse(argv, RUN_OPTIONS, "command")
        if not forced and rest and rest[0] in COMMANDS:
            return subcommand(rest[0], options, rest[1:])
        if options.get("help"):
            print(USAGE, end="")
            return 0
        if options.get("version"):
            print(f"arv-wrap {__version__}")
            return 0
        if not rest:
            raise UsageError("no COMMAND given (see arv-wrap --help)")
        from arvwrap.commands import running
        return running.run(options, rest)
    except (UsageError, WhitelistError) as e:
        print(f"arv-wrap: {e}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as e:   # the state dir: full, read-only, not ours
        print(f"arv-wrap: cannot use the state dir {paths.state_dir()}: "
              f"{getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 125


def subcommand(name, options, argv):
    command = COMMANDS[name]
    more, words, _ = parse(argv, command.options + ("-h", "--help"), command.words)
    if more.get("help"):
        print(f"usage: arv-wrap {command.usage}")
        return 0
    more["whitelists"] = options["whitelists"] + more["whitelists"]
    more["backend"] = more["backend"] or options["backend"]
    if command.words == "none" and words:
        raise UsageError(f"unexpected argument {words[0]!r} (see arv-wrap {name} --help)")
    module, function = command.serve.split(".")
    serve = getattr(importlib.import_module(f"arvwrap.commands.{module}"), function)
    return serve(more, words)


def parse(argv, allowed, words):
    """Options (only those allowed) up to the first other word (words: "command") or
    among the words ("some"); returns (options, the other words, whether -- ended it)."""
    options = {"whitelists": [], "backend": None}
    rest = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            return options, rest + argv[i + 1:], True
        name, eq, value = word.partition("=")
        if name in VALUES and name in allowed:
            if not eq:
                if i + 1 >= len(argv):
                    raise UsageError(f"{word} needs a value")
                value, i = argv[i + 1], i + 1
            if VALUES[name] == "whitelists":
                options["whitelists"].append(value)
            else:
                options[VALUES[name]] = value
        elif word in FLAGS and word in allowed:
            options[FLAGS[word]] = True
        elif word.startswith("-") and word != "-":
            raise UsageError(f"unknown option {word} (see arv-wrap --help)")
        elif words == "command":
            return options, argv[i:], False
        else:
            rest.append(word)
        i += 1
    return options, rest, False


if __name__ == "__main__":
    sys.exit(main())
