"""DeepSeek-V4 attention and MoE operations (docs/deepseek_v4.md): torch references in
reference.py. They are the CPU path and the oracle for fused kernels."""
