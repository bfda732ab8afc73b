"""Switching interception on: the rules, the variables, the run record.

Shared by the commands that start a run (`arv-wrap COMMAND`, `env`, `--as-job`)
and by `doctor`, which starts a run of its own to test the chain.
"""
import os
import sys

from arvwrap import paths, redact, rules_cache, store
from arvwrap.errors import UsageError


def whitelist_files(options, env):
    files = paths.find_whitelists(options["whitelists"], env)
    if not files:
        raise UsageError(paths.NO_WHITELIST_MESSAGE)
    return files


def load_rules(options, env):
    """(files, Whitelist): the rules in full, validated."""
    from arvwrap import whitelist
    files = whitelist_files(options, env)
    return files, whitelist.load(files)


def rules_for_run(options, env):
    """(files, rules with .compiled and .redact): what starting a run needs, from
    arvwrap.rules_cache when the files have not changed since they were validated."""
    files = whitelist_files(options, env)
    state = paths.state_dir(env)
    key, rules = rules_cache.lookup(state, files)
    if rules is None:
        from arvwrap import whitelist
        rules = whitelist.load(files)
        rules_cache.remember(state, key, rules)
    return files, rules


def activation_env(files, rules, options, run_id, env):
    """The variables that switch interception on (docs/internals.md, section 1)."""
    preload = env.get("LD_PRELOAD", "")
    entries = [e for e in preload.replace(" ", ":").split(":")
               if e and os.path.basename(e) != "libarvwrap.so"]
    out = {
        "LD_PRELOAD": ":".join([paths.SHIM, *entries]),
        "ARV_WRAP_SHIM": paths.SHIM,
        "ARV_WRAP_RULES": rules.compiled,
        "ARV_WRAP_WHITELIST": ":".join(files),
        "ARV_WRAP_STATE_DIR": paths.state_dir(env),
        "ARV_WRAP_PYTHON": sys.executable,
        "ARV_WRAP_RUN": run_id,
    }
    backend = options["backend"] or env.get("ARV_WRAP_BACKEND")
    if backend:
        out["ARV_WRAP_BACKEND"] = backend
    if options.get("reuse") or options.get("no_reuse"):
        out["ARV_WRAP_REUSE"] = "0" if options.get("no_reuse") else "1"
    return out


def new_run(argv, options, env, redact_globs=(), **fields):
    """A top-level record for a run; (store, its id). Its argv is recorded without
    the secrets it gives (arvwrap.redact)."""
    secrets = redact.Redactor(redact.patterns_from(env, redact_globs), env)
    db = store.Store(paths.state_dir(env))
    run_id = store.new_id()
    db.insert({"id": run_id, "run": run_id, "parent": None, "kind": "run",
               "argv": secrets.argv(argv), "cwd": os.getcwd(),
               "backend": options["backend"] or env.get("ARV_WRAP_BACKEND") or "local",
               "state": "running", "started": store.now(), "cpus": 0, "memory": 0, **fields})
    return db, run_id


def end_run(db, run_id, status):
    """Record how the command ended (status as subprocess gives it); a state dir that
    filled up meanwhile costs the record, not the command's status."""
    fields = ({"state": "exited", "exit_status": status} if status >= 0
              else {"state": "signaled", "signal": -status})
    try:
        db.update(run_id, ended=store.now(), **fields)
    except (OSError, store.sqlite3.Error) as e:
        print(f"arv-wrap: could not record the end of run {run_id}: {e}", file=sys.stderr)
