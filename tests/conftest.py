"""Shared fixtures: an isolated state dir and the environment that activates arv-wrap."""
import os
import shutil
import subprocess

import pytest

from arvwrap import paths

ON_CI = os.environ.get("CI") == "true"


def need(program):
    """Skip a test whose real component is missing, except on CI where that is a failure."""
    if shutil.which(program) is None:
        if ON_CI:
            pytest.fail(f"{program} is required on CI but is not installed")
        pytest.skip(f"{program} is not installed")


@pytest.fixture
def state_dir(tmp_path):
    path = tmp_path / "state"
    yield str(path)
    sock = paths.socket_path({"ARV_WRAP_STATE_DIR": str(path)})
    # ask a dispatcher started for this test to leave (it would after its idle timeout)
    subprocess.run(["pkill", "-f", f"arvwrap.dispatcher --socket {sock}"], check=False)


@pytest.fixture
def base_env(state_dir):
    """os.environ plus an isolated state dir and a short dispatcher idle timeout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARV_WRAP_")}
    env["ARV_WRAP_STATE_DIR"] = state_dir
    env["ARV_WRAP_IDLE_TIMEOUT"] = "20"
    return env
