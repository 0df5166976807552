"""Kernels, grouped by operation; each Triton / Gluon kernel sits beside its torch reference.

  context.py        AttentionMetadata + ForwardContext: what a forward reads besides activations
  selection.py      resolve_kernels(): the attention backend and fused ops chosen once at build,
                    kernel_scope() / current_kernels() through which layers receive them
  attention/        paged GQA attention: backend.py (the AttentionBackend protocol), torch
                    reference, Triton kernels, and the torch / triton / flashinfer backends
  mla/              multi-head latent attention: torch reference, Triton decode + extend, the
                    Hopper Gluon decode, FlashInfer's MLA, and the decode-kernel choice
  moe/              fused MoE experts: torch reference, Triton, block-scaled FP8 Triton
  fp8/              block-scaled FP8: torch references (quantisation, GEMM, FP8 experts), Triton GEMM
  norm_rope/        RMSNorm (+ residual), SiLU-and-mul, RoPE, QK-norm + RoPE + KV write
  common.py         SM count, FlashInfer page indices (no Triton)
  split_kv_triton.py  the split-KV decode epilogue and counters the GQA and MLA kernels share

Nothing here imports from models/ or engine/ (tests/test_import_graph.py checks it).
"""
