"""Whitelists: YAML files -> validated rules -> the compiled text the shim reads.

The YAML schema is DESIGN.md section 2; the compiled form (``ARV_WRAP_RULES``) is
docs/internals.md section 2. Every pattern and condition is matched by the C
matcher (``arvwrap._match``), the very code the shim runs: nothing here matches.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable, Optional

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from arvwrap import backends
from arvwrap.errors import WhitelistError  # noqa: F401 (whitelist.WhitelistError)
from arvwrap.backends import settings as backend_settings

DEFAULT_BACKEND = "local"
RULES_VERSION = "1"
STDIN_MODES = ("auto", "pass", "none")

def __getattr__(name):
    if name == "KNOWN_BACKENDS":      # the registry's, read when asked
        return tuple(backends.names())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the rules ---------------------------------------------------------------------

@dataclass(frozen=True)
class Reuse:
    """What a tool's `reuse:` says (arvwrap.reuse reads it)."""
    ignore: tuple = ()      # flags, with their value, that do not change the result
    outputs: tuple = ()     # flags whose value names an output, existing or not
    siblings: tuple = ()    # suffixes: a file named in argv + one of them is an output
    env: tuple = ()         # variables, besides the defaults, that cannot matter


@dataclass
class Rule:
    """One tool entry, with its file's settings and defaults applied."""
    kind: str                                   # 'name' | 'path'
    pattern: str
    file: str
    line: int
    index: int = -1                             # position in the compiled rules
    when_subcommand: Optional[list] = None
    when_not_flags: Optional[list] = None
    cpus: Optional[float] = None                # fixed cpus (None when read from a flag)
    cpus_flag: Optional[list] = None            # flags that carry the tool's thread count
    cpus_default: Optional[float] = None        # used when the flag is absent or bad
    memory: Optional[int] = None                # bytes
    time: Optional[int] = None                  # seconds
    stdin: str = "auto"
    options: dict = field(default_factory=dict)  # backend name -> its block (Options), merged
    env_set: dict = field(default_factory=dict)
    env_drop: list = field(default_factory=list)
    image: Optional[str] = None
    reuse: Optional[Reuse] = None               # job reuse, when the tool opts in
    nested: bool = False
    backend: Optional[str] = None               # the file's backend, if it names one
    on_backend_error: str = "fail"
    on_oversize: str = "clamp"

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def __getattr__(self, name):
        """rule.<backend name>: that backend's block as a dict (its defaults if none)."""
        cls = backends.with_options().get(name) if not name.startswith("_") else None
        if cls is None:
            raise AttributeError(name)
        options = self.options.get(name)
        return dataclasses.asdict(options if options is not None else cls())


class Whitelist:
    """Rules in compiled (precedence) order: ``rules[i].index == i``."""

    def __init__(self, files: list, rules: list, redact=()):
        self.files = list(files)
        self.rules = rules
        self.redact = tuple(redact)   # the files' `redact:` globs, in file order
        self.compiled = compile_rules(rules)
        self._c_rules = self.compiled.encode("ascii")
        # without `when:` conditions only the program decides: each is matched once
        self._by_program = None if any(r.when_subcommand or r.when_not_flags
                                       for r in rules) else {}

    def __len__(self):
        return len(self.rules)

    @property
    def has_path_rules(self) -> bool:
        return any(r.kind == "path" for r in self.rules)

    def match(self, argv, name=None, path=None) -> Optional[Rule]:
        """The rule the shim would pick for this exec, or None.

        name: basename of the program as exec'd (default: of argv[0]);
        path: the absolute resolved path, or None (then path rules never match).
        """
        if self._by_program is not None and name is not None:
            program = (os.fsencode(name), None if path is None else os.fsencode(path))
            if program not in self._by_program:
                if len(self._by_program) >= 4096:
                    self._by_program.clear()
                self._by_program[program] = self._match(argv, name, path)
            return self._by_program[program]
        return self._match(argv, name, path)

    def _match(self, argv, name, path):
        ffi, lib = _matcher()
        name, path, c_argv, keep = _c_args(ffi, argv, name, path)
        index = lib.aw_match(self._c_rules, name, path, c_argv)
        del keep
        if index < -1 or index >= len(self.rules):
            raise RuntimeError(f"the matcher returned rule {index} of {len(self.rules)}")
        return None if index == -1 else self.rules[index]

    def explain(self, argv, name=None, path=None) -> list:
        """[(rule, reason)] for every rule, in order; reason is MATCHES for those that match."""
        ffi, lib = _matcher()
        c_name, c_path, c_argv, keep = _c_args(ffi, argv, name, path)
        out = []
        for rule in self.rules:
            code = lib.aw_check_rule(self._c_rules, rule.index, c_name, c_path, c_argv)
            out.append((rule, _reason(rule, code, path is not None)))
        del keep
        return out


