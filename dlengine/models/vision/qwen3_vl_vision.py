"""Qwen3-VL's vision tower (`model.visual` of the checkpoint), as transformers computes it; also
Qwen3.5's, which is the same tower without deepstack (no `deepstack_visual_indexes`).

Input: the image processor's flattened patches [N, C * T * P * P] (T = temporal_patch_size, a
still image is repeated T times) of every image of a request, and each image's grid (t, h, w) in
patches. The processor orders patches so that the `m x m` patches one merged token covers are
consecutive (m = spatial_merge_size). Then:

1. patch embedding: a Conv3d whose kernel equals its stride, i.e. one linear map per patch;
2. a learned position table of `num_position_embeddings` entries (a square grid) resampled
   bilinearly (align_corners) to each image's h x w grid, added to the patch embeddings;
3. `depth` pre-norm ViT blocks (LayerNorm, bidirectional attention with a 2-D rotary embedding
   over (row, col) of each patch, GELU MLP); attention never crosses images (or video frames):
   each frame is its own sequence (transformers' `cu_seqlens`);
4. the patch merger: LayerNorm, then m x m neighbouring patches concatenated and mapped by a
   2-layer MLP to the text model's hidden size: one token per merged group;
5. deepstack: after the blocks listed in `deepstack_visual_indexes`, a merger of its own (norm
   after the concatenation) maps the hidden states to features that the text model adds to its
   hidden states at the image tokens after decoder layers 0, 1, ... (Qwen3-VL only).

Weight names follow the checkpoint (`patch_embed.proj`, `pos_embed`, `blocks.{i}.attn.qkv`, ...).
The tower is replicated on every rank under tensor parallelism (it is small next to the text model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dlengine.config import ConfigError
from dlengine.models.layers.linear import Linear, default_weight_loader


def _param(*shape: int) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = default_weight_loader
    return p


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = _param(dim), _param(dim), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride over [C, T, P, P] patches: one matrix product per patch."""

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Module()
        self.proj.weight = _param(dim, in_channels, temporal_patch_size, patch_size, patch_size)
        self.proj.bias = _param(dim)
        self.dim = dim

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(patches.to(w.dtype), w.reshape(self.dim, -1), self.proj.bias)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=True)
        self.proj = Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim).unbind(1)
        # the rotation in float32, as transformers does it
        c, s = cos[:, None, :], sin[:, None, :]
        q = (q.float() * c + _rotate_half(q.float()) * s).to(v.dtype)
        k = (k.float() * c + _rotate_half(k.float()) * s).to(v.dtype)
        return self.proj(_attention_per_image(q, k, v, seq_lens).reshape(n, -1))


