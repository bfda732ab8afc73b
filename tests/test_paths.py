"""Where arv-wrap's files live: the whitelists of a run."""
from arvwrap import paths


def test_find_whitelists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"ARV_WRAP_WHITELIST": "/x/a.yaml::rel.yaml"}
    assert paths.find_whitelists(["w.yaml", "/abs/v.yaml"], env) == \
        [str(tmp_path / "w.yaml"), "/abs/v.yaml"]
    assert paths.find_whitelists([], env) == ["/x/a.yaml", str(tmp_path / "rel.yaml")]
    assert paths.find_whitelists([], {}) == []
    assert paths.find_whitelists([], {"ARV_WRAP_WHITELIST": ""}) == []
    (tmp_path / "arv-wrap.yaml").write_text("tools: []\n")
    assert paths.find_whitelists([], {}) == [str(tmp_path / "arv-wrap.yaml")]
    assert paths.find_whitelists([], env)[0] == "/x/a.yaml"
    assert "-w" in paths.NO_WHITELIST_MESSAGE
    assert "ARV_WRAP_WHITELIST" in paths.NO_WHITELIST_MESSAGE
    assert "\n" not in paths.NO_WHITELIST_MESSAGE
