"""The README's first command: the demo pipeline, wrapped, gives the unwrapped outputs."""
import os
import subprocess

from conftest import arv_wrap, jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "demo-pipeline.sh")
WHITELIST = os.path.join(ROOT, "whitelists", "demo.yaml")


def test_demo_pipeline_wrapped_matches_unwrapped(base_env, tmp_path):
    base_env["ARV_WRAP_LOCAL_CPUS"] = "2"
    direct = subprocess.run([DEMO, str(tmp_path / "plain")], env=base_env,
                            stdout=subprocess.PIPE, timeout=120)
    wrapped = arv_wrap("-w", WHITELIST, "--", DEMO, str(tmp_path / "viaarv"), env=base_env,
                       stdout=subprocess.PIPE, timeout=120)
    assert wrapped.returncode == direct.returncode == 0
    assert wrapped.stdout.replace(b"viaarv", b"plain") == direct.stdout
    for name in ("counts.tsv", "SHA256SUMS"):
        assert (tmp_path / "viaarv" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    tools = sorted(r["argv"][0] for r in jobs(base_env) if r["kind"] == "job")
    assert tools.count("sort") == 3 and "gzip" in tools and "uniq" in tools
    assert all(r["state"] == "exited" and r["exit_status"] == 0 for r in jobs(base_env))
