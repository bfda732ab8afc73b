"""Job reuse: the key of a call, and what it read and wrote.

The key is a SHA-256 over the parts that can change a result (DESIGN.md, job
reuse): the program's content (and a script's interpreter's), argv (less the
flags the rule says do not matter), the cwd, the content of every file argv
names that exists before the call, the environment less variables that cannot
matter, the image, and what stdin holds. Parts are kept with each cache entry so
that a miss can say which of them differs from the nearest earlier job.

The outputs of a job are the files argv names that it created or changed, the
values of the rule's output flags, and the rule's sibling files (an argv file's
name + a suffix, such as x.bam.bai). A job that changed a file it read (not one
of its outputs), or whose outputs include something other than regular files,
is not cached: what it did cannot be replayed.
"""
import fnmatch
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field

from arvwrap.digests import identity as file_identity

# Variables whose value cannot change a result: who and where the session is,
# the terminal, the shell's own bookkeeping, make's jobserver, job ids.
IGNORED_ENV = ("ARV_WRAP_*", "_", "PWD", "OLDPWD", "SHLVL", "USER", "LOGNAME", "HOME_*",
               "MAIL", "HOSTNAME", "TERM", "TERM_*", "COLORTERM", "COLUMNS", "LINES",
               "DISPLAY", "WINDOWID", "SSH_*", "XDG_*", "DBUS_SESSION_BUS_ADDRESS",
               "LS_COLORS", "TMPDIR", "TMP", "TEMP", "HIST*", "PS1", "PS2", "PS4",
               "PROMPT_COMMAND", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKE_TERM*",
               "SLURM_*", "SNAKEMAKE_*", "KRB5CCNAME", "OMPI_*", "PMI_*", "LD_PRELOAD")
# Search paths: kept in the key, but only their entries that exist, once each, so
# that a PATH differing only by missing or repeated directories is the same.
SEARCH_PATHS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "PERL5LIB", "R_LIBS", "R_LIBS_USER",
                "CLASSPATH", "MANPATH")


class NotReusable(Exception):
    """Why a call cannot be keyed or a job's result not kept (one line)."""


@dataclass
class Plan:
    """A call's key, and what is needed to tell afterwards what it wrote."""
    key: str
    parts: dict
    cwd: str
    before: dict = field(default_factory=dict)     # abs path -> identity, or None if absent
    declared: set = field(default_factory=set)      # abs paths of output-flag values
    named: list = field(default_factory=list)       # abs paths argv names (files or not)
    siblings: tuple = ()


def plan(spec, program, argv, cwd, env, digests, stdin, image=None):
    """The Plan of a call: spec is its rule's whitelist.Reuse, program the resolved
    path, env {bytes: bytes}, stdin what stdin_part gave (completed with a digest),
    image the container image when the backend runs one."""
    cwd = os.fsdecode(cwd)
    argv = [os.fsdecode(a) for a in argv]
    kept, declared = _argv(argv, spec)
    result = Plan(key="", parts={}, cwd=cwd, siblings=spec.siblings,
                  declared={os.path.normpath(os.path.join(cwd, d)) for d in declared})
    inputs = {}
    for word in _path_words(kept[1:]):
        path = os.path.normpath(os.path.join(cwd, word))
        result.named.append(path)
        if path in result.declared:
            continue
        try:
            st = os.stat(path)
        except OSError:
            result.before[path] = None
            continue
        result.before[path] = _identity(st)
        if stat.S_ISREG(st.st_mode):
            inputs[word] = digests.digest(path)[0]
    for suffix in spec.siblings:
        for path in list(result.named):
            sibling = path + suffix
            result.before[sibling] = _stat_identity(sibling)
    for path in result.declared:
        result.before[path] = _stat_identity(path)
    result.parts = {
        "program": _program(os.fsdecode(program), digests),
        "argv": kept,
        "cwd": cwd,
        "inputs": inputs,
        "env": _environment(env, spec.env),
        "stdin": stdin,
    }
    if image:
        result.parts["image"] = image
    result.key = hashlib.sha256(json.dumps(result.parts, sort_keys=True).encode()).hexdigest()
    return result


def outputs(plan_):
    """[abs path] of what the job wrote, after it ended; NotReusable if that cannot
    be replayed."""
    written = []
    for path, was in plan_.before.items():
        now = _stat_identity(path)
        if now == was:
            continue
        declared = path in plan_.declared
        sibling = any(path == n + s for n in plan_.named for s in plan_.siblings)
        if now is None:
            if declared or sibling or was is None:
                continue              # an output it did not write, or removed: nothing to keep
            raise NotReusable(f"it removed {path}")
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise NotReusable(f"it wrote {path}, which is not a regular file")
        if was is not None and not declared and not sibling:
            raise NotReusable(f"it changed {path}, which it was given as an input")
        written.append(path)
    return written


def _argv(argv, spec):
    """(argv less the ignored flags and their values, values of output flags)."""
    kept, declared, skip = [], [], False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if word in spec.ignore and i:
            skip = True
            continue
        if any(word.startswith(f + "=") for f in spec.ignore) and i:
            continue
        kept.append(word)
        if word in spec.outputs and i + 1 < len(argv):
            declared.append(argv[i + 1])
        for flag in spec.outputs:
            if word.startswith(flag + "="):
                declared.append(word[len(flag) + 1:])
    return kept, declared


def _path_words(words):
    """The words that may name files: plain words, and the value of --flag=value."""
    for word in words:
        if word in ("", "-"):
            continue
        if word.startswith("-"):
            if "=" in word:
                yield word.split("=", 1)[1]
            continue
        yield word


def _program(path, digests):
    """The program's digest; for a #! script, its interpreter's too."""
    part = {"digest": digests.digest(path)[0]}
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].split()
        if words and os.path.isabs(words[0]) and os.path.isfile(words[0]):
            part["interpreter"] = digests.digest(os.fsdecode(words[0]))[0]
    return part


def _environment(env, extra_ignored):
    """{name: short digest of the value} of what matters (values are not kept:
    they may be secrets)."""
    ignored = IGNORED_ENV + tuple(extra_ignored)
    out = {}
    for raw_name, raw_value in env.items():
        name, value = os.fsdecode(raw_name), os.fsdecode(raw_value)
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in ignored):
            continue
        if name in SEARCH_PATHS:
            value = ":".join(dict.fromkeys(d for d in value.split(":") if d and os.path.isdir(d)))
        out[name] = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return out


def stdin_part(fd, rule_stdin):
    """How stdin enters the key, before anything reads it: ("none"|"null"|"tty", None),
    ("file", None) for a regular file (its digest is added by the caller), or
    ("spool", None) when it must be read to its end first (a pipe, a socket)."""
    if rule_stdin == "none" or fd is None:
        return "none"
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISCHR(st.st_mode):
        return "null" if os.path.samestat(st, os.stat(os.devnull)) else "tty"
    return "spool"


def _identity(st):
    return [*file_identity(st), st.st_mode]


def _stat_identity(path):
    try:
        return _identity(os.stat(path))
    except OSError:
        return None