MATCHES = "matches"
OTHER_NAME = "the program's name does not match"
OTHER_PATH = "the program's path does not match"
NO_PATH = "the program's path is not known"


def _reason(rule: Rule, code: int, have_path: bool) -> str:
    if code == 0:
        return MATCHES
    if code == 1:
        return OTHER_NAME if rule.kind == "name" else OTHER_PATH if have_path else NO_PATH
    if code == 2:
        return "argv[1] is not one of " + ", ".join(rule.when_subcommand or ())
    if code == 3:
        return "argv has one of " + ", ".join(rule.when_not_flags or ())
    raise RuntimeError(f"the matcher refused the compiled rules (code {code})")


def _matcher():
    from arvwrap._match import ffi, lib
    return ffi, lib


def _c_args(ffi, argv, name, path):
    """(name, path, argv) as the C matcher takes them, and the buffers to keep alive."""
    argv = [os.fsencode(a) for a in argv]
    if name is None:
        name = os.path.basename(argv[0]) if argv else b""
    keep = [ffi.new("char[]", a) for a in argv]
    c_argv = ffi.new("char *[]", keep + [ffi.NULL])
    path = ffi.NULL if path is None else os.fsencode(path)
    return os.fsencode(name), path, c_argv, keep


# -- compiled form -----------------------------------------------------------------

_SPECIAL = frozenset(b"%;|,=:")


def encode(text: str) -> str:
    """A pattern or item as the compiled form writes it (UTF-8, then %XX escapes)."""
    out = []
    for b in text.encode("utf-8", "surrogateescape"):
        out.append(f"%{b:02X}" if b <= 0x20 or b >= 0x7F or b in _SPECIAL else chr(b))
    return "".join(out)


def compile_rules(rules: list) -> str:
    """The ARV_WRAP_RULES text for rules already in precedence order."""
    parts = [RULES_VERSION]
    for rule in rules:
        text = ("n:" if rule.kind == "name" else "p:") + encode(rule.pattern)
        if rule.when_subcommand:
            text += "|s=" + ",".join(encode(s) for s in rule.when_subcommand)
        if rule.when_not_flags:
            text += "|x=" + ",".join(encode(s) for s in rule.when_not_flags)
        parts.append(text)
    return ";".join(parts)


# -- sizes and times ---------------------------------------------------------------

_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(?:I?B)?|B)?", re.I)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_CLOCK = re.compile(r"(\d+):([0-5]?\d)(?::([0-5]?\d))?")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d+)?|\.\d+)[smhd])+", re.I)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)([smhd])", re.I)


def parse_memory(text) -> int:
    """Bytes from 8G, 512M, 1.5G, 100, 4KiB... (powers of 1024); ValueError if bad."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text).strip())
        if not m:
            raise ValueError(f"not a size: {text!r}")
        value = int(Decimal(m.group(1)) * 1024 ** _POWERS[(m.group(2) or "").upper()])
    if value < 1:
        raise ValueError(f"not a size > 0: {text!r}")
    return value


def parse_time(text) -> int:
    """Seconds from 3600, 2h, 30m, 1d, 1h30m, HH:MM:SS, MM:SS; ValueError if bad."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip()
        clock = _CLOCK.fullmatch(s)
        if s.isdigit():
            value = int(s)
        elif clock:
            a, b, c = clock.groups()
            value = int(a) * 3600 + int(b) * 60 + int(c) if c else int(a) * 60 + int(b)
        elif _DURATION.fullmatch(s):
            total = sum(Decimal(n) * _UNITS[u.lower()] for n, u in _DURATION_PART.findall(s))
            value = math.ceil(total)
        else:
            raise ValueError(f"not a time: {text!r}")
    if value < 1:
        raise ValueError(f"not a time > 0: {text!r}")
    return value


