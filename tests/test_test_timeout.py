"""DLENGINE_TEST_TIMEOUT_S (tests/conftest.py): a test that runs too long fails and the run goes
on, so a GPU run with a fixed time budget still reports every other test."""

import os
import shutil
import subprocess
import sys


def test_a_test_past_the_limit_fails_and_the_rest_run(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    shutil.copy(os.path.join(here, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text("import time\n\ndef test_slow():\n    time.sleep(30)\n\n"
                                            "def test_after():\n    pass\n")
    env = {**os.environ, "DLENGINE_TEST_TIMEOUT_S": "1",
           "PYTHONPATH": os.path.dirname(here) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "1 failed, 1 passed" in out.stdout, out.stdout + out.stderr
    assert "ran past DLENGINE_TEST_TIMEOUT_S=1s" in out.stdout
