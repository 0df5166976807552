"""GPU: the Hopper Gluon MLA decode kernel against a float32 reference -- the correctness half of
scripts/bench_mla_decode.py (contexts 1..32k, pages 16-128, forced splits, padding rows, NaN cache
tails). Skipped without a Hopper GPU."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_gluon_mla_decode_kernel_matches_the_float32_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from dlengine.kernels.mla import mla_decode_gluon as gluon_mla

    if why := gluon_mla.supported(torch.device("cuda"), torch.bfloat16, 512, 64):
        pytest.skip(f"gluon MLA kernel: {why}")
    import bench_mla_decode

    assert bench_mla_decode.correctness()
