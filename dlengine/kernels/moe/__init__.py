"""Fused MoE experts: the torch reference (fused_moe_torch.py), Triton, block-scaled FP8 Triton."""
