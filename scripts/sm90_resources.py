#!/usr/bin/env python3
"""Compile the MLA decode kernels for sm_90 without a GPU and print what ptxas made of them:
registers, spill stack, shared memory, and the MMA / async-copy ops in the TTGIR.

    python scripts/sm90_resources.py            # both kernels at DeepSeek-V3 dims, page 16
    python scripts/sm90_resources.py --fp8-kv-json   # every FP8 KV cache kernel builds (tests/test_fp8_kv.py)

Runs on any machine with triton (it ships ptxas and cuobjdump); useful before spending GPU time:
a kernel that spills or overflows shared memory shows it here. Numbers for the shipped kernels
are in docs/mla.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import gpu_common  # noqa: F401 - puts the repository on sys.path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dlengine.kernels.mla import mla_decode_gluon as gluon_mla, mla_triton as triton_mla

POINTERS = {"qlat_ptr": "*bf16", "qpe_ptr": "*bf16", "cache_ptr": "*bf16", "bt_ptr": "*i32", "row_tok_ptr": "*i32",
            "row_len_ptr": "*i32", "row_req_ptr": "*i32", "out_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
            "lse_ptr": "*fp32", "times_ptr": "*i64"}
ALIGNED_INTS = ("stride_cb", "stride_cs", "stride_ql_t", "stride_ql_h", "stride_qp_t", "stride_qp_h", "stride_ot",
                "stride_oh")  # what the launcher sees as multiples of 16 (contiguous q / out at DeepSeek dims)


def resources(fn, constants: dict, source_cls, num_warps: int, num_stages: int = 2, structured: bool = False,
              descriptors: dict | None = None, maxnreg: int | None = None):
    """Build `fn` for sm_90 with these constexprs (and TMA descriptor types: name -> signature
    string); a one-line summary (or a dict if structured)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            sig[name] = "constexpr"
        elif descriptors and name in descriptors:
            sig[name] = descriptors[name]
        elif name in POINTERS:
            sig[name] = POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in ("qk_scale", "eps") else "i32"
            if name in ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(source_cls(fn, sig, {k: v for k, v in constants.items() if k in fn.arg_names}, attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages,
                                     **({"maxnreg": maxnreg} if maxnreg else {})})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    ttgir = kernel.asm["ttgir"]
    ops = {op: ttgir.count(op) for op in ("ttng.warp_group_dot ", "ttg.async_copy_global_to_local", "tt.load ",
                                         "ttng.async_tma_copy_global_to_local", "ttg.local_alloc")}
    if structured:
        return {"registers": int(m.group(1)), "spill_stack": int(m.group(2)), "shared": kernel.metadata.shared,
                "ops": ops}
    return (f"registers {m.group(1)}, spill stack {m.group(2)} B, shared {kernel.metadata.shared:,} B, "
            f"ttgir ops {ops}" if m else usage)


