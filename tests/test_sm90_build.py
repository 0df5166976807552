"""The Hopper Gluon MLA decode kernel compiles for sm_90 on this (GPU-less) machine, without
spilling and inside the H100's shared memory: catches Gluon API drift between triton versions
(the kernel itself runs in the GPU checks, see docs/mla.md)."""

import importlib.util
from pathlib import Path

import pytest

from dlengine.kernels import gluon_mla

H100_SHARED_BYTES = 232_448  # 227 KB: the most one block may ask for


def _resources_module():
    path = Path(__file__).resolve().parents[1] / "scripts" / "sm90_resources.py"
    spec = importlib.util.spec_from_file_location("sm90_resources", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("direct", [False, True])
def test_gluon_mla_decode_kernel_builds_for_sm90_without_spills(direct):
    if gluon_mla.GLUON_IMPORT_ERROR is not None:
        pytest.skip(f"gluon: {gluon_mla.GLUON_IMPORT_ERROR}")
    if not hasattr(gluon_mla._mla_decode_gluon_kernel, "arg_names"):
        pytest.skip("kernels were built in interpreter mode by an earlier test module")
    mod = _resources_module()
    from triton.experimental.gluon._runtime import GluonASTSource

    report = mod.resources(gluon_mla._mla_decode_gluon_kernel,
                           dict(NUM_HEADS=128, HEAD_TILES=2, PAGE=16, KV_LORA=512, ROPE=64, DIRECT=direct,
                                BLOCK_H=gluon_mla.BLOCK_H, BLOCK_N=gluon_mla.BLOCK_N, STAGES=gluon_mla.STAGES),
                           GluonASTSource, gluon_mla.NUM_WARPS, structured=True)
    assert report["shared"] <= H100_SHARED_BYTES
    assert report["spill_stack"] <= 64, report  # (triton 3.6: 8 B in the split variant, 3.9: none)
    assert report["ops"]["ttng.warp_group_dot "] == 3  # QK (latent), QK (rope), PV: no duplicated dot