# -- validation: small validators driven by schema tables ---------------------------

class _Invalid(Exception):
    """A refusal at `where` (a node, or a line number) of the key `path`."""

    def __init__(self, where, path: str, what: str):
        super().__init__(what)
        self.line = where if isinstance(where, int) else where.start_mark.line + 1
        self.path = path or "top level"
        self.what = what


class _Fields(dict):
    """A validated mapping that remembers its line and the line of each key."""

    def __init__(self, line: int):
        super().__init__()
        self.line = line
        self.lines = {}


@dataclass(frozen=True)
class _Cpus:
    fixed: Optional[float] = None
    flags: Optional[tuple] = None
    default: Optional[float] = None


Validator = Callable[[Node, str], Any]
_CONSTRUCTOR = yaml.constructor.SafeConstructor()


def _scalar(node: Node, path: str, expected: str):
    """The Python value of a scalar node; anything else is refused as not `expected`."""
    if not isinstance(node, ScalarNode):
        raise _Invalid(node, path, f"expected {expected}, got {_got(node)}")
    construct = _CONSTRUCTOR.yaml_constructors.get(node.tag)
    if construct is None:
        raise _Invalid(node, path, f"unsupported YAML tag {node.tag}")
    return construct(_CONSTRUCTOR, node)


def _got(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag.endswith(":null"):
        return "nothing (null)"
    return repr(node.value) if node.tag.endswith(":str") else node.value


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _string(node, path, expected="a string"):
    value = _scalar(node, path, expected)
    if not isinstance(value, str):
        hint = f' (quote it: "{node.value}")' if value is not None else ""
        raise _Invalid(node, path, f"expected {expected}, got {_got(node)}{hint}")
    if not value:
        raise _Invalid(node, path, f"expected {expected}, got an empty string")
    if "\0" in value:
        raise _Invalid(node, path, "a NUL byte cannot be used")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise _Invalid(node, path, f"cannot be written as bytes: {value!r}") from None
    return value


def _number_gt0(node, path, expected="a number > 0"):
    value = _scalar(node, path, expected)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise _Invalid(node, path, f"expected {expected}, got {_got(node)}")
    return value


def _boolean(node, path):
    value = _scalar(node, path, "true or false")
    if not isinstance(value, bool):
        raise _Invalid(node, path, f"expected true or false, got {_got(node)}")
    return value


def _choice(*choices):
    def check(node, path):
        value = _scalar(node, path, f"one of {', '.join(choices)}")
        if not isinstance(value, str) or value not in choices:
            raise _Invalid(node, path, f"expected one of {', '.join(choices)}, got {_got(node)}")
        return value
    return check


def _backend(node, path):
    name = _string(node, path, "a backend name")
    if name in backends.KNOWN:         # no need to read the installed ones
        return name
    known = backends.names()
    if name not in known:
        raise _Invalid(node, path, f"unknown backend {name!r} (known: {', '.join(known)})")
    return name


def _list_of(item: Validator, single_ok=False):
    def check(node, path):
        if single_ok and isinstance(node, ScalarNode):
            return [item(node, path)]
        if not isinstance(node, SequenceNode):
            expected = "a string or a list of strings" if single_ok else "a list"
            raise _Invalid(node, path, f"expected {expected}, got {_got(node)}")
        if not node.value:
            raise _Invalid(node, path, "expected a non-empty list")
        return [item(sub, f"{path}[{i}]") for i, sub in enumerate(node.value)]
    return check


def _key_text(node: Node) -> str:
    return node.value if isinstance(node, ScalarNode) else f"<{_got(node)}>"


def _mapping(schema: dict, expected="a mapping"):
    def check(node, path):
        if not isinstance(node, MappingNode):
            raise _Invalid(node, path, f"expected {expected}, got {_got(node)}")
        out = _Fields(node.start_mark.line + 1)
        for key_node, value_node in node.value:
            key = _key_text(key_node)
            key_path = _join(path, key)
            if key not in schema:
                raise _Invalid(key_node, key_path, _unknown_key(key, schema))
            if key in out:
                raise _Invalid(key_node, key_path, f"duplicate key (first on line {out.lines[key]})")
            out.lines[key] = key_node.start_mark.line + 1
            out[key] = schema[key](value_node, key_path)
        return out
    return check


def _unknown_key(key: str, schema: dict) -> str:
    close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.7)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"unknown key ({hint}known: {', '.join(schema)})"


