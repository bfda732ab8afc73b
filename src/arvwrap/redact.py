"""Secrets kept out of what arv-wrap writes: records, logs, reports.

A variable is secret when its name matches one of the redaction globs (case-
insensitive; DEFAULTS, then the whitelists' top-level `redact:` lists, then the
caller's ARV_WRAP_REDACT, colon- or comma-separated). What arv-wrap writes about a
call has, in place of a secret, MARK:
  - an argv word NAME=VALUE, -NAME=VALUE or --NAME=VALUE with a secret NAME (what
    `env TOKEN=abc tool` or `tool --password=xyz` give): VALUE;
  - the word after a long option --NAME with a secret NAME (`--password xyz`);
  - anywhere in argv or in a text (a reason, a log line, a kept stderr): the value of
    a secret variable of the call's environment, or one given as above, when it is
    at least MIN_VALUE bytes long (shorter ones would blank out ordinary words).
The tool itself always gets its argv and environment untouched: only arv-wrap's own
copies are redacted.
"""
import fnmatch
import functools
import os
import re

DEFAULTS = ("*TOKEN*", "*SECRET*", "*PASSWORD*", "*PASSWD*", "*KEY*", "*CREDENTIAL*")
MARK = "***"
MIN_VALUE = 6
_ASSIGNMENT = re.compile(rb"(?<![\w-])(-{0,2}[A-Za-z_][\w-]*)=(\S+)")


def patterns_from(env=None, extra=()):
    """DEFAULTS, extra (a whitelist's `redact:`), then ARV_WRAP_REDACT of env (str or
    bytes keys)."""
    env = os.environ if env is None else env
    given = next((os.fsdecode(env[k]) for k in (b"ARV_WRAP_REDACT", "ARV_WRAP_REDACT")
                  if _has(env, k)), "")
    return (*DEFAULTS, *extra, *(p for p in re.split(r"[:,\s]+", given) if p))


def _secret(patterns, name):
    """Whether a variable or option name (str or bytes) is secret. Every call's
    environment names them again, so each is decided once per set of patterns."""
    decided = _decided(patterns)
    secret = decided.get(name)
    if secret is None:
        word = os.fsdecode(name).lstrip("-").upper().replace("-", "_")
        secret = bool(word) and _matcher(patterns)(word) is not None
        if len(decided) < 8192:
            decided[name] = secret
    return secret


def _has(env, key):
    try:
        return key in env
    except TypeError:          # os.environ takes only str keys
        return False


@functools.lru_cache(maxsize=64)
def _decided(patterns):
    return {}


@functools.lru_cache(maxsize=64)
def _upper(patterns):
    return tuple(p.upper() for p in patterns)


@functools.lru_cache(maxsize=64)
def _matcher(patterns):
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)).match


class Redactor:
    def __init__(self, patterns=DEFAULTS, env=None, values=None):
        """values: those of env's secret variables, if already known (arvwrap.envs)."""
        self.patterns = _upper(tuple(patterns))
        self._shown = None       # (argv, as shown) of the last argv()
        if values is not None:
            self.values = set(values)
            return
        decided = _decided(self.patterns)
        self.values = set()
        for name, value in (env or {}).items():
            secret = decided.get(name)     # inline: a call's environment is mostly known
            if secret or (secret is None and self.secret_name(name)):
                self._remember(os.fsencode(value))

    def secret_name(self, name):
        return _secret(self.patterns, name)

    def _remember(self, value):
        if len(value) >= MIN_VALUE:
            self.values.add(value)

    def argv(self, argv):
        """argv (bytes or str words) as arv-wrap may write it; the secrets it gives
        (--password=xyz) are remembered for the texts that follow."""
        words = [os.fsencode(a) for a in argv]
        if self._shown is not None and self._shown[0] == words:
            return list(self._shown[1])    # the dispatcher asks twice for each call
        shown = self._redacted(words)
        self._shown = (words, shown)
        return list(shown)

    def _redacted(self, words):
        out, hide_next = [], False
        for word in words:
            if hide_next:
                self._remember(word)
                out.append(MARK.encode())
                hide_next = False
                continue
            name, eq, value = word.partition(b"=")
            if eq and self.secret_name(name) and re.fullmatch(rb"-{0,2}[\w-]+", name):
                self._remember(value)
                out.append(name + b"=" + MARK.encode())
                continue
            if word.startswith(b"--") and not eq and self.secret_name(word):
                hide_next = True
            out.append(word)
        return [self.bytes(w) for w in out]

    def bytes(self, data):
        def assignment(m):
            return m.group(1) + b"=" + MARK.encode() if self.secret_name(m.group(1)) else m.group(0)
        data = _ASSIGNMENT.sub(assignment, data)
        for value in sorted(self.values, key=len, reverse=True):
            data = data.replace(value, MARK.encode())
        return data

    def text(self, text):
        if text is None:
            return None
        return os.fsdecode(self.bytes(os.fsencode(text)))


class StreamRedactor:
    """The values of a Redactor taken out of a stream cut anywhere: what could be the
    start of a value is held back until the next chunk shows it is not (flush() gives
    the rest at the end)."""

    def __init__(self, values):
        self.values = sorted(values, key=len, reverse=True)
        self.held = b""

    def feed(self, data):
        if not self.values:
            return data
        data = self.held + data
        for value in self.values:
            data = data.replace(value, MARK.encode())
        keep = 0
        for value in self.values:
            for n in range(min(len(value) - 1, len(data)), keep, -1):
                if data.endswith(value[:n]):
                    keep = n
                    break
        self.held = data[len(data) - keep:] if keep else b""
        return data[:len(data) - keep] if keep else data

    def flush(self):
        held, self.held = self.held, b""
        return held
