"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) over the paged latent cache: the torch
reference (mla_torch.py), Triton decode and extend, the Hopper Gluon decode, FlashInfer's MLA, and
which kernel runs decode steps (decode_choice.py). docs/mla.md explains the paths."""
