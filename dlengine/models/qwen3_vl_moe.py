"""Qwen3-VL-MoE (Qwen3VLMoeForConditionalGeneration): Qwen3-VL (qwen3_vl.py) with Qwen3-MoE's
sparse blocks (qwen3_moe.py) as feed-forward layers. Differences from Qwen3-MoE: the top-k
routing weights are always renormalised (the config has no norm_topk_prob), and the released
checkpoints store the fused experts transposed, `gate_up_proj` [E, H, 2I] and `down_proj`
[E, I, H]; both those and transformers' in-memory layout ([E, 2I, H], [E, H, I], what its
save_pretrained writes) load.
"""

from __future__ import annotations

import torch
from torch import nn

from dlengine.config import ModelConfig
from dlengine.models.layers.moe import FusedMoE
from dlengine.models.qwen3 import Qwen3MLP
from dlengine.models.qwen3_moe import MoeSettings, Qwen3MoeSparseBlock
from dlengine.models.qwen3_vl import Qwen3VLForConditionalGeneration


def _accept_released_layout(experts: FusedMoE, hidden: int, inter: int) -> None:
    """Wrap the experts' loaders so a fused tensor in the released (transposed) layout is
    transposed first. The layout is told by the sizes: [E, H, 2I] / [E, I, H] are the released
    ones (when H equals 2I or I the two read the same, and the released layout is assumed)."""
    for param, released in ((experts.w13_weight, (hidden, 2 * inter)), (experts.w2_weight, (inter, hidden))):
        load = param.weight_loader

        def loader(p, loaded: torch.Tensor, shard_id=None, _load=load, _released=released):
            if shard_id is None and loaded.dim() == 3 and tuple(loaded.shape[1:]) == _released:
                loaded = loaded.transpose(1, 2)
            return _load(p, loaded) if shard_id is None else _load(p, loaded, shard_id)

        param.weight_loader = loader


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        self.moe = MoeSettings(cfg)
        self.moe.norm_topk_prob = True
        # per-expert or fused expert tensors -> the stacked w13/w2 parameters (checked before stacked_params)
        self.expert_params = FusedMoE.checkpoint_mapping(self.moe.num_experts)
        super().__init__(cfg, max_position)

    def make_mlp(self, layer_idx: int) -> nn.Module:
        if not self.moe.is_sparse(layer_idx):
            return Qwen3MLP(self.config.hidden_size, self.config.intermediate_size)
        block = Qwen3MoeSparseBlock(self.config.hidden_size, self.moe)
        _accept_released_layout(block.experts, self.config.hidden_size, self.moe.intermediate_size)
        return block
