#!/usr/bin/env python3
"""Build the Hopper prefill kernels (kernels/attention/prefill_hopper_triton.py) for sm_90 without a
GPU and print what the compiler made of them: registers, spill stack, shared memory, warps (12 where
warp specialisation applied: a producer plus two consumer groups), wgmma and TMA ops in the TTGIR.

    python scripts/sm90_prefill_build.py                 # the shipped tiles + the sweep's alternatives
    python scripts/sm90_prefill_build.py --quick --json  # one JSON line (tests/test_prefill_hopper.py)

Runs wherever triton is installed (it ships ptxas and cuobjdump); a config that spills or overflows
the H100's 227 KB of shared memory shows here before any GPU time is spent. Run it with the triton
of the GPU machine (3.6) to see that machine's build: its automatic warp specialisation is the
part that changes most between versions. Without TRITON_INTERPRET (it changes how triton compiles).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import gpu_common  # noqa: F401 - puts the repository on sys.path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dlengine.kernels.attention import prefill_hopper_triton as ph

H100_SHARED_BYTES = 232_448
INT_PTRS = ("bt_ptr", "seq_lens_ptr", "qsl_ptr")
UNALIGNED_INTS = ("stride_bt", "num_q_tiles")  # what the launcher does not see as multiples of 16
OPS = ("ttng.warp_group_dot ", "ttng.async_tma_copy_global_to_local", "ttg.async_copy_global_to_local")


def build(fn, constants: dict, num_warps: int, num_stages: int, dtype: str = "bf16") -> dict:
    """`fn` compiled for sm_90 with these constexprs; pointers in `dtype` (int32 metadata)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in INT_PTRS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
            if name not in UNALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, sig, {k: v for k, v in constants.items() if k in fn.arg_names}, attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    regs = [int(r) for r in re.findall(r"REG:(\d+)", usage)]
    stack = [int(s) for s in re.findall(r"STACK:(\d+)", usage)]
    ttgir = kernel.asm["ttgir"]
    return {"registers": max(regs), "spill_stack": max(stack), "shared": kernel.metadata.shared,
            "warps": kernel.metadata.num_warps, "ops": {op.strip(): ttgir.count(op) for op in OPS}}


def report(config: dict, head_dim: int = 128, group: int = 4, page: int = 16, dtype: str = "bf16") -> dict:
    """Both kernels' builds for one config (prefill_hopper_triton.HOPPER_KEYS, over the defaults)."""
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    cfg = dict(ph.default_config(head_dim, torch_dtype.itemsize, False), **config)
    plan = ph._Plan(torch_dtype, torch_dtype, group * 8, 8, head_dim, head_dim, page, cfg)
    common = dict(GROUP=plan.group, HEAD_DIM=head_dim, BLOCK_D=plan.block_d, BLOCK_N=plan.block_n, SKIP_DECODE=True,
                  UPCAST=False, IEEE=plan.ieee)
    out = {"config": cfg, "head_dim": head_dim, "group": group, "dtype": dtype}
    packed = dict(common, BLOCK_Q=plan.block_q, BLOCK_M=plan.block_m, BLOCK_NP=plan.prefix_block_n, PAGE=page,
                  USE_TMA=plan.tma)
    out["packed"] = build(ph._prefill_kernel, packed, plan.warps, plan.stages, dtype)
    if plan.warp_spec:
        fresh = dict(common, BLOCK_M=plan.ws_block_m, WARP_SPEC=True)
        out["fresh_ws"] = build(ph._fresh_ws_kernel, fresh, 4, plan.stages, dtype)
    return out


# the shipped defaults and the alternatives gpu_check_attention.py --hopper-configs times
CASES = [({}, 128, 4), ({"hopper_block_n": 128, "hopper_stages": 2}, 128, 4), ({"hopper_ws": True}, 128, 4),
         ({"hopper_ws": True, "hopper_block_n": 128, "hopper_stages": 2}, 128, 4), ({}, 128, 5), ({}, 64, 8), ({}, 256, 4),
         ({"hopper_ws": True}, 256, 4)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON line with every report")
    ap.add_argument("--quick", action="store_true", help="the shipped bf16 d=128 tiles and the warp-specialised "
                                                         "kernel only")
    args = ap.parse_args()
    if ph.interpret_mode():
        print("TRITON_INTERPRET is set: unset it to build for sm_90", file=sys.stderr)
        return 2
    reports = []
    for config, head_dim, group in CASES[2:3] if args.quick else CASES:  # quick: packed defaults + fresh_ws
        try:
            reports.append(report(config, head_dim, group))
        except Exception as e:  # noqa: BLE001 - report the failure, build the rest
            reports.append({"config": config, "head_dim": head_dim, "group": group,
                            "error": f"{type(e).__name__}: {str(e)[:300]}"})
        if not args.json:
            r = reports[-1]
            print(f"triton {triton.__version__} D={head_dim} group={group} {config}:")
            for kind in ("packed", "fresh_ws", "error"):
                if kind in r:
                    print(f"  {kind}: {r[kind]}", flush=True)
    if args.json:
        print(json.dumps({"triton": triton.__version__, "shared_limit": H100_SHARED_BYTES, "reports": reports}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
