"""The whitelists a run starts with: validated once, then taken from the state dir
until one of their files changes."""
import json
import os
import subprocess
import sys

from arvwrap import rules_cache, whitelist
from conftest import IMPORTED_FROM, arv_wrap

RULES = "tools:\n  - name: step\n    cpus: 2\nredact: ['*PIN*']\n"


def entries(state_dir):
    with open(os.path.join(state_dir, rules_cache.FILE)) as f:
        return json.load(f)


def test_a_validated_set_of_files_is_kept_and_found_again(state_dir, whitelist_file):
    files = [whitelist_file(RULES)]
    key, found = rules_cache.lookup(state_dir, files)
    assert found is None
    rules = whitelist.load(files)
    rules_cache.remember(state_dir, key, rules)
    _, found = rules_cache.lookup(state_dir, files)
    assert (found.compiled, found.redact) == (rules.compiled, ("*PIN*",))
    assert os.stat(os.path.join(state_dir, rules_cache.FILE)).st_mode & 0o777 == 0o600


def test_any_change_to_a_file_misses(state_dir, whitelist_file):
    path = whitelist_file(RULES)
    key, _ = rules_cache.lookup(state_dir, [path])
    rules_cache.remember(state_dir, key, whitelist.load([path]))
    with open(path, "a") as f:      # same size would do too: the ctime moves
        f.write("\n")
    assert rules_cache.lookup(state_dir, [path])[1] is None
    other = whitelist_file(RULES, "other.yaml")
    assert rules_cache.lookup(state_dir, [other])[1] is None      # another file
    assert rules_cache.lookup(state_dir, [path, other])[1] is None  # another set


def test_a_file_that_changed_while_it_was_read_is_read_again(state_dir, whitelist_file):
    path = whitelist_file(RULES)
    key, _ = rules_cache.lookup(state_dir, [path])     # the key is taken first
    rules = whitelist.load([path])
    with open(path, "w") as f:
        f.write("tools: 3\n")
    rules_cache.remember(state_dir, key, rules)        # kept under the old identity
    assert rules_cache.lookup(state_dir, [path])[1] is None


def test_a_broken_or_missing_cache_is_only_a_miss(state_dir, whitelist_file):
    path = whitelist_file(RULES)
    os.makedirs(state_dir, mode=0o700)
    for text in ("{not json", "[1, 2]", json.dumps({rules_cache.key([path]): {"x": 1}})):
        with open(os.path.join(state_dir, rules_cache.FILE), "w") as f:
            f.write(text)
        assert rules_cache.lookup(state_dir, [path])[1] is None
    assert rules_cache.lookup(state_dir, ["/nonexistent.yaml"]) == (None, None)


def test_only_the_most_recent_sets_are_kept(state_dir, whitelist_file, monkeypatch):
    monkeypatch.setattr(rules_cache, "KEEP", 3)
    paths = [whitelist_file(RULES, f"w{n}.yaml") for n in range(5)]
    for path in paths:
        key, _ = rules_cache.lookup(state_dir, [path])
        rules_cache.remember(state_dir, key, whitelist.load([path]))
    assert len(entries(state_dir)) == 3
    assert rules_cache.lookup(state_dir, [paths[-1]])[1] is not None
    assert rules_cache.lookup(state_dir, [paths[0]])[1] is None


def test_a_run_with_unchanged_whitelists_does_not_load_the_yaml_parser(
        base_env, whitelist_file, tmp_path):
    base_env["ARV_WRAP_WHITELIST"] = whitelist_file(RULES)
    # The run leaves by os._exit once its end is recorded: made a SystemExit here,
    # so the probe can look at what was imported.
    probe = ("import os, sys, runpy; sys.argv = ['arv-wrap', '--', 'true']\n"
             "def leave(code):\n    raise SystemExit(code)\n"
             "os._exit = leave\n"
             "try:\n    runpy.run_module('arvwrap', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print('yaml' in sys.modules, code)")
    env = {**base_env, "PYTHONPATH": IMPORTED_FROM}
    first = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    again = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert (first.stdout, again.stdout) == ("True 0\n", "False 0\n"), (first, again)


def test_an_edit_that_breaks_a_cached_whitelist_is_reported(base_env, whitelist_file):
    path = base_env["ARV_WRAP_WHITELIST"] = whitelist_file(RULES)
    assert arv_wrap("--", "true", env=base_env).returncode == 0
    with open(path, "w") as f:
        f.write("tools:\n  - name: step\n    cpus: many\n")
    broken = arv_wrap("--", "true", env=base_env, stderr=subprocess.PIPE, text=True)
    assert broken.returncode == 2
    assert broken.stderr.startswith(f"arv-wrap: {path}:3: ") and "cpus" in broken.stderr
