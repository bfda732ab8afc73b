"""What starting a run needs of its whitelists, kept from one run to the next.

`arv-wrap COMMAND` needs only two things of its whitelists: the compiled rules
(ARV_WRAP_RULES) and their `redact:` globs. Validating the files takes a YAML
parser, and importing that parser was the largest part of a run's start. So once
a set of files has been validated, those two things are kept in the state dir
(whitelists.json, 0600), under a key made of each file's identity (device, inode,
size, mtime, ctime) and arv-wrap's version. Any change to a file, or another
arv-wrap, misses the key, and the files are validated again as before.

A cache that cannot be read or written is only a slower start: nothing here fails.
"""
import json
import os
import sys

from arvwrap import __version__, paths

FILE = "whitelists.json"
KEEP = 64                  # sets of files remembered (the most recent)


class Summary:
    """The part of a loaded Whitelist a run's start uses."""

    def __init__(self, compiled, redact):
        self.compiled = compiled
        self.redact = tuple(redact)


def key(files):
    """The cache key of these files as they are now; None if one cannot be seen."""
    identities = []
    for name in files:
        try:
            st = os.stat(name)
        except OSError:
            return None         # the full load says what is wrong with it
        identities.append([name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                           st.st_ctime_ns])
    return json.dumps([__version__, sys.version, identities])


def lookup(state_dir, files):
    """(the key of these files now, the Summary kept for it or None)."""
    wanted = key(files)
    entry = _read(state_dir).get(wanted) if wanted else None
    try:
        return wanted, Summary(entry["compiled"], entry["redact"]) if entry else None
    except (KeyError, TypeError):
        return wanted, None


def remember(state_dir, wanted, rules):
    """Keep rules (a Whitelist validated from the files as they were at key `wanted`,
    taken before reading them: a file edited meanwhile is validated again next time)."""
    if wanted is None:
        return
    entries = _read(state_dir)
    entries.pop(wanted, None)
    entries[wanted] = {"compiled": rules.compiled, "redact": list(rules.redact)}
    kept = dict(list(entries.items())[-KEEP:])
    path = os.path.join(state_dir, FILE)
    temporary = f"{path}.{os.getpid()}"
    try:
        paths.private_dir(state_dir)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(kept, f)
        os.replace(temporary, path)      # readers see the old file or the new, whole
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass


def _read(state_dir):
    try:
        with open(os.path.join(state_dir, FILE)) as f:
            entries = json.load(f)
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}
