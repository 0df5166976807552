"""scripts/profile_host.py runs (a smoke test at a small batch, so the script does not rot)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_host.py"


def test_profile_host_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--batch", "8", "--steps", "5", "--warmup", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.split()[:2] == ["8", "final_only"] for line in lines)
    assert any(line.split()[:2] == ["8", "cumulative"] for line in lines)
