"""Block-scaled FP8 (DeepSeek-V3 checkpoints): torch references (fp8_torch.py) and the Triton GEMM."""
