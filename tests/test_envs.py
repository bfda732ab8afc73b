"""Callers' environments: made sense of once per distinct environment."""
from arvwrap import envs, redact, whitelist
from arvwrap.protocol import Request

SHIM = b"/opt/arv/_native/libarvwrap.so"


def request(*entries):
    return Request(rule=0, path=b"/bin/x", argv=[b"x"], env=list(entries), cwd=b"/", umask=0o22,
                   rlimits=[])


def rule(text, tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text(text)
    return whitelist.load([str(path)]).rules[0]


def test_the_same_environment_is_parsed_once():
    known = envs.Envs()
    one = known.get(request(b"A=1", b"ARV_WRAP_WHITELIST=/w/a.yaml:/w/b.yaml"))
    assert known.get(request(b"A=1", b"ARV_WRAP_WHITELIST=/w/a.yaml:/w/b.yaml")) is one
    assert known.get(request(b"A=2", b"ARV_WRAP_WHITELIST=/w/a.yaml:/w/b.yaml")) is not one
    assert one.values == {b"A": b"1", b"ARV_WRAP_WHITELIST": b"/w/a.yaml:/w/b.yaml"}
    assert one.whitelists == ("/w/a.yaml", "/w/b.yaml")


def test_only_the_most_recent_environments_are_kept(monkeypatch):
    monkeypatch.setattr(envs, "KEEP", 2)
    known = envs.Envs()
    first = known.get(request(b"N=1"))
    known.get(request(b"N=2"))
    assert known.get(request(b"N=1")) is first        # used again: kept
    known.get(request(b"N=3"))
    assert known.get(request(b"N=1")) is first
    assert len(known._known) == 2


def test_each_job_gets_its_own_environment_with_its_id(tmp_path):
    caller = envs.Envs().get(request(b"PATH=/bin", b"ARV_WRAP_RUN=R1",
                                     b"LD_PRELOAD=/x/other.so:" + SHIM))
    a, b = caller.job_env("J1", False, None), caller.job_env("J2", False, None)
    assert a == {b"PATH": b"/bin", b"LD_PRELOAD": b"/x/other.so", b"ARV_WRAP_JOB": b"J1"}
    assert b[b"ARV_WRAP_JOB"] == b"J2" and a is not b
    a[b"PATH"] = b"changed"                    # a backend may change its own copy
    assert caller.job_env("J3", False, None)[b"PATH"] == b"/bin"
    nested = caller.job_env("J4", True, None)
    assert nested[b"ARV_WRAP_RUN"] == b"R1" and nested[b"LD_PRELOAD"].endswith(SHIM)


def test_a_rules_env_changes_are_its_own(tmp_path):
    caller = envs.Envs().get(request(b"PATH=/bin", b"TMPDIR=/tmp"))
    changing = rule("tools:\n  - name: x\n    env: {set: {OMP_NUM_THREADS: '4'}, drop: [TMPDIR]}\n",
                    tmp_path)
    assert caller.job_env("J1", False, changing) == {b"PATH": b"/bin", b"OMP_NUM_THREADS": b"4",
                                                     b"ARV_WRAP_JOB": b"J1"}
    assert caller.job_env("J2", False, None)[b"TMPDIR"] == b"/tmp"


def test_secret_values_follow_the_patterns():
    caller = envs.Envs().get(request(b"API_TOKEN=tok-123456", b"PIN_CODE=987654", b"USER=me"))
    assert caller.secret_values(redact.DEFAULTS) == {b"tok-123456"}
    assert caller.secret_values((*redact.DEFAULTS, "*PIN*")) == {b"tok-123456", b"987654"}
