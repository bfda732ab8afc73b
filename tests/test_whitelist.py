"""Whitelist YAML -> validated rules -> compiled text, matched by the C matcher."""
import os
import textwrap

import pytest

from arvwrap import whitelist
from arvwrap.whitelist import WhitelistError, load, parse_memory, parse_time, resources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024 ** 3
MiB = 1024 ** 2


@pytest.fixture
def write(tmp_path):
    """write(text, name) -> path of a whitelist file holding the dedented text."""
    def write(text, name="w.yaml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return str(path)
    return write


@pytest.fixture
def matcher():
    """The cffi module built from csrc/match.c (a failure on CI, a skip elsewhere)."""
    try:
        from arvwrap import _match
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("arvwrap._match is not built")
        pytest.skip("arvwrap._match is not built (python setup.py build_ext --inplace)")
    return _match


def one(write, text):
    """The single rule of a one-file whitelist."""
    rules = load([write(text)]).rules
    assert len(rules) == 1
    return rules[0]


def error(write, text):
    path = write(text)
    with pytest.raises(WhitelistError) as e:
        load([path])
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(path + ":")
    return message[len(path) + 1:]


# -- the full schema ---------------------------------------------------------------

FULL = """\
    backend: slurm
    on_backend_error: local
    on_oversize: refuse
    defaults:
      cpus: 1
      memory: 1G
      time: 2h
    slurm:
      partition: short
      account: lab
      qos: normal
      extra: ["--constraint=avx2"]
    tools:
      - name: bwa
        when:
          subcommand: [mem, aln, sampe, samse]
          not_flags: [--version, -h, --help]
        cpus: {flag: -t, default: 1}
        memory: 8G
        time: 4h
        stdin: auto
        slurm: {partition: long, extra: [--exclusive]}
        env: {set: {OMP_NUM_THREADS: "1"}, drop: [DISPLAY]}
      - path: /opt/*/bin/gatk
        memory: 16G
        image: broadinstitute/gatk:4.5
        reuse: true
      - name: bcbio_nextgen.py
        nested: true
        stdin: none
"""


def test_full_schema_from_design(write):
    path = write(FULL)
    wl = load([path])
    gatk, bwa, bcbio = wl.rules           # path rules first
    assert [r.index for r in wl.rules] == [0, 1, 2]
    assert (bwa.kind, bwa.pattern, bwa.file, bwa.line) == ("name", "bwa", path, 14)
    assert bwa.when_subcommand == ["mem", "aln", "sampe", "samse"]
    assert bwa.when_not_flags == ["--version", "-h", "--help"]
    assert (bwa.cpus, bwa.cpus_flag, bwa.cpus_default) == (None, ["-t"], 1)
    assert (bwa.memory, bwa.time, bwa.stdin) == (8 * GiB, 4 * 3600, "auto")
    assert bwa.slurm == {"partition": "long", "account": "lab", "qos": "normal",
                         "extra": ["--constraint=avx2", "--exclusive"]}
    assert (bwa.env_set, bwa.env_drop) == ({"OMP_NUM_THREADS": "1"}, ["DISPLAY"])
    assert (bwa.backend, bwa.on_backend_error, bwa.on_oversize) == ("slurm", "local", "refuse")
    assert (bwa.image, bwa.reuse, bwa.nested) == (None, None, False)
    assert (gatk.kind, gatk.pattern, gatk.line) == ("path", "/opt/*/bin/gatk", 24)
    assert (gatk.memory, gatk.time, gatk.cpus) == (16 * GiB, 2 * 3600, 1)   # defaults fill in
    assert (gatk.image, gatk.reuse) == ("broadinstitute/gatk:4.5", whitelist.Reuse())
    assert gatk.slurm["partition"] == "short"
    assert (bcbio.nested, bcbio.stdin, bcbio.memory) == (True, "none", GiB)
    assert wl.compiled == ("1;p:/opt/*/bin/gatk;"
                           "n:bwa|s=mem,aln,sampe,samse|x=--version,-h,--help;"
                           "n:bcbio_nextgen.py")


def test_settings_have_defaults(write):
    rule = one(write, "tools: [{name: x}]")
    assert (rule.backend, rule.on_backend_error, rule.on_oversize) == (None, "fail", "clamp")
    assert (rule.cpus, rule.memory, rule.time, rule.stdin) == (None, None, None, "auto")
    assert (rule.when_subcommand, rule.when_not_flags) == (None, None)
    assert rule.slurm == {"partition": None, "account": None, "qos": None, "extra": []}
    assert (rule.env_set, rule.env_drop, rule.image, rule.reuse, rule.nested) == \
        ({}, [], None, None, False)
    assert resources(rule, ["x"]) == (1.0, None, None, [])


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n", "tools: []\n",
                                  "backend: local\n"])
