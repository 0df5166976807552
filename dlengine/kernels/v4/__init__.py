"""DeepSeek-V4 attention and MoE operations (docs/deepseek_v4.md): torch references in
reference.py (the CPU path and the oracle for fused kernels); the batched decode step's device-only
compressor / indexer helpers in batched_decode.py; Triton: decode_triton.py (decode attention),
prefill_triton.py (prompt-step attention), indexer_triton.py (the indexer scores, on DSA's kernel)."""