def _attention_per_image(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """Bidirectional attention within each image / frame; q, k, v [N, H, D] -> [N, H, D].

    Runs of equal-length images (a video's frames, a batch of same-size images) go in one call as
    a batch; SDPA gets 4-D [B, H, L, D] inputs, which its flash and memory-efficient kernels need
    (a 3-D call falls back to the math path, which materialises every score in memory)."""
    outs, start, i = [], 0, 0
    while i < len(seq_lens):
        length, j = seq_lens[i], i
        while j < len(seq_lens) and seq_lens[j] == length:
            j += 1
        end = start + length * (j - i)
        qs, ks, vs = (t[start:end].unflatten(0, (j - i, length)).transpose(1, 2) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).flatten(0, 1))
        start, i = end, j
    return torch.cat(outs) if len(outs) > 1 else outs[0]


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"vision hidden_act={act!r} is not supported (Qwen3-VL uses 'gelu_pytorch_tanh')")
        self.approximate = "tanh" if act == "gelu_pytorch_tanh" else "none"
        self.linear_fc1 = Linear(dim, hidden, bias=True)
        self.linear_fc2 = Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, act: str) -> None:
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(dim), LayerNorm(dim)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = VisionMLP(dim, mlp_hidden, act)

    def forward(self, x, cos, sin, seq_lens):
        x = x + self.attn(self.norm1(x), cos, sin, seq_lens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """m x m patches -> one text-sized token. The final merger normalises each patch before the
    concatenation; the deepstack mergers (`postshuffle_norm`) normalise the concatenation."""

    def __init__(self, dim: int, merge: int, out_dim: int, postshuffle_norm: bool) -> None:
        super().__init__()
        self.merged_dim = dim * merge * merge
        self.postshuffle_norm = postshuffle_norm
        self.norm = LayerNorm(self.merged_dim if postshuffle_norm else dim)
        self.linear_fc1 = Linear(self.merged_dim, self.merged_dim, bias=True)
        self.linear_fc2 = Linear(self.merged_dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.reshape(-1, self.merged_dim)) if self.postshuffle_norm else self.norm(x).reshape(-1, self.merged_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def _merge_order_coords(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of each patch of one frame in the processor's order: merge blocks in raster
    order, the m x m patches of a block consecutive."""
    rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
    cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
    return rows.transpose(1, 2).reshape(-1), cols.transpose(1, 2).reshape(-1)


class Qwen3VLVisionModel(nn.Module):
    def __init__(self, vc: dict) -> None:
        super().__init__()
        try:
            dim, heads = int(vc["hidden_size"]), int(vc["num_heads"])
            self.merge = int(vc["spatial_merge_size"])
            self.patch_embed = PatchEmbed(int(vc.get("in_channels", 3)), int(vc["temporal_patch_size"]),
                                          int(vc["patch_size"]), dim)
            num_pos = int(vc["num_position_embeddings"])
            depth, mlp_hidden, out_dim = int(vc["depth"]), int(vc["intermediate_size"]), int(vc["out_hidden_size"])
            self.deepstack_indexes = [int(i) for i in vc.get("deepstack_visual_indexes") or []]
        except KeyError as e:
            raise ConfigError(f"vision_config lacks the field {e.args[0]!r}") from None
        self.side = int(round(num_pos ** 0.5))
        if self.side * self.side != num_pos:
            raise ConfigError(f"vision num_position_embeddings={num_pos} is not a square grid")
        self.pos_embed = nn.Module()
        self.pos_embed.weight = _param(num_pos, dim)
        head_dim = dim // heads
        theta = float((vc.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        # axial 2-D rope: head_dim // 4 frequencies per axis, rows then columns, repeated twice
        quarter = head_dim // 2
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter),
                             persistent=False)
        act = vc.get("hidden_act", "gelu_pytorch_tanh")
        self.blocks = nn.ModuleList(VisionBlock(dim, heads, mlp_hidden, act) for _ in range(depth))
        self.merger = PatchMerger(dim, self.merge, out_dim, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(dim, self.merge, out_dim, postshuffle_norm=True) for _ in self.deepstack_indexes)

    def _positions(self, grids: list[tuple[int, int, int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per patch: (row, col) and the 4 bilinear taps / weights into the position table."""
        rows, cols, taps, weights = [], [], [], []
        side = self.side
        for t, h, w in grids:
            r, c = _merge_order_coords(h, w, self.merge)
            # align_corners: the grid's ends map onto the table's ends
            fr = r.float() * (side - 1) / max(h - 1, 1)
            fc = c.float() * (side - 1) / max(w - 1, 1)
            r0, c0 = fr.floor().long(), fc.floor().long()
            r1, c1 = (r0 + 1).clamp(max=side - 1), (c0 + 1).clamp(max=side - 1)
            dr, dc = fr - r0, fc - c0
            tap = torch.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], -1)
            wt = torch.stack([(1 - dr) * (1 - dc), (1 - dr) * dc, dr * (1 - dc), dr * dc], -1)
            rows.append(r.repeat(t)), cols.append(c.repeat(t)), taps.append(tap.repeat(t, 1)), weights.append(wt.repeat(t, 1))
        cat = lambda xs: torch.cat(xs).to(device)  # noqa: E731
        return torch.stack([cat(rows), cat(cols)], -1), cat(taps), cat(weights)

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """patches [N, C*T*P*P] of the images `grids` (t, h, w) -> (tokens [N / m^2, out_dim],
        deepstack features, one [N / m^2, out_dim] per deepstack layer)."""
        x = self.patch_embed(patches)
        rc, taps, wts = self._positions(grids, x.device)
        pos = (self.pos_embed.weight[taps] * wts[:, :, None]).sum(1)
        x = x + pos.to(x.dtype)
        freqs = rc[:, :, None].float() * self.inv_freq  # [N, 2, head_dim // 4]
        half = torch.cat([freqs[:, 0], freqs[:, 1]], -1)
        emb = torch.cat([half, half], -1)
        cos, sin = emb.cos(), emb.sin()
        seq_lens = [h * w for t, h, w in grids for _ in range(t)]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, seq_lens)
            if i in self.deepstack_indexes:
                deepstack.append(self.deepstack_merger_list[self.deepstack_indexes.index(i)](x))
        return self.merger(x), deepstack
