"""Faults injected into a real dispatcher: a sitecustomize on its PYTHONPATH (the
client starts the dispatcher with the caller's environment) patches one method of
the remote machinery to raise when the tool's output holds b"BOOM"."""
import os

from conftest import IMPORTED_FROM

SITE = '''
import os
if os.environ.get("ARVWRAP_TEST_FAULT"):
    import importlib
    module_name, class_name, method = os.environ["ARVWRAP_TEST_FAULT"].rsplit(".", 2)
    cls = getattr(importlib.import_module(module_name), class_name)
    real = getattr(cls, method)

    def faulty(self, data, *args):
        if b"BOOM" in bytes(data):
            raise RuntimeError("injected")
        return real(self, data, *args)
    setattr(cls, method, faulty)
'''


def inject(env, tmp_path, target):
    """Make target ("module.Class.method", called with the data) raise on b"BOOM" in
    the dispatcher that env starts."""
    site = tmp_path / "fault-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    env["PYTHONPATH"] = os.pathsep.join([str(site), IMPORTED_FROM])
    env["ARVWRAP_TEST_FAULT"] = target