def _env_name(node, path):
    name = _string(node, path, "a variable name")
    if "=" in name:
        raise _Invalid(node, path, f"a variable name cannot contain '=': {name!r}")
    return name


def _env_set(node, path):
    if not isinstance(node, MappingNode):
        raise _Invalid(node, path, f"expected a mapping of NAME: \"value\", got {_got(node)}")
    out, lines = {}, {}
    for key_node, value_node in node.value:
        key_path = _join(path, _key_text(key_node))
        name = _env_name(key_node, key_path)
        if name in out:
            raise _Invalid(key_node, key_path, f"duplicate key (first on line {lines[name]})")
        lines[name] = key_node.start_mark.line + 1
        out[name] = _env_value(value_node, key_path)
    return out


def _env_value(node, path):
    value = _scalar(node, path, "a string")
    if not isinstance(value, str):
        hint = f' (quote it: "{node.value}")' if value is not None else ""
        raise _Invalid(node, path, f"expected a string, got {_got(node)}{hint}")
    if "\0" in value:
        raise _Invalid(node, path, "a NUL byte cannot be used")
    return value


def _flag(node, path):
    flag = _string(node, path, "a flag")
    if any(c.isspace() for c in flag) or "=" in flag:
        raise _Invalid(node, path, f"a flag cannot contain spaces or '=': {flag!r}")
    return flag


_CPUS_FLAG = _mapping({"flag": _list_of(_flag, single_ok=True), "default": _number_gt0})
_CPUS_EXPECTED = "a number > 0 or {flag, default}"


def _cpus(node, path):
    if isinstance(node, MappingNode):
        spec = _CPUS_FLAG(node, path)
        if "flag" not in spec:
            raise _Invalid(node, path, "{flag, default} needs a flag")
        return _Cpus(flags=tuple(spec["flag"]), default=spec.get("default"))
    return _Cpus(fixed=_number_gt0(node, path, _CPUS_EXPECTED))


def _parsed(parse, expected):
    """A validator from a parse function taking an int or a string."""
    def check(node, path):
        value = _scalar(node, path, expected)
        if isinstance(node, ScalarNode) and ":" in node.value and node.style is None:
            value = node.value  # YAML 1.1 reads 4:00:00 as a base-60 int: parse the text
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise _Invalid(node, path, f"expected {expected}, got {_got(node)}")
        try:
            return parse(value)
        except ValueError:
            raise _Invalid(node, path, f"expected {expected}, got {_got(node)}") from None
    return check


_memory = _parsed(parse_memory, "bytes > 0 or a size with a K/M/G/T suffix (8G, 512M, 1.5G)")
_time = _parsed(parse_time, "seconds > 0, a time with an s/m/h/d suffix (2h, 30m), or HH:MM:SS")


PATTERN_MAX = 4096  # AW_PAT_MAX in csrc/match.h: bytes of a pattern once %-encoded


def _pattern(node, path, expected):
    pattern = _string(node, path, expected)
    if len(encode(pattern)) > PATTERN_MAX:
        raise _Invalid(node, path, f"longer than {PATTERN_MAX} bytes once encoded")
    return pattern


def _name_pattern(node, path):
    name = _pattern(node, path, "a program name (glob)")
    if "/" in name:
        raise _Invalid(node, path, f"a name is a basename, without '/' (use path: for {name!r})")
    return name


def _path_pattern(node, path):
    glob = _pattern(node, path, "a path glob")
    if not glob.startswith(("/", "*")):
        raise _Invalid(node, path, f"a path glob must be absolute (start with / or *): {glob!r}")
    return glob


def _suffix(node, path):
    suffix = _string(node, path, "a file name suffix")
    if "/" in suffix or not suffix.strip():
        raise _Invalid(node, path, f"a suffix is the end of a file name, without '/': {suffix!r}")
    return suffix