def test_empty_whitelists(write, text):
    wl = load([write(text)])
    assert wl.rules == [] and wl.compiled == "1"


@pytest.mark.parametrize("backend", whitelist.KNOWN_BACKENDS)
def test_known_backends(write, backend):
    assert one(write, f"backend: {backend}\ntools: [{{name: x}}]").backend == backend


def test_subcommand_and_not_flags_accept_a_single_string(write):
    rule = one(write, "tools: [{name: git, when: {subcommand: clone, not_flags: --help}}]")
    assert (rule.when_subcommand, rule.when_not_flags) == (["clone"], ["--help"])


def test_tool_values_override_file_defaults(write):
    rule = one(write, """\
        defaults: {cpus: 2, memory: 1G, time: 1h}
        tools: [{name: x, cpus: 0.25, memory: 512M}]
    """)
    assert (rule.cpus, rule.memory, rule.time) == (0.25, 512 * MiB, 3600)
    assert resources(rule, ["x"]) == (0.25, 512 * MiB, 3600, [])


def test_flag_default_falls_back_to_file_defaults(write):
    rule = one(write, """\
        defaults: {cpus: 3}
        tools: [{name: x, cpus: {flag: [-t, --threads]}}]
    """)
    assert (rule.cpus_flag, rule.cpus_default) == (["-t", "--threads"], 3)
    assert resources(rule, ["x"])[0] == 3.0
    assert resources(rule, ["x", "--threads", "5"])[0] == 5.0


def test_flag_cpus_in_defaults_apply_to_tools(write):
    rule = one(write, "defaults: {cpus: {flag: -p, default: 2}}\ntools: [{name: x}]")
    assert (rule.cpus_flag, rule.cpus_default) == (["-p"], 2)


def test_merge_of_slurm_options(write):
    rule = one(write, """\
        slurm: {partition: a, qos: q, extra: [--x]}
        tools: [{name: t, slurm: {partition: b, account: c, extra: [--y, --z]}}]
    """)
    assert rule.slurm == {"partition": "b", "account": "c", "qos": "q",
                          "extra": ["--x", "--y", "--z"]}


# -- sizes and times ---------------------------------------------------------------

@pytest.mark.parametrize("text, size", [
    (1, 1), (1048576, MiB), ("100", 100), ("100B", 100), ("8G", 8 * GiB), ("8g", 8 * GiB),
    ("8GB", 8 * GiB), ("8GiB", 8 * GiB), ("512M", 512 * MiB), ("512MB", 512 * MiB),
    ("1.5G", 1536 * MiB), ("4K", 4096), ("4k", 4096), ("2T", 2 * 1024 ** 4),
    (" 3 M ", 3 * MiB), (".5K", 512),
])
def test_parse_memory(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "G", "8X", "8 GB B", "-1G", "0", "0M", "1e9", "8P",
                                  "eight", "1,5G", True])
def test_parse_memory_refuses(text):
    with pytest.raises(ValueError):
        parse_memory(text)


@pytest.mark.parametrize("text, seconds", [
    (90, 90), ("90", 90), ("45s", 45), ("30m", 1800), ("2h", 7200), ("1d", 86400),
    ("1h30m", 5400), ("1.5h", 5400), ("2H", 7200), ("01:02:03", 3723), ("4:00:00", 14400),
    ("100:00:00", 360000), ("05:30", 330), ("0.5s", 1),
])
def test_parse_time(text, seconds):
    assert parse_time(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "2x", "2 hours", "-5m", "0", "0s", "1:60",
                                  "1:2:3:4", "1:00:60", "soon", "2h 30m", False])
def test_parse_time_refuses(text):
    with pytest.raises(ValueError):
        parse_time(text)


@pytest.mark.parametrize("value, seconds", [
    ("4:00:00", 14400),      # YAML 1.1 would read a base-60 int: same seconds, parsed as text
    ("04:00:00", 14400), ("'4:00:00'", 14400), ("1:30", 90), ("3600", 3600), ("30m", 1800),
])
def test_time_in_yaml(write, value, seconds):
    assert one(write, f"tools:\n  - name: x\n    time: {value}\n").time == seconds


@pytest.mark.parametrize("value, size", [("8G", 8 * GiB), ("1024", 1024), ("'1024'", 1024),
                                         ("1.5G", 1536 * MiB)])
def test_memory_in_yaml(write, value, size):
    assert one(write, f"tools:\n  - name: x\n    memory: {value}\n").memory == size


# -- refusals: each names the file, the line and the key path ------------------------

