"""A multi-token-prediction (MTP) layer: DeepSeek-V3's next-n module, reusable by any model whose
checkpoint carries one (DeepSeek-V3 / Kimi-K2, V3.2, GLM-5 lay it out the same way).

At position i it combines the target model's hidden state h_i with the embedding of the next
token t_{i+1} and runs one decoder block on the result; its shared head then predicts t_{i+2}:

    x   = eh_proj([enorm(embed(t_{i+1})), hnorm(h_i)])     (embedding first, as released)
    y   = block(x)                                          (a full decoder layer, own KV cache)
    p   = shared_head.head(shared_head.norm(y))             (logits of t_{i+2})

`y` (before shared_head.norm) is what a chained step feeds back as the next hidden state.

The decoder block comes from a factory, so a model with another attention (V3.2's indexed MLA)
passes its own. The block's four sub-modules are adopted as this layer's own children: the
checkpoint stores them beside the MTP tensors (`model.layers.61.self_attn.*` next to
`model.layers.61.enorm.weight`), so parameter names match it without a rename table.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dlengine.kernels.context import ForwardContext
from dlengine.models.layers.decoder import PreNormDecoderLayer
from dlengine.models.layers.linear import Linear
from dlengine.models.layers.norm import RMSNorm
from dlengine.models.layers.parallel_linear import ParallelLMHead

_BLOCK_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


class SharedHead(nn.Module):
    """`shared_head.norm` and `shared_head.head` (the checkpoint's own copy of the output head)."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)
        self.head = ParallelLMHead(hidden_size, vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden))


class MultiTokenPredictionLayer(PreNormDecoderLayer):
    """One next-n layer. `make_block()` returns a PreNormDecoderLayer built for this layer's index
    (its attention reads and writes cache layer `layer_idx`)."""

    def __init__(self, hidden_size: int, vocab_size: int, eps: float,
                 make_block: Callable[[], PreNormDecoderLayer]) -> None:
        super().__init__()
        self.enorm = RMSNorm(hidden_size, eps)
        self.hnorm = RMSNorm(hidden_size, eps)
        self.eh_proj = Linear(2 * hidden_size, hidden_size)
        block = make_block()
        for part in _BLOCK_PARTS:
            self.add_module(part, getattr(block, part))
        self.shared_head = SharedHead(hidden_size, vocab_size, eps)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """embeds: embeddings of the next tokens [T, H]; hidden: the target's (or the previous
        chained step's) hidden states at the same positions [T, H]. Returns y [T, H]."""
        # position 0 has no previous token in training, so its embedding input is zeroed (as vLLM
        # serves the released DeepSeek MTP weights)
        embeds = embeds.masked_fill((positions == 0).unsqueeze(-1), 0.0)
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        out, residual = PreNormDecoderLayer.forward(self, positions, x, None, ctx)
        return out + residual

    def compute_logits(self, y: torch.Tensor) -> torch.Tensor:
        return self.shared_head(y)