_REUSE = _mapping({"ignore": _list_of(_flag, single_ok=True),
                   "outputs": _list_of(_flag, single_ok=True),
                   "siblings": _list_of(_suffix, single_ok=True),
                   "env": _list_of(_env_name, single_ok=True)},
                  "true, false, or a mapping of ignore, outputs, siblings, env")


def _reuse(node, path):
    if isinstance(node, MappingNode):
        spec = _REUSE(node, path)
        return Reuse(**{key: tuple(value) for key, value in spec.items()})
    return Reuse() if _boolean(node, path) else None


_RESOURCES = {"cpus": _cpus, "memory": _memory, "time": _time}
_WHEN = {
    "subcommand": _list_of(_string, single_ok=True),
    "not_flags": _list_of(_string, single_ok=True),
}


class _WithBlocks(dict):
    """A schema whose keys are its own, with each backend's block (`slurm:`) before
    the key `before`; a backend is looked up only when a key is not the schema's own."""

    def __init__(self, own, before):
        super().__init__(own)
        self.before = before

    def own(self, key):
        return dict.__contains__(self, key)

    def __contains__(self, key):
        return self.own(key) or _block_class(key) is not None

    def __getitem__(self, key):
        if self.own(key):
            return dict.__getitem__(self, key)
        return _block(_block_class(key))

    def __iter__(self):
        keys = list(dict.keys(self))
        at = keys.index(self.before)
        return iter(keys[:at] + list(backends.with_options()) + keys[at:])


def _block_class(key):
    """The Options of the backend called key, if it has a whitelist block."""
    cls = backends.find_quietly(key)
    return cls.Options if cls is not None else None


_OPTION_KINDS = {"str": _string, "list": _list_of(_string), "number": _number_gt0,
                 "bool": _boolean}


def _block(options):
    """The validator of a backend's block: one key per field of its Options; a field's
    metadata["check"] refuses what the backend cannot use."""
    schema = {}
    for f in dataclasses.fields(options):
        schema[f.name] = _checked(_OPTION_KINDS[backend_settings.option_kind(options, f)],
                                  f.metadata.get("check"))
    return _mapping(schema)


def _checked(validate, check):
    if check is None:
        return validate

    def validate_and_check(node, path):
        value = validate(node, path)
        problem = check(value)
        if problem:
            raise _Invalid(node, path, problem)
        return value
    return validate_and_check


_TOOL = _WithBlocks({
    "name": _name_pattern,
    "path": _path_pattern,
    "when": _mapping(_WHEN),
    **_RESOURCES,
    "stdin": _choice(*STDIN_MODES),
    "env": _mapping({"set": _env_set, "drop": _list_of(_env_name)}),
    "image": _string,
    "reuse": _reuse,
    "nested": _boolean,
}, before="env")


def _tool(node, path):
    tool = _mapping(_TOOL, "a tool entry (a mapping with name: or path:)")(node, path)
    kinds = [k for k in ("name", "path") if k in tool]
    if not kinds:
        raise _Invalid(node, path, "a tool needs a name: or a path:")
    if len(kinds) == 2:
        line = max(tool.lines["name"], tool.lines["path"])
        raise _Invalid(line, path, "give either name: or path:, not both")
    return tool


def _tools(node, path):
    if not isinstance(node, SequenceNode):
        raise _Invalid(node, path, f"expected a list of tools, got {_got(node)}")
    tools, seen = [], {}
    for i, sub in enumerate(node.value):
        tool = _tool(sub, f"{path}[{i}]")
        kind = "name" if "name" in tool else "path"
        key = (kind, tool[kind])
        if key in seen:
            raise _Invalid(tool.lines[kind], f"{path}[{i}].{kind}",
                          f"{tool[kind]!r} already has a rule on line {seen[key]}")
        seen[key] = tool.lines[kind]
        tools.append(tool)
    return tools


_FILE_KEYS = _WithBlocks({
    "backend": _backend,
    "on_backend_error": _choice("fail", "local"),
    "on_oversize": _choice("clamp", "refuse"),
    "defaults": _mapping(_RESOURCES),
    "tools": _tools,
    "redact": _list_of(_string),
}, before="tools")
_FILE = _mapping(_FILE_KEYS, "a mapping of whitelist settings (backend:, defaults:, tools:, ...)")


