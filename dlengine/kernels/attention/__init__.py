"""Paged attention (GQA): the AttentionBackend protocol, the torch reference, Triton kernels and the
backends built from them (see backend.py)."""
