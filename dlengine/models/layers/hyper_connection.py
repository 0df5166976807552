"""Manifold-constrained hyper-connections (mHC) of DeepSeek-V4, as transformers 5.25 computes
them (DeepseekV4HyperConnection / DeepseekV4HyperHead), in float32.

The residual is `hc_mult` streams [T, n, D]. Before a block, `HyperConnection` maps the streams
to pre [T, n] (collapses them into the block input), post [T, n] (spreads the block output back)
and comb [T, n, n] (mixes the streams; Sinkhorn-normalised towards doubly stochastic); after
the block: streams = post * out + comb^T @ streams. `hyper_head` is the final collapse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlengine.models.layers.v4_attention import float32_param


def _flat_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class HyperConnection:
    """The mixing rule of one hyper-connection site; its parameters (`fn`, `base`, `scale`) live
    on the decoder layer under the checkpoint's names (`hc_attn_fn`, ...) and are passed in."""

    def __init__(self, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float) -> None:
        self.n, self.iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, hc_eps, norm_eps

    @staticmethod
    def params(hidden: int, hc_mult: int) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        n = hc_mult
        return float32_param((2 + n) * n, n * hidden), float32_param((2 + n) * n), float32_param(3)

    def split(self, streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor,
              scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [T, n, D] -> (post [T, n], comb [T, n, n], block input [T, D])."""
        n = self.n
        mixes = F.linear(_flat_rms(streams.flatten(1).float(), self.norm_eps), fn.float())
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = base.split([n, n, n * n])
        pre_s, post_s, comb_s = scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * comb_s + comb_b.view(n, n), dim=-1) + self.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
        return post, comb, collapsed

    @staticmethod
    def merge(streams: torch.Tensor, block_out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """post * out + comb^T @ streams (comb is read transposed: sum over its first axis)."""
        dtype = streams.dtype
        return (post.to(dtype).unsqueeze(-1) * block_out.unsqueeze(-2)
                + torch.matmul(comb.to(dtype).transpose(-1, -2), streams))


def hyper_head(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, hc_eps: float,
               norm_eps: float) -> torch.Tensor:
    """The final collapse of the streams [T, n, D] -> [T, D] (checkpoint: hc_head_fn / base / scale)."""
    mixes = F.linear(_flat_rms(streams.flatten(1).float(), norm_eps), fn.float())
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + hc_eps
    return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
