"""Callers' environments, made sense of once for all the calls that share one.

Every call of a pipeline step brings the whole environment of its caller, and the
calls of one make, shell loop or driver bring the very same one. What the
dispatcher derives from it (the variables as a dict, the values to redact, the
environment each kind of job gets) is kept per distinct environment, so a call
whose environment was seen before costs one hash of it.
"""
import collections
import os

from arvwrap import redact
from arvwrap.jobspec import job_environment

KEEP = 64         # distinct environments remembered (the most recently used)


class CallerEnv:
    """One environment: `values` (bytes -> bytes, read only), the `whitelists` it
    names (ARV_WRAP_WHITELIST), and what follows from it."""

    def __init__(self, values):
        self.values = values
        whitelists = os.fsdecode(values.get(b"ARV_WRAP_WHITELIST", b""))
        self.whitelists = tuple(f for f in whitelists.split(":") if f)
        self._patterns = {}     # a whitelist's `redact:` -> the redaction patterns
        self._secrets = {}      # redaction patterns -> the secret values
        self._job_envs = {}     # (nested, the rule's env: changes) -> the job's variables

    def redact_patterns(self, extra):
        """redact.patterns_from this environment and a whitelist's `redact:` globs."""
        found = self._patterns.get(extra)
        if found is None:
            found = self._patterns[extra] = redact.patterns_from(self.values, extra)
        return found

    def secret_values(self, patterns):
        """The values of the secret variables (arvwrap.redact) under these patterns."""
        found = self._secrets.get(patterns)
        if found is None:
            found = self._secrets[patterns] = frozenset(redact.Redactor(patterns, self.values).values)
        return found

    def job_env(self, job_id, nested, rule):
        """A new dict: the environment of job job_id (jobspec.job_environment)."""
        changes = (nested, tuple(rule.env_drop or ()), tuple((rule.env_set or {}).items())) \
            if rule is not None else (nested,)
        base = self._job_envs.get(changes)
        if base is None:
            base = self._job_envs[changes] = job_environment(self.values, None, nested, rule)
        env = dict(base)
        env[b"ARV_WRAP_JOB"] = job_id.encode()
        return env


class Envs:
    """The CallerEnv of each environment (a request's list of NAME=value entries)."""

    def __init__(self):
        self._known = collections.OrderedDict()

    def get(self, request):
        entries = tuple(request.env)
        found = self._known.get(entries)
        if found is None:
            found = self._known[entries] = CallerEnv(request.env_dict())
            if len(self._known) > KEEP:
                self._known.popitem(last=False)
        else:
            self._known.move_to_end(entries)
        return found