# -- loading -----------------------------------------------------------------------

def _read(path: str) -> Optional[_Fields]:
    """One file, validated; None when it is empty."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise WhitelistError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise WhitelistError(f"{path}:{line}: YAML error: not UTF-8 text "
                             f"(byte 0x{data[e.start]:02x})") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}" if mark else path
        what = "; ".join(str(p) for p in (e.context, e.problem) if p)
        raise WhitelistError(f"{where}: YAML error: {' '.join(what.split())}") from None
    except yaml.YAMLError as e:
        raise WhitelistError(f"{path}: YAML error: {' '.join(str(e).split())}") from None
    if root is None or (isinstance(root, ScalarNode) and root.tag.endswith(":null")):
        return None
    try:
        return _FILE(root, "")
    except _Invalid as e:
        raise WhitelistError(f"{path}:{e.line}: {e.path}: {e.what}") from None


def _options(settings: _Fields, tool: _Fields) -> dict:
    """{backend name: its Options} for the blocks the file or the tool gives."""
    given = [k for k in settings if not _FILE_KEYS.own(k)] + [k for k in tool
                                                               if not _TOOL.own(k)]
    return {name: backend_settings.merge(_block_class(name), settings.get(name), tool.get(name))
            for name in dict.fromkeys(given)}


def _rule(path: str, settings: _Fields, tool: _Fields) -> Rule:
    kind = "name" if "name" in tool else "path"
    defaults = settings.get("defaults", {})
    resource = lambda key: tool.get(key, defaults.get(key))
    cpus = resource("cpus") or _Cpus()
    base = defaults.get("cpus") or _Cpus()
    fallback = cpus.default or base.fixed or base.default or 1
    when = tool.get("when", {})
    env = tool.get("env", {})
    return Rule(
        kind=kind, pattern=tool[kind], file=path, line=tool.line,
        when_subcommand=when.get("subcommand"), when_not_flags=when.get("not_flags"),
        cpus=cpus.fixed, cpus_flag=list(cpus.flags) if cpus.flags else None,
        cpus_default=fallback if cpus.flags else None,
        memory=resource("memory"), time=resource("time"),
        stdin=tool.get("stdin", "auto"),
        options=_options(settings, tool),
        env_set=dict(env.get("set", {})), env_drop=list(env.get("drop", [])),
        image=tool.get("image"), reuse=tool.get("reuse"), nested=tool.get("nested", False),
        backend=settings.get("backend"),
        on_backend_error=settings.get("on_backend_error", "fail"),
        on_oversize=settings.get("on_oversize", "clamp"),
    )


def load(paths) -> Whitelist:
    """Read and validate whitelist files, in order; WhitelistError names what is wrong."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    paths = [os.fsdecode(p) for p in paths]
    per_file, redact = [], []
    for path in paths:
        settings = _read(path) or _Fields(1)
        redact += settings.get("redact", [])
        per_file.append([_rule(path, settings, tool) for tool in settings.get("tools", [])])
    # a later file's rule for the same (kind, pattern) replaces the earlier one
    newest = {}
    for n, rules in enumerate(per_file):
        for rule in rules:
            newest[(rule.kind, rule.pattern)] = n
    ordered = [rule
               for kind in ("path", "name")
               for n in reversed(range(len(per_file)))
               for rule in per_file[n]
               if rule.kind == kind and newest[(kind, rule.pattern)] == n]
    for i, rule in enumerate(ordered):
        rule.index = i
    return Whitelist(paths, ordered, redact)


def choose_backend(rule: Optional[Rule], cli_backend=None, env=os.environ) -> str:
    """-b, else $ARV_WRAP_BACKEND, else the rule's file's backend, else local."""
    return cli_backend or env.get("ARV_WRAP_BACKEND") or (rule and rule.backend) or DEFAULT_BACKEND


# -- resources ---------------------------------------------------------------------

_POSITIVE = re.compile(rb"\d+(?:\.\d+)?|\.\d+")


