"""The Hopper Gluon MLA decode kernel compiles for sm_90 on this (GPU-less) machine, without
spilling and inside the H100's shared memory: catches Gluon API drift between triton versions
(the kernel itself runs in the GPU checks, see docs/mla.md). Built in a child process: other test
modules turn on TRITON_INTERPRET, which changes how triton compiles in this one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

H100_SHARED_BYTES = 232_448  # 227 KB: the most one block may ask for
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sm90_resources.py"


@pytest.fixture(scope="module")
def reports() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--gluon-json"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(f"gluon: {out['skip']}")
    return out


@pytest.mark.parametrize("direct", ["False", "True", "registers path", "timed"])
def test_gluon_mla_decode_kernel_builds_for_sm90_without_spills(reports, direct):
    """Both outputs (split partials / direct), the query through registers instead of cp.async, and
    the diagnostics build with timer stamps."""
    report = reports[direct]
    assert report["shared"] <= H100_SHARED_BYTES
    assert report["spill_stack"] <= 128, report  # (triton 3.6: 0-8 B, 3.9: 64-72 B)
    # scores in three parts (latent low / high half, rope), P V once per warp group: no duplicated dot
    assert report["ops"]["ttng.warp_group_dot "] == 5
    # page 16: 4 TMA boxes of 16 rows x 9 column blocks of 64 per tile
    assert report["ops"]["ttng.async_tma_copy_global_to_local"] == 36
    # the query: five cp.async chunks (4 latent + rope), or none on the registers path
    assert report["ops"]["ttg.async_copy_global_to_local"] == (0 if direct == "registers path" else 5)