def gluon_report(direct: bool, page: int = 16, times: bool = False, q_async: bool = True) -> dict:
    """The Gluon MLA decode kernel's sm_90 build at DeepSeek-V3 dims (a dict); q_async: the query
    by cp.async (else through registers), times: the diagnostics build."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    box = min(page, gluon_mla.BLOCK_N)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    return resources(gluon_mla._mla_decode_gluon_kernel,
                     dict(NUM_HEADS=128, HEAD_TILES=2, PAGE=page, DIRECT=direct, Q_ASYNC=q_async, CONSUMER_REGS=gluon_mla.CONSUMER_REGS,
                          LOADER_REGS=gluon_mla.LOADER_REGS, TIMES=times),
                     GluonASTSource, gluon_mla.NUM_WARPS, structured=True,
                     descriptors={"desc": f"tensordesc<bf16[{box}, 64],{layout!r}>"}, maxnreg=gluon_mla.MAX_REGS)


def fp8_kv_reports() -> dict:
    """The sm_90 builds of every kernel that writes or reads an FP8 KV cache (bf16 activations,
    float8e4nv caches, float32 scales), at Qwen3-8B / DeepSeek-V3 dims: kernel -> resources."""
    from dlengine.kernels.attention import paged_attention_triton as gqa
    from dlengine.kernels.norm_rope import norm_rope_triton as norm_rope

    f8, bf, f32 = "*fp8e4nv", "*bf16", "*fp32"
    saved = dict(POINTERS)
    POINTERS.update(k_ptr=bf, v_ptr=bf, kc_ptr=f8, vc_ptr=f8, ks_ptr=f32, vs_ptr=f32, scale_ptr=f32, q_ptr=bf,
                    src_ptr=bf, cache_ptr=f8, k_cache_ptr=f8, v_cache_ptr=f8, cos_ptr=f32, sin_ptr=f32, qn_ptr=bf,
                    kn_ptr=bf, slot_ptr="*i64", pos_ptr="*i64", seq_lens_ptr="*i32", qsl_ptr="*i32")
    gqa_dims = dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, PAGE=16, UPCAST=False, IEEE=False, KV_FP8=True)
    mla = triton_mla.DECODE_DEFAULTS
    builds = {
        "store_kv": (gqa._store_kv_kernel, dict(NUM_KV_HEADS=8, HEAD_DIM=128, PAGE=16, BLOCK_H=8, BLOCK_D=128,
                                                 QUANT=True), 4, 1),
        "gqa_decode": (gqa._decode_split_kernel, dict(gqa_dims, BLOCK_H=16, BLOCK_N=64, DIRECT=False, MIXED=False),
                       4, 3),
        "gqa_extend": (gqa._extend_kernel, dict(gqa_dims, GROUP_PAD=4, BLOCK_M=128, BLOCK_N=64, SKIP_DECODE=True), 4, 3),
        "store_latent": (triton_mla._store_latent_kernel, dict(WIDTH=576, BLOCK=1024, PAGE=64, QUANT=True), 4, 1),
        "mla_decode": (triton_mla._mla_decode_kernel,
                       dict(NUM_HEADS=128, BLOCK_H=mla["block_h"], HEAD_TILES=128 // mla["block_h"], KV_LORA=512,
                            BLOCK_C=512, ROPE=64, BLOCK_R=64, BLOCK_N=mla["block_n"], PAGE=64, ROW_REQ=False,
                            DIRECT=False, UPCAST=False, IEEE=False, KV_FP8=True), mla["num_warps"], mla["num_stages"]),
        "rope_write_kv": (norm_rope._rope_write_kv_kernel, dict(NUM_Q_HEADS=32, NUM_KV_HEADS=8, HALF=64, WRITE_KV=True,
                                                                HAS_NORM=True, QUANT=True), 4, 1),
    }
    try:
        return {name: resources(fn, consts, ASTSource, warps, stages, structured=True)
                for name, (fn, consts, warps, stages) in builds.items()}
    finally:
        POINTERS.clear()
        POINTERS.update(saved)


def main() -> int:
    if "--fp8-kv-json" in sys.argv:  # for tests/test_fp8_kv.py (a clean process: no interpreter mode)
        import json

        print(json.dumps(fp8_kv_reports()))
        return 0
    if "--gluon-json" in sys.argv:  # for tests/test_sm90_build.py (a clean process: no interpreter mode)
        import json

        if gluon_mla.GLUON_IMPORT_ERROR is not None:
            print(json.dumps({"skip": gluon_mla.GLUON_IMPORT_ERROR}))
        else:
            reports = {str(direct): gluon_report(direct) for direct in (False, True)}
            reports["registers path"] = gluon_report(False, q_async=False)  # q by loads into registers
            reports["timed"] = gluon_report(False, times=True)  # the diagnostics build (probe_mla_decode.py)
            print(json.dumps(reports))
        return 0
    common = dict(NUM_HEADS=128, HEAD_TILES=2, PAGE=16, KV_LORA=512, ROPE=64)
    cfg = triton_mla.DECODE_DEFAULTS
    print("triton _mla_decode_kernel", cfg, "(split):")
    print("  ", resources(triton_mla._mla_decode_kernel,
                          dict(common, BLOCK_H=cfg["block_h"], HEAD_TILES=128 // cfg["block_h"], BLOCK_C=512,
                               BLOCK_R=64, BLOCK_N=cfg["block_n"], ROW_REQ=False, DIRECT=False, UPCAST=False,
                               IEEE=False, KV_FP8=False), ASTSource, cfg["num_warps"], cfg["num_stages"]))
    if gluon_mla.GLUON_IMPORT_ERROR is not None:
        print("gluon kernel: not importable:", gluon_mla.GLUON_IMPORT_ERROR)
        return 0
    for direct in (False, True):
        r = gluon_report(direct)
        print(f"gluon _mla_decode_gluon_kernel ({'one split' if direct else 'split'}):")
        print(f"   registers {r['registers']}, spill stack {r['spill_stack']} B, shared {r['shared']:,} B, "
              f"ttgir ops {r['ops']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