def _flag_values(flags, argv):
    """(flag, value) for each occurrence of a flag in argv, in order; value None if missing."""
    found = []
    args = [os.fsencode(a) for a in argv[1:]]
    for flag in (f.encode("utf-8", "surrogateescape") for f in flags):
        short = len(flag) == 2 and flag[:1] == b"-" and flag != b"--"
        i = 0
        while i < len(args) and args[i] != b"--":
            arg = args[i]
            if arg == flag:
                found.append((i, flag, args[i + 1] if i + 1 < len(args) else None))
                i += 1
            elif arg.startswith(flag + b"="):
                found.append((i, flag, arg[len(flag) + 1:]))
            elif short and arg.startswith(flag):
                found.append((i, flag, arg[2:]))
            i += 1
    return [(flag, value) for _, flag, value in sorted(found)]


def resources(rule: Rule, argv) -> tuple:
    """(cpus, memory, time, notes) for one call of rule's tool."""
    notes = []
    if rule.cpus_flag:
        cpus = float(rule.cpus_default or 1)
        found = _flag_values(rule.cpus_flag, argv)
        if found:
            flag, value = found[-1]
            flag = os.fsdecode(flag)
            if value is not None and _POSITIVE.fullmatch(value) and float(value) > 0:
                cpus = float(value)
            else:
                shown = "nothing" if value is None else repr(os.fsdecode(value))
                notes.append(f"cpus: {flag} gave {shown}, not a number > 0; using {cpus:g}")
    elif rule.cpus is not None:
        cpus = float(rule.cpus)
    else:
        cpus = 1.0
    return cpus, rule.memory, rule.time, notes


# -- `arv-wrap check` ----------------------------------------------------------------

def _size(n: int) -> str:
    for unit, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        if n >= 1024 ** power and n % 1024 ** power == 0:
            return f"{n // 1024 ** power}{unit}"
    return f"{n} bytes"


def _duration(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def describe(whitelist: Whitelist, argv, name=None, path=None, backend=None,
             env=os.environ) -> str:
    """What arv-wrap would do with this exec, as text for `arv-wrap check`."""
    argv = [os.fsencode(a) for a in argv]
    shown = os.fsdecode(name if name is not None else os.path.basename(argv[0]))
    lines = []
    rule = whitelist.match(argv, name, path)
    for candidate, reason in whitelist.explain(argv, name, path):
        if reason in (OTHER_NAME, OTHER_PATH, NO_PATH):
            continue  # rules about other programs
        mark = "->" if candidate is rule else "  "
        lines.append(f"{mark} rule {candidate.index} ({candidate.kind} {candidate.pattern!r}, "
                     f"{candidate.where}): {reason}")
    if rule is None:
        where = os.fsdecode(path) if path else "not found on PATH"
        lines.insert(0, f"{shown} ({where}): runs locally, no rule redirects it")
        return "\n".join(lines)
    if path is None:
        lines.insert(0, f"{shown} (not found on PATH): rule {rule.index} ({rule.where}) "
                        f"matches, but the exec is left to fail as it would without arv-wrap")
        return "\n".join(lines)
    cpus, memory, seconds, notes = resources(rule, argv)
    lines.insert(0, f"{shown} ({os.fsdecode(path)}): redirected as a job "
                    f"by rule {rule.index} ({rule.where})")
    lines.append("command: " + shlex.join(os.fsdecode(a) for a in argv))
    lines.append(f"backend: {choose_backend(rule, backend, env)}")
    lines.append(f"cpus: {cpus:g}   memory: {_size(memory) if memory else '-'}   "
                 f"time: {_duration(seconds) if seconds else '-'}")
    lines.append(f"stdin: {rule.stdin}   nested: {'yes' if rule.nested else 'no'}   "
                 f"on_backend_error: {rule.on_backend_error}   on_oversize: {rule.on_oversize}")
    for block, options in rule.options.items():
        given = {k: v for k, v in dataclasses.asdict(options).items() if v}
        if given:
            lines.append(f"{block}: " + ", ".join(f"{k}={v}" for k, v in given.items()))
    if rule.env_set or rule.env_drop:
        lines.append("env: " + " ".join([f"{k}={v}" for k, v in rule.env_set.items()]
                                        + [f"-{k}" for k in rule.env_drop]))
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
