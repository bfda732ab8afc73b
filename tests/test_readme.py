"""The README as a newcomer meets it: its first command works in a fresh clone on a
machine whose Python refuses `pip install .` outside a virtual environment, its
test command is the one CI runs, it stays short, and every link it and docs/ give
leads somewhere."""
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from conftest import ON_CI, ROOT

README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
TEST_COMMAND = "bash scripts/test-setup.sh && python3 -m pytest -q"


def first_commands():
    """The lines of the README's first code block."""
    with open(README) as f:
        text = f.read()
    block = re.search(r"^```sh\n(.*?)^```", text, re.M | re.S)
    assert block, "the README starts without a ```sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_gives_the_setup_and_the_test_command_first_and_ci_runs_the_second():
    setup, tests = first_commands()[:2]
    assert "venv" in setup and "demo-pipeline.sh" in setup
    assert tests == TEST_COMMAND
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert f.read().strip().splitlines()[-1] == TEST_COMMAND


def test_the_readme_is_at_most_about_300_lines():
    with open(README) as f:
        assert len(f.read().splitlines()) <= 300


def slug(heading):
    """The anchor GitHub gives a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    with open(path) as f:
        return {slug(m.group(1)) for m in re.finditer(r"^#+ (.*)$", f.read(), re.M)}


def test_every_link_of_the_readme_and_docs_leads_to_a_file_and_heading_that_exist():
    pages = [README] + [os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md")]
    broken = []
    for page in pages:
        with open(page) as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            name, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), name)) if name else page
            if not os.path.exists(path):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no file)")
            elif anchor and path.endswith(".md") and anchor not in anchors(path):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
    assert not broken


def externally_managed_python():
    """An interpreter of this machine marked externally managed (PEP 668), with venv:
    Debian's and Ubuntu's own python3. None if there is none."""
    for python in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.access(python, os.X_OK):
            continue
        probe = subprocess.run(
            [python, "-c", "import ensurepip, os, sysconfig, venv; print(os.path.exists("
             "os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"],
            capture_output=True, text=True)
        if probe.stdout.strip() == "True":
            return python
    return None


def refusing_python(env):
    """(interpreter, env) under which `pip install .` outside a virtual environment is
    refused: an externally managed python3 where the machine has one, else this
    interpreter's base with PIP_REQUIRE_VIRTUALENV=1 (never a marker file written into
    an interpreter of the machine)."""
    python = externally_managed_python()
    if python:
        env.pop("PIP_REQUIRE_VIRTUALENV", None)
        return python, "externally-managed-environment"
    base = os.path.join(sys.base_prefix, "bin", f"python{sysconfig.get_python_version()}")
    env["PIP_REQUIRE_VIRTUALENV"] = "1"
    return (base if os.access(base, os.X_OK) else sys.executable), "virtualenv"


def test_the_first_command_runs_in_a_fresh_clone_where_pip_install_outside_a_venv_is_refused(
        base_env, tmp_path):
    if not os.path.exists(os.path.join(ROOT, ".git")) or shutil.which("git") is None:
        if ON_CI:
            pytest.fail("CI runs from a git checkout")
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True)
    env = {k: v for k, v in base_env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    python, refusal = refusing_python(env)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(python, bin_dir / "python3")
    env["PATH"] = f"{bin_dir}:{env['PATH']}"

    refused = subprocess.run(["python3", "-m", "pip", "install", "--dry-run", "--no-deps",
                              "--no-build-isolation", "."], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refusal in refused.stdout + refused.stderr, refused.stdout + refused.stderr

    setup = first_commands()[0]
    done = subprocess.run(["bash", "-c", setup], cwd=clone, env=env, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "demo: ok" in done.stdout
    arv_wrap = str(clone / ".venv" / "bin" / "arv-wrap")
    shim = subprocess.run([arv_wrap, "preload-path"], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert shim.startswith(str(clone / ".venv"))
    records = json.loads(subprocess.run([arv_wrap, "jobs", "--json"], env=env,
                                        capture_output=True, text=True, check=True).stdout)
    jobs = [r for r in records if r["kind"] == "job"]
    assert sorted({r["argv"][0] for r in jobs}) == ["gzip", "md5sum", "sha256sum", "sort",
                                                    "uniq"]
    assert all(r["state"] == "exited" and r["exit_status"] == 0 for r in records)
