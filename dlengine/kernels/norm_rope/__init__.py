"""The small fused ops of a decoder layer: RMSNorm (+ residual), SiLU-and-mul, RoPE and the fused
QK-norm + RoPE + KV-cache write; torch references and Triton kernels."""
