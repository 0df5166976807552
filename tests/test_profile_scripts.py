"""The GPU profiling scripts that have a CPU mode run end to end (tiny model), so they do not rot
between GPU runs."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_profile_prefill_runs_on_cpu(tmp_path):
    out = tmp_path / "profile_prefill.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "profile_prefill.py"), "--model", "tiny-qwen3",
                          "--iters", "2", "--input-len", "48", "--decode-steps", "3", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["iterations"]
    assert len(rows) == 2 and all(r["wall_ms"] > 0 and r["kernel_ms"] > 0 for r in rows)
    assert "slowest vs fastest" in run.stdout
