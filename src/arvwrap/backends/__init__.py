"""The registry of backends: the built-in ones and those other packages install.

A backend is one class behind the interface of arvwrap.backends.base (its contract
is there). Built in: ``local`` (the embedded default), ``slurm``, ``docker``.
Another package adds one through an entry point of the group ``arvwrap.backends``,
named as the backend (``-b NAME``), pointing at its class::

    [project.entry-points."arvwrap.backends"]
    pbs = "arvwrap_pbs:Backend"

Classes are imported on first use only (entry points are read once, and only when
a name is not a built-in one), so loading the rules stays cheap.
"""
import importlib
import os
import threading


class BackendError(Exception):
    """The backend cannot take jobs at all (unknown, not installed, not answering)."""


GROUP = "arvwrap.backends"
KNOWN = {"local": "arvwrap.backends.local", "slurm": "arvwrap.backends.slurm",
         "docker": "arvwrap.backends.docker"}
_lock = threading.Lock()
_classes = {}
_plugins = None       # name -> entry point, once read


def _entry_points():
    global _plugins
    with _lock:
        if _plugins is None:
            from importlib import metadata
            found = metadata.entry_points()
            group = (found.select(group=GROUP) if hasattr(found, "select")
                     else found.get(GROUP, ()))
            _plugins = {ep.name: ep for ep in group if ep.name not in KNOWN}
        return _plugins


def names():
    """Every backend name: the built-in ones first, then the installed ones."""
    return [*KNOWN, *sorted(_entry_points())]


def find(name):
    """The class of backend name, or None if there is no such backend."""
    if name in _classes:
        return _classes[name]
    if name in KNOWN:
        cls = importlib.import_module(KNOWN[name]).Backend
    elif name in _entry_points():
        cls = _plugin(_entry_points()[name])
    else:
        return None
    _classes[name] = cls
    return cls


def _plugin(ep):
    from arvwrap.backends.base import Backend
    try:
        cls = ep.load()
    except Exception as e:
        raise BackendError(f"backend {ep.name!r} ({ep.value}) cannot be loaded: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendError(f"backend {ep.name!r} ({ep.value}) is not an "
                           f"arvwrap.backends.base.Backend")
    if cls.name != ep.name:
        raise BackendError(f"backend {ep.name!r} ({ep.value}) calls itself {cls.name!r}")
    return cls


def find_quietly(name):
    """find(name), or None for a backend that cannot be loaded either."""
    try:
        return find(name)
    except BackendError:
        return None


def backend_class(name):
    """The class of backend name; BackendError if there is none."""
    cls = find(name)
    if cls is None:
        raise BackendError(f"unknown backend {name!r} (known: {', '.join(names())})")
    return cls


def with_options():
    """The backends that have a whitelist block, in order: {name: Options class}."""
    found = {}
    for name in names():
        cls = find_quietly(name)      # a broken plug-in: -b NAME says why
        if cls is not None and cls.Options is not None:
            found[name] = cls.Options
    return found


def process_state(name):
    """Lines saying which parts of the caller's process state a job of that backend
    keeps, without starting the backend; () if unknown."""
    cls = find_quietly(name)
    return tuple(cls.process_state) if cls else ()


def load(name, env=None, state_dir=None):
    """Backend name, built (once per dispatcher) with its settings from env."""
    from arvwrap.backends import settings
    cls = backend_class(name)
    config = settings.from_env(cls.Settings, name, os.environ if env is None else env)
    return cls(config, state_dir=state_dir)
