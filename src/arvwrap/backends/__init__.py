"""Backends run jobs. Each lives in its own module behind one small interface:

    class Backend:
        name: str
        def check(self) -> str            # raise BackendError if it cannot answer
        def largest(self) -> (cpus, memory)   # the most one job can get
        def run(self, job, started) -> Outcome
            # run job to its end; call started(backend_id) once it runs;
            # honour job.signal()/job.cancel() (job.wake_fd becomes readable)

A backend that refuses a job returns Outcome(state="failed", message=...).
"""
import importlib


class BackendError(Exception):
    """The backend cannot take jobs at all (unknown, not installed, not answering)."""


KNOWN = {"local": "arvwrap.backends.local", "slurm": "arvwrap.backends.slurm",
         "docker": "arvwrap.backends.docker"}


def config_from_env(env):
    """Per-backend settings the user gives in the environment (read by the dispatcher
    when it starts, and by `arv-wrap check` to predict it)."""
    from arvwrap.whitelist import parse_memory
    return {"local": {"cpus": env.get("ARV_WRAP_LOCAL_CPUS"),
                      "memory": env.get("ARV_WRAP_LOCAL_MEMORY")
                      and parse_memory(env["ARV_WRAP_LOCAL_MEMORY"])}}


def process_state(name):
    """Lines saying which parts of the caller's process state a job of that backend
    keeps (its module's PROCESS_STATE), without starting the backend; () if unknown."""
    if name not in KNOWN:
        return ()
    return getattr(importlib.import_module(KNOWN[name]), "PROCESS_STATE", ())


def load(name, config):
    """The backend called name, built once per dispatcher with its config dict."""
    if name not in KNOWN:
        raise BackendError(f"unknown backend {name!r} (known: {', '.join(sorted(KNOWN))})")
    module = importlib.import_module(KNOWN[name])
    return module.Backend(config)
