"""Multimodal inputs: image loading, preprocessing, content hashing, M-RoPE positions."""