BAD = [
    # (yaml, line, "key.path: what is wrong")
    ("backend: pbs\n", 1, "backend: unknown backend 'pbs' (known: local, slurm, docker)"),
    ("backend: [slurm]\n", 1, "backend: expected a backend name, got a list"),
    ("backend: 1\n", 1, 'backend: expected a backend name, got 1 (quote it: "1")'),
    ("on_backend_error: retry\n", 1,
     "on_backend_error: expected one of fail, local, got 'retry'"),
    ("on_oversize: clip\n", 1, "on_oversize: expected one of clamp, refuse, got 'clip'"),
    ("color: red\n", 1, "color: unknown key (known: backend, on_backend_error, on_oversize, "
                        "defaults, slurm, tools, redact)"),
    ("tool: []\n", 1, "tool: unknown key (did you mean tools? known: backend, "
                      "on_backend_error, on_oversize, defaults, slurm, tools, redact)"),
    ("- name: x\n", 1, "top level: expected a mapping of whitelist settings "
                       "(backend:, defaults:, tools:, ...), got a list"),
    ("defaults:\n  cpus: 0\n", 2, "defaults.cpus: expected a number > 0 or {flag, default}, got 0"),
    ("defaults:\n  image: x\n", 2, "defaults.image: unknown key (known: cpus, memory, time)"),
    ("defaults: 4\n", 1, "defaults: expected a mapping, got 4"),
    ("slurm:\n  partition: 5\n", 2, 'slurm.partition: expected a string, got 5 (quote it: "5")'),
    ("slurm:\n  extra: --x\n", 2, "slurm.extra: expected a list, got '--x'"),
    ("slurm:\n  extra: [--x, 3]\n", 2, 'slurm.extra[1]: expected a string, got 3 (quote it: "3")'),
    ("slurm:\n  nodes: 2\n", 2, "slurm.nodes: unknown key (known: partition, account, qos, extra)"),
    ("tools: {name: x}\n", 1, "tools: expected a list of tools, got a mapping"),
    ("tools:\n", 1, "tools: expected a list of tools, got nothing (null)"),
    ("tools:\n  - x\n", 2, "tools[0]: expected a tool entry (a mapping with name: or path:), got 'x'"),
    ("tools:\n  - cpus: 2\n", 2, "tools[0]: a tool needs a name: or a path:"),
    ("tools:\n  - name: x\n    path: /x\n", 3, "tools[0]: give either name: or path:, not both"),
    ("tools:\n  - name: ''\n", 2, "tools[0].name: expected a program name (glob), got an empty string"),
    ("tools:\n  - name: bin/x\n", 2,
     "tools[0].name: a name is a basename, without '/' (use path: for 'bin/x')"),
    ("tools:\n  - path: bin/x\n", 2,
     "tools[0].path: a path glob must be absolute (start with / or *): 'bin/x'"),
    ("tools:\n  - name: 12\n", 2,
     'tools[0].name: expected a program name (glob), got 12 (quote it: "12")'),
    ("tools:\n  - name: x\n  - name: y\n  - name: x\n", 4,
     "tools[2].name: 'x' already has a rule on line 2"),
    ("tools:\n  - path: /a\n  - path: /a\n", 3, "tools[1].path: '/a' already has a rule on line 2"),
    ("tools:\n  - name: x\n    cpus: 1\n    cpus: 2\n", 4,
     "tools[0].cpus: duplicate key (first on line 3)"),
    ("tools:\n  - name: x\n    cpu: 2\n", 3, "tools[0].cpu: unknown key (did you mean cpus? "
     "known: name, path, when, cpus, memory, time, stdin, slurm, env, image, reuse, nested)"),
    ("tools:\n  - name: x\n\n    cpus: lots\n", 4,
     "tools[0].cpus: expected a number > 0 or {flag, default}, got 'lots'"),
    ("tools:\n  - name: x\n    cpus: -1\n", 3,
     "tools[0].cpus: expected a number > 0 or {flag, default}, got -1"),
    ("tools:\n  - name: x\n    cpus: .inf\n", 3,
     "tools[0].cpus: expected a number > 0 or {flag, default}, got .inf"),
    ("tools:\n  - name: x\n    cpus: true\n", 3,
     "tools[0].cpus: expected a number > 0 or {flag, default}, got true"),
    ("tools:\n  - name: x\n    cpus: [1]\n", 3,
     "tools[0].cpus: expected a number > 0 or {flag, default}, got a list"),
    ("tools:\n  - name: x\n    cpus: {default: 2}\n", 3, "tools[0].cpus: {flag, default} needs a flag"),
    ("tools:\n  - name: x\n    cpus:\n      flag: -t\n      default: 0\n", 5,
     "tools[0].cpus.default: expected a number > 0, got 0"),
    ("tools:\n  - name: x\n    cpus: {flag: '-t 4'}\n", 3,
     "tools[0].cpus.flag: a flag cannot contain spaces or '=': '-t 4'"),
    ("tools:\n  - name: x\n    cpus: {flag: [-t, 4]}\n", 3,
     'tools[0].cpus.flag[1]: expected a flag, got 4 (quote it: "4")'),
    ("tools:\n  - name: x\n    cpus: {flag: -t, max: 4}\n", 3,
     "tools[0].cpus.max: unknown key (known: flag, default)"),
    ("tools:\n  - name: x\n    memory: lots\n", 3, "tools[0].memory: expected bytes > 0 or a size "
     "with a K/M/G/T suffix (8G, 512M, 1.5G), got 'lots'"),
    ("tools:\n  - name: x\n    memory: 1.5\n", 3, "tools[0].memory: expected bytes > 0 or a size "
     "with a K/M/G/T suffix (8G, 512M, 1.5G), got 1.5"),
    ("tools:\n  - name: x\n    memory: 0\n", 3, "tools[0].memory: expected bytes > 0 or a size "
     "with a K/M/G/T suffix (8G, 512M, 1.5G), got 0"),
    ("tools:\n  - name: x\n    time: 2 hours\n", 3, "tools[0].time: expected seconds > 0, a time "
     "with an s/m/h/d suffix (2h, 30m), or HH:MM:SS, got '2 hours'"),
    ("tools:\n  - name: x\n    time: 1:75\n", 3, "tools[0].time: expected seconds > 0, a time "
     "with an s/m/h/d suffix (2h, 30m), or HH:MM:SS, got '1:75'"),
    ("tools:\n  - name: x\n    time: 1.5\n", 3, "tools[0].time: expected seconds > 0, a time "
     "with an s/m/h/d suffix (2h, 30m), or HH:MM:SS, got 1.5"),
    ("tools:\n  - name: x\n    stdin: yes\n", 3,
     "tools[0].stdin: expected one of auto, pass, none, got yes"),
    ("tools:\n  - name: x\n    stdin: closed\n", 3,
     "tools[0].stdin: expected one of auto, pass, none, got 'closed'"),
    ("tools:\n  - name: x\n    when: [mem]\n", 3, "tools[0].when: expected a mapping, got a list"),
    ("tools:\n  - name: x\n    when:\n      subcommand: []\n", 4,
     "tools[0].when.subcommand: expected a non-empty list"),
    ("tools:\n  - name: x\n    when:\n      not_flags: [-v, -1]\n", 4,
     'tools[0].when.not_flags[1]: expected a string, got -1 (quote it: "-1")'),
    ("tools:\n  - name: x\n    when:\n      not_flags: ['']\n", 4,
     "tools[0].when.not_flags[0]: expected a string, got an empty string"),
    ("tools:\n  - name: x\n    when:\n      flags: [-v]\n", 4,
     "tools[0].when.flags: unknown key (did you mean not_flags? known: subcommand, not_flags)"),
    ("tools:\n  - name: x\n    when: {subcommand: {a: b}}\n", 3,
     "tools[0].when.subcommand: expected a string or a list of strings, got a mapping"),
    ("tools:\n  - name: x\n    slurm: {partition: [a]}\n", 3,
     "tools[0].slurm.partition: expected a string, got a list"),
    ("tools:\n  - name: x\n    env:\n      set:\n        OMP_NUM_THREADS: 1\n", 5,
     'tools[0].env.set.OMP_NUM_THREADS: expected a string, got 1 (quote it: "1")'),
    ("tools:\n  - name: x\n    env:\n      set:\n        A:\n", 5,
     "tools[0].env.set.A: expected a string, got nothing (null)"),
    ("tools:\n  - name: x\n    env:\n      set: {A: a, A: b}\n", 4,
     "tools[0].env.set.A: duplicate key (first on line 4)"),
    ("tools:\n  - name: x\n    env:\n      set: {'A=B': a}\n", 4,
     "tools[0].env.set.A=B: a variable name cannot contain '=': 'A=B'"),
    ("tools:\n  - name: x\n    env:\n      set: [A]\n", 4,
     'tools[0].env.set: expected a mapping of NAME: "value", got a list'),
    ("tools:\n  - name: x\n    env:\n      drop: DISPLAY\n", 4,
     "tools[0].env.drop: expected a list, got 'DISPLAY'"),
    ("tools:\n  - name: x\n    env:\n      keep: [A]\n", 4,
     "tools[0].env.keep: unknown key (known: set, drop)"),
    ("tools:\n  - name: x\n    image: 3\n", 3, 'tools[0].image: expected a string, got 3 (quote it: "3")'),
    ("tools:\n  - name: x\n    reuse: maybe\n", 3, "tools[0].reuse: expected true or false, got 'maybe'"),
    ("tools:\n  - name: x\n    reuse: {ignor: [-t]}\n", 3,
     "tools[0].reuse.ignor: unknown key (did you mean ignore? known: ignore, outputs, siblings, env)"),
    ("tools:\n  - name: x\n    reuse:\n      siblings: [a/.bai]\n", 4,
     "tools[0].reuse.siblings[0]: a suffix is the end of a file name, without '/': 'a/.bai'"),
    ("tools:\n  - name: x\n    reuse: [-t]\n", 3,
     "tools[0].reuse: expected true or false, got a list"),
    ("tools:\n  - name: x\n    nested: 1\n", 3, "tools[0].nested: expected true or false, got 1"),
    ("tools:\n  - name: x\n    nested: !!binary aGVsbG8=\n", 3,
     "tools[0].nested: expected true or false, got aGVsbG8="),
    ("tools:\n  - name: !custom x\n", 2, "tools[0].name: unsupported YAML tag !custom"),
    ("tools:\n  - name: x\n  - name: \"a\\0b\"\n", 3, "tools[1].name: a NUL byte cannot be used"),
]


