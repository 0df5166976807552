"""The pre-norm residual block shared by the decoder models: subclasses set `input_layernorm`,
`self_attn`, `post_attention_layernorm` and `mlp`; the forward (with the running residual carried
through the fused add+RMSNorm) is written once here."""

from __future__ import annotations

from torch import nn


class PreNormDecoderLayer(nn.Module):
    def forward(self, positions, hidden, residual, ctx):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, ctx)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual
