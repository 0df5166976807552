#!/usr/bin/env python3
"""Where the Triton per-token-group FP8 quant differs from the torch reference (GPU diagnostic)."""
import sys

import gpu_common as gc
import torch

from dlengine.kernels.fp8 import fp8_gemm_triton as fg, fp8_torch as ft

if not gc.require_cuda():
    sys.exit(2)
torch.manual_seed(0)
for m, k in ((1, 7168), (333, 2048)):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q, s = fg.per_token_group_quant_fp8(x, 128)
    qr, sr = ft.per_token_group_quant_fp8_torch(x, 128)
    d = (s != sr).nonzero()
    print(f"M={m} K={k}: scales differing {d.shape[0]} of {s.numel()}")
    for i, j in d[:5].tolist():
        amax = x[i, j * 128:(j + 1) * 128].float().abs().max()
        print(f"  amax {amax.item()!r} kernel {s[i, j].item()!r} ref {sr[i, j].item()!r} "
              f"amax/448 {(amax / 448).item()!r} amax*(1/448) {(amax * (1 / 448)).item()!r}")
    dq = (q.float() != qr.float()).nonzero()
    print(f"  fp8 values differing {dq.shape[0]}")
    for i, c in dq[:5].tolist():
        j = c // 128
        print(f"  x {x[i, c].item()!r} x/s_ref {(x[i, c].float() / sr[i, j]).item()!r} "
              f"kernel {q[i, c].float().item()!r} ref {qr[i, c].float().item()!r} scale equal {bool(s[i, j] == sr[i, j])}")