@pytest.mark.parametrize("text, line, message", BAD, ids=[b[2].split(":")[0] for b in BAD])
def test_refused(write, text, line, message):
    assert error(write, text) == f"{line}: {message}"


def test_refusal_in_a_later_file_names_that_file(write):
    good = write("tools: [{name: x}]", "a.yaml")
    bad = write("tools:\n  - name: y\n    memory: much\n", "b.yaml")
    with pytest.raises(WhitelistError, match=r"^" + bad + r":3: tools\[0\]\.memory: "):
        load([good, bad])


def test_pattern_longer_than_the_matcher_takes(write):
    assert error(write, "tools: [{name: '" + "a" * 4097 + "'}]") == \
        "1: tools[0].name: longer than 4096 bytes once encoded"
    assert error(write, "tools: [{name: '" + ";" * 1366 + "'}]") == \
        "1: tools[0].name: longer than 4096 bytes once encoded"
    load([write("tools: [{name: '" + ";" * 1365 + "'}]")])


@pytest.mark.parametrize("text, line, start", [
    ("tools: [\n", 2, "YAML error: while parsing a flow node; expected the node content"),
    ("tools:\n  - name: x\n   bad: 1\n", 3, "YAML error: "),
    ("a: 'open\n", 2, "YAML error: while scanning a quoted scalar; found unexpected end"),
    ("a: 1\n---\nb: 2\n", 2, "YAML error: expected a single document in the stream"),
    ("a: *nowhere\n", 1, "YAML error: found undefined alias 'nowhere'"),
])
def test_yaml_syntax_errors(write, text, line, start):
    message = error(write, text)
    assert message.startswith(f"{line}: {start}")


