"""A backend's two kinds of settings, both dataclasses it declares.

``Settings``: read from the environment when the backend is built. Field ``f`` of
backend ``name`` is ``ARV_WRAP_<NAME>_<F>`` (upper case); an unset or empty
variable leaves the field's default. Types: ``float``, ``int``, ``str`` (Optional
of them too); ``metadata={"parse": fn, "expected": "a size"}`` for anything else
(fn raises ValueError on a bad value).

``Options``: the backend's block in the whitelist (``slurm:``). Field types:
``str``, ``List[str]``, ``float``/``int`` (a number > 0), ``bool``; the whitelist
validates each key and its line, the field's ``metadata["check"]`` may refuse a
value (it returns the error text), and ``merge`` layers a file's block under a
tool's.
"""
import dataclasses
import typing

from arvwrap.backends import BackendError


@dataclasses.dataclass
class NoSettings:
    """A backend that reads no environment variable."""


def variable(backend_name, field_name):
    return f"ARV_WRAP_{backend_name.upper()}_{field_name.upper()}"


def from_env(cls, backend_name, env, overrides=None):
    """cls filled from env, with overrides (field name -> value, taken as they are)."""
    values = dict(overrides or {})
    for f in dataclasses.fields(cls):
        name = variable(backend_name, f.name)
        if f.name in values or not env.get(name):
            continue
        values[f.name] = _parse(cls, f, name, env[name])
    return cls(**values)


def _parse(cls, f, name, text):
    kind = _plain_type(typing.get_type_hints(cls)[f.name])
    parse = f.metadata.get("parse") or {float: float, int: int}.get(kind, str)
    try:
        return parse(text)
    except ValueError:
        expected = f.metadata.get("expected") or {float: "a number",
                                                  int: "a whole number"}.get(kind, "valid")
        raise BackendError(f"{name}={text!r} is not {expected}") from None


def _plain_type(hint):
    """int for Optional[int], list for List[str], ..."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Union and len(args) == 1:
        return _plain_type(args[0])
    return origin or hint


def option_kind(cls, f):
    """What a whitelist value of field f must be: "str", "list", "number" or "bool"."""
    kind = _plain_type(typing.get_type_hints(cls)[f.name])
    if kind is bool:
        return "bool"
    if kind in (int, float):
        return "number"
    return "list" if kind is list else "str"


def merge(cls, *layers):
    """An Options instance from validated layers (dicts of the keys each gave), the
    later over the earlier."""
    values = {}
    for f in dataclasses.fields(cls):
        for layer in layers:
            if not layer or f.name not in layer:
                continue
            if f.metadata.get("merge") == "append" and f.name in values:
                values[f.name] = values[f.name] + layer[f.name]
            else:
                values[f.name] = layer[f.name]
    return cls(**values)