def test_not_utf8(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_bytes(b"tools:\n  - name: \xff\n")
    with pytest.raises(WhitelistError) as e:
        load([str(path)])
    assert str(e.value) == f"{path}:2: YAML error: not UTF-8 text (byte 0xff)"


def test_unreadable(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(WhitelistError) as e:
        load([missing])
    assert str(e.value) == f"{missing}: cannot read: No such file or directory"
    with pytest.raises(WhitelistError) as e:
        load([str(tmp_path)])
    assert str(e.value) == f"{tmp_path}: cannot read: Is a directory"


# -- cpus from the tool's own flag --------------------------------------------------

@pytest.mark.parametrize("argv, cpus", [
    (["bwa", "mem"], 2.0),                               # absent: the default
    (["bwa", "mem", "-t", "4", "ref"], 4.0),
    (["bwa", "mem", "-t4"], 4.0),
    (["bwa", "mem", "-t=4"], 4.0),
    (["bwa", "mem", "--threads", "6"], 6.0),
    (["bwa", "mem", "--threads=6"], 6.0),
    (["bwa", "mem", "-t", "4", "--threads=6", "-t8"], 8.0),   # the last one wins
    (["bwa", "mem", "-t8", "--threads", "3"], 3.0),
    (["bwa", "mem", "-t", "0.5"], 0.5),                      # fractions
    ([b"bwa", b"mem", b"-t", b"12"], 12.0),                  # bytes too
    (["bwa", "mem", "--", "-t", "4"], 2.0),                  # not after --
    (["bwa", "-t", "-t", "5"], 2.0),                         # as getopt: '-t' is -t's value
    (["bwa", "mem", "--threadsX=4"], 2.0),                   # long flags have no glued form
    (["bwa", "-tx"], 2.0),
])
def test_cpus_flag_forms(write, argv, cpus):
    rule = one(write, "tools: [{name: bwa, cpus: {flag: [-t, --threads], default: 2}}]")
    assert resources(rule, argv)[0] == cpus


@pytest.mark.parametrize("argv, shown", [
    (["bwa", "-t", "many"], "'many'"),
    (["bwa", "-t", "0"], "'0'"),
    (["bwa", "-t", "-3"], "'-3'"),
    (["bwa", "--threads="], "''"),
    (["bwa", "-t", "nan"], "'nan'"),
    (["bwa", "-t", "4", "-t"], "nothing"),                  # the last occurrence has no value
    (["bwa", "-t4", "-t", "x"], "'x'"),                     # a bad last one does not fall back to 4
])
def test_bad_flag_value_falls_back_to_the_default(write, argv, shown):
    rule = one(write, "tools: [{name: bwa, cpus: {flag: [-t, --threads], default: 2}}]")
    cpus, _, _, notes = resources(rule, argv)
    assert cpus == 2.0
    assert len(notes) == 1 and shown in notes[0] and "using 2" in notes[0]


def test_flag_without_a_default_uses_one(write):
    rule = one(write, "tools: [{name: samtools, cpus: {flag: '-@'}}]")
    assert resources(rule, ["samtools", "sort"])[0] == 1.0
    assert resources(rule, ["samtools", "sort", "-@8"])[0] == 8.0
    assert resources(rule, ["samtools", "sort", "-@", "3"])[0] == 3.0


def test_fixed_fractional_cpus(write):
    rule = one(write, "tools: [{name: x, cpus: 0.25}]")
    assert (rule.cpus, resources(rule, ["x", "-t", "9"])) == (0.25, (0.25, None, None, []))


# -- precedence across files ----------------------------------------------------------

def test_later_file_replaces_and_keeps_its_own_settings(write):
    a = write("""\
        backend: slurm
        on_oversize: refuse
        defaults: {memory: 1G, cpus: 2}
        slurm: {partition: a}
        tools:
          - name: bwa
            when: {subcommand: [mem]}
          - name: samtools
          - path: /opt/bin/gatk
    """, "a.yaml")
    b = write("""\
        backend: local
        defaults: {memory: 2G}
        tools:
          - name: bwa
            time: 1h
          - name: gzip
          - path: /usr/bin/*
    """, "b.yaml")
    wl = load([a, b])
    assert [(r.kind, r.pattern, os.path.basename(r.file)) for r in wl.rules] == [
        ("path", "/usr/bin/*", "b.yaml"),      # path rules first, the later file first
        ("path", "/opt/bin/gatk", "a.yaml"),
        ("name", "bwa", "b.yaml"),             # b's bwa replaced a's (its when is gone)
        ("name", "gzip", "b.yaml"),
        ("name", "samtools", "a.yaml"),
    ]
    assert [r.index for r in wl.rules] == list(range(5))
    _, gatk, bwa, gzip, samtools = wl.rules
    assert (bwa.backend, bwa.on_oversize, bwa.memory, bwa.time, bwa.cpus) == \
        ("local", "clamp", 2 * GiB, 3600, None)
    assert bwa.when_subcommand is None and bwa.line == 4
    assert (samtools.backend, samtools.on_oversize, samtools.memory, samtools.cpus) == \
        ("slurm", "refuse", GiB, 2)
    assert samtools.slurm["partition"] == "a" and gzip.slurm["partition"] is None
    assert wl.compiled == "1;p:/usr/bin/*;p:/opt/bin/gatk;n:bwa;n:gzip;n:samtools"
    assert wl.files == [a, b]


def test_same_pattern_of_other_kind_is_no_replacement(write):
    a = write("tools: [{path: /bin/sort}]", "a.yaml")
    b = write("tools: [{name: sort}, {name: 'sort*'}]", "b.yaml")
    wl = load([a, b])
    assert [(r.kind, r.pattern) for r in wl.rules] == [("path", "/bin/sort"), ("name", "sort"),
                                                       ("name", "sort*")]


def test_load_accepts_one_path(write):
    assert len(load(write("tools: [{name: x}]"))) == 1


# -- compiled text --------------------------------------------------------------------

def test_encoding_of_special_bytes():
    assert whitelist.encode("a%b;c|d,e=f:g h") == "a%25b%3Bc%7Cd%2Ce%3Df%3Ag%20h"
    assert whitelist.encode("tab\there\nnl\x7fdel\x01") == "tab%09here%0Anl%7Fdel%01"
    assert whitelist.encode("é€") == "%C3%A9%E2%82%AC"
    assert whitelist.encode("*?[a-z]\\**/x!^") == "*?[a-z]\\**/x!^"   # glob syntax kept
    assert whitelist.encode("\udcff") == "%FF"                           # surrogateescape


def test_compiled_text_of_conditions(write):
    rule_text = load([write("""\
        tools:
          - name: "my tool;v2"
            when:
              subcommand: ["a,b", "c=d", "é"]
              not_flags: ["--x=1", "-|"]
    """)]).compiled
    assert rule_text == "1;n:my%20tool%3Bv2|s=a%2Cb,c%3Dd,%C3%A9|x=--x%3D1,-%7C"


# -- matching, through the C matcher ------------------------------------------------

def test_compiled_rules_parse_in_c(write, matcher):
    wl = load([write(FULL), write("tools: [{name: 'a b;c|d,e=f:g%\u00fc'}]", "x.yaml")])
    rules = wl.compiled.encode()
    assert matcher.lib.aw_rule_count(rules) == len(wl.rules) == 4
    assert matcher.lib.aw_has_path_rules(rules) == 1 and wl.has_path_rules


def test_match_name_and_conditions(write, matcher):
    wl = load([write(FULL)])
    gatk, bwa, bcbio = wl.rules
    assert wl.match([b"bwa", b"mem", b"-t", b"4"], b"bwa", b"/usr/bin/bwa") is bwa
    assert wl.match(["bwa", "aln"]) is bwa                       # name from argv[0], str ok
    assert wl.match([b"/usr/bin/bwa", b"mem"], b"bwa", None) is bwa
    assert wl.match([b"bwa", b"index", b"ref.fa"], b"bwa", None) is None     # subcommand
    assert wl.match([b"bwa"], b"bwa", None) is None                          # no argv[1]
    assert wl.match([b"bwa", b"mem", b"--version"], b"bwa", None) is None   # not_flags
    assert wl.match([b"bwa", b"mem", b"--help=all"], b"bwa", None) is None  # FLAG=...
    assert wl.match([b"bwa", b"mem", b"--helpful"], b"bwa", None) is bwa
    assert wl.match([b"bwa", b"--version", b"mem"], b"bwa", None) is None
    assert wl.match([b"bwa2", b"mem"], b"bwa2", None) is None
    assert wl.match([b"bcbio_nextgen.py", b"x"], b"bcbio_nextgen.py", None) is bcbio
    assert wl.match([b"gatk"], b"gatk", b"/opt/gatk-4/bin/gatk") is gatk
    assert wl.match([b"gatk"], b"gatk", b"/opt/a/b/bin/gatk") is None        # * stops at /
    assert wl.match([b"gatk"], b"gatk", None) is None                        # path unknown


def test_path_rule_is_tried_before_name_rule(write, matcher):
    wl = load([write("""\
        tools:
          - name: sort
            cpus: 1
          - path: /usr/**/sort
            cpus: 4
    """)])
    by_path, by_name = wl.rules
    assert (by_path.kind, by_name.kind) == ("path", "name")
    assert wl.match([b"sort"], b"sort", b"/usr/local/bin/sort") is by_path
    assert wl.match([b"sort"], b"sort", b"/bin/sort") is by_name
    assert wl.match([b"sort"], b"sort", None) is by_name


def test_later_file_wins_when_both_match(write, matcher):
    a = write("tools: [{name: 'samtools*', cpus: 1}]", "a.yaml")
    b = write("tools: [{name: samtools, cpus: 2}]", "b.yaml")
    rule = load([a, b]).match([b"samtools", b"sort"], b"samtools", None)
    assert (rule.cpus, rule.file) == (2, b)


def test_falls_through_to_a_rule_whose_conditions_hold(write, matcher):
    wl = load([write("""\
        tools:
          - name: samtools
            when: {subcommand: [sort]}
            cpus: {flag: "-@"}
          - name: "samtool?"
            cpus: 0.5
    """)])
    first, second = wl.rules
    assert wl.match([b"samtools", b"sort", b"-@4"], b"samtools", None) is first
    assert wl.match([b"samtools", b"view"], b"samtools", None) is second


def test_special_characters_and_non_ascii_round_trip(write, matcher):
    name = "a b;c|d,e=f:g%\u00fc"
    wl = load([write(f"""\
        tools:
          - name: '{name}'
            when:
              subcommand: ["x,y", "caf\u00e9"]
              not_flags: ["--k=v", "-\\t"]
          - path: "/data/my dir/*.sh"
    """)])
    path_rule, name_rule = wl.rules
    n = name.encode()
    assert wl.match([n, b"x,y"], n, None) is name_rule
    assert wl.match([n, "café".encode()], n, None) is name_rule
    assert wl.match([n, b"x"], n, None) is None
    assert wl.match([n, b"x,y", b"--k=v"], n, None) is None
    assert wl.match([n, b"x,y", b"--k=v=w"], n, None) is None          # ITEM "=" prefix
    assert wl.match([n, b"x,y", b"-\t"], n, None) is None
    assert wl.match([n, b"x,y", b"\xff\xfe"], n, None) is name_rule     # any argv bytes
    assert wl.match([b"run.sh"], b"run.sh", b"/data/my dir/run.sh") is path_rule


def test_non_utf8_pattern_through_surrogateescape(write, matcher):
    wl = load([write('tools: [{name: "caf\\uDCE9"}]')])
    assert wl.compiled == "1;n:caf%E9"
    assert wl.match([b"caf\xe9"], b"caf\xe9", None) is wl.rules[0]


def test_explain_gives_a_reason_per_rule(write, matcher):
    wl = load([write(FULL)])
    gatk, bwa, bcbio = wl.rules
    argv = [b"bwa", b"mem", b"-h"]
    assert wl.explain(argv, b"bwa", b"/usr/bin/bwa") == [
        (gatk, whitelist.OTHER_PATH),
        (bwa, "argv has one of --version, -h, --help"),
        (bcbio, whitelist.OTHER_NAME),
    ]
    assert wl.explain([b"bwa", b"index"], b"bwa", None)[:2] == [
        (gatk, whitelist.NO_PATH),
        (bwa, "argv[1] is not one of mem, aln, sampe, samse"),
    ]
    assert wl.explain([b"bwa", b"mem"], b"bwa", None)[1] == (bwa, whitelist.MATCHES)
    assert wl.explain([b"gatk"], b"gatk", b"/opt/x/bin/gatk")[0] == (gatk, whitelist.MATCHES)


def test_explain_agrees_with_match(write, matcher):
    wl = load([write(FULL)])
    for argv, path in [([b"bwa", b"mem"], None), ([b"bwa", b"x"], None),
                       ([b"gatk", b"mem"], b"/opt/a/bin/gatk"), ([b"ls"], b"/bin/ls")]:
        first = next((r for r, why in wl.explain(argv, None, path) if why == whitelist.MATCHES),
                     None)
        assert first is wl.match(argv, None, path)


def test_describe_for_check(write, matcher):
    wl = load([write(FULL)])
    text = whitelist.describe(wl, [b"bwa", b"mem", b"-t", b"8", b"ref.fa"], b"bwa",
                              b"/usr/bin/bwa", backend=None, env={})
    assert "redirected as a job by rule 1" in text
    assert "cpus: 8   memory: 8G   time: 4:00:00" in text
    assert "backend: slurm" in text and "command: bwa mem -t 8 ref.fa" in text
    text = whitelist.describe(wl, [b"gatk"], b"gatk", b"/opt/x/bin/gatk", backend="local", env={})
    assert "backend: local" in text
    text = whitelist.describe(wl, [b"bwa", b"index"], b"bwa", None, env={})
    assert "runs locally" in text and "argv[1] is not one of" in text


# -- which whitelist, which backend -------------------------------------------------

def test_choose_backend(write):
    rule = one(write, "backend: slurm\ntools: [{name: x}]")
    assert whitelist.choose_backend(rule, "docker", {"ARV_WRAP_BACKEND": "local"}) == "docker"
    assert whitelist.choose_backend(rule, None, {"ARV_WRAP_BACKEND": "local"}) == "local"
    assert whitelist.choose_backend(rule, None, {}) == "slurm"
    assert whitelist.choose_backend(None, None, {}) == "local"


def test_reuse_spec(write):
    wl = load([write("tools:\n"
                     "  - {name: a, reuse: true}\n"
                     "  - {name: b, reuse: false}\n"
                     "  - name: c\n"
                     "    reuse: {ignore: -t, outputs: [-o, --output], siblings: [.bai, .csi],"
                     " env: [TMPDIR]}\n")])
    a, b, c = sorted(wl.rules, key=lambda r: r.pattern)
    assert a.reuse == whitelist.Reuse() and b.reuse is None
    assert c.reuse == whitelist.Reuse(ignore=("-t",), outputs=("-o", "--output"),
                                      siblings=(".bai", ".csi"), env=("TMPDIR",))


# -- the demo whitelist ----------------------------------------------------------------

def test_demo_whitelist(matcher):
    wl = load([os.path.join(ROOT, "whitelists", "demo.yaml")])
    sort = wl.match([b"sort", b"--parallel=2", b"-S", b"64M", b"in.txt"], b"sort", None)
    assert sort is not None and resources(sort, [b"sort", b"--parallel=2"])[0] == 2.0
    assert resources(sort, [b"sort", b"--parallel", b"3"])[0] == 3.0
    assert wl.match([b"sort", b"--version"], b"sort", None) is None
    for tool in (b"gzip", b"md5sum", b"sha256sum"):
        assert wl.match([tool, b"file"], tool, None) is not None
        assert wl.match([tool, b"--help"], tool, None) is None
    assert wl.match([b"wc", b"-l"], b"wc", None) is None


def test_a_programs_match_is_remembered_only_where_argv_cannot_change_it(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("tools:\n  - name: bwa\n")
    rules = load([str(plain)])
    for argv in ([b"bwa", b"mem"], [b"bwa", b"index", b"ref.fa"]):
        assert rules.match(argv, b"bwa", b"/usr/bin/bwa") is rules.rules[0]
    assert rules.match([b"gzip"], b"gzip", b"/bin/gzip") is None
    conditional = tmp_path / "when.yaml"
    conditional.write_text("tools:\n  - name: samtools\n    when: {subcommand: [sort]}\n")
    rules = load([str(conditional)])
    assert rules.match([b"samtools", b"sort"], b"samtools", b"/usr/bin/samtools") is not None
    assert rules.match([b"samtools", b"view"], b"samtools", b"/usr/bin/samtools") is None
