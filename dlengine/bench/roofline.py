"""Bytes and FLOPs a decoder-only transformer must move and compute: the numerators of MBU and MFU.

These are estimates from the model shape (documented in docs/bench.md), not counters:

- weights read per decode step: every parameter byte once (tied embedding / LM head counted
  once), minus an untied input-embedding table (a decode step reads only one row per sequence);
  for mixture-of-experts layers only the experts the step's tokens route to are read: with E
  experts, top-k routing and n tokens in the step, uniform routing touches on average
  E * (1 - (1 - k/E)^n) experts per layer (`weight_bytes_for_tokens`);
- KV bytes read: context tokens x `kv_bytes_per_token` (= layers * the cache's elements per token
  and layer * element size: 2 * kv_heads * head_dim for GQA, kv_lora_rank + rope dims for MLA's
  latent) per sequence per step; with DeepSeek Sparse Attention (index_topk in the config) a
  decode token reads the latent of min(context, index_topk) tokens and the indexer key
  (`index_key_bytes_per_token`) of every context token (`kv_bytes_read`);
- recurrent state (models with state cache specs, e.g. Gated DeltaNet hybrids): every sequence
  reads and writes its whole state once per decode step (`state_bytes_per_seq` each way), and
  only the paged (full-attention) layers count KV bytes per context token;
- FLOPs: 2 per multiply-add of every linear layer a token passes through (`2 * active_body_params`
  per token, body = all parameters but the embedding and the LM head, active = minus the E - k
  experts a token does not visit in each MoE layer), `2 * lm_head_params` per sampled token (only
  the last prompt position is sampled in a prefill), and attention `2 * layers * heads *
  (qk_dim + v_dim)` per (query, key) pair (QK^T and PV, 2 FLOPs per multiply-add each; MLA
  counts its per-head nope + rope query/key dims and v dims, the un-absorbed formulation);
  causal prefill over L tokens counts L^2/2 pairs, a decode token with context c counts c pairs.

Norms, activations, rotary and softmax are left out (a few % at most), and so is a vision
tower (`model.visual`), which runs once per image rather than per token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
from torch import nn


@dataclass(frozen=True)
class ModelCost:
    param_bytes: int  # every parameter once (tied weights once)
    decode_weight_bytes: int  # what a decode step reads: param_bytes minus an untied input embedding
    num_params: int
    body_params: int  # parameters outside the embedding and the LM head
    lm_head_params: int  # vocab * hidden
    num_layers: int
    num_heads: int
    head_dim: int
    kv_bytes_per_token: int  # layers * cache elements per token and layer * cache element size
    qk_head_dim: int = 0  # attention dims per head for FLOPs (0: head_dim)
    v_head_dim: int = 0
    moe_layers: int = 0
    num_experts: int = 0
    top_k: int = 0
    expert_params: int = 0  # one routed expert of one layer
    expert_bytes: int = 0
    sparse_topk: int = 0  # DeepSeek Sparse Attention: tokens a query attends to (0: dense)
    index_key_bytes_per_token: int = 0  # indexer layers * index_head_dim * cache element size
    state_bytes_per_seq: int = 0  # recurrent state of one sequence (state cache specs), all layers

    @staticmethod
    def from_engine(engine) -> "ModelCost":
        return ModelCost.from_model(engine.model, engine.config.model, engine.kv_cache.dtype)

    @staticmethod
    def from_model(model: nn.Module, cfg, kv_dtype: torch.dtype) -> "ModelCost":
        # a vision tower (`model.visual`: Qwen3-VL, Qwen3.5) runs once per image, not per step:
        # neither a decode step's weight reads nor the per-token FLOPs count it
        visual = getattr(getattr(model, "model", None), "visual", None)
        vision_ids = {id(p) for p in visual.parameters()} if isinstance(visual, nn.Module) else set()
        # nn.Module.parameters() yields a shared tensor once
        params = [p for p in model.parameters() if id(p) not in vision_ids]
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        num_params = sum(p.numel() for p in params)
        lm_head = getattr(model, "lm_head", None)
        lm_weight = getattr(lm_head, "weight", None)
        # input embeddings: nn.Embedding or dlengine's Embedding (any "*Embedding" with a weight parameter)
        embeds = [m.weight for m in model.modules()
                  if "Embedding" in type(m).__name__ and isinstance(getattr(m, "weight", None), nn.Parameter)]
        lm_id = id(lm_weight) if lm_weight is not None else None
        excluded = {id(w): w for w in embeds}
        if lm_weight is not None:
            excluded[lm_id] = lm_weight
        body = num_params - sum(w.numel() for w in excluded.values())
        untied_embed_bytes = sum(w.numel() * w.element_size() for w in embeds if id(w) != lm_id)
        lm_params = lm_weight.numel() if lm_weight is not None else cfg.vocab_size * cfg.hidden_size
        elem = torch.empty((), dtype=kv_dtype).element_size()
        moe = [m for m in model.modules() if hasattr(m, "w13_weight") and hasattr(m, "num_experts")]
        expert_params = expert_bytes = 0
        if moe:
            m = moe[0]
            expert_tensors = [p for n, p in m.named_parameters(recurse=False)]
            expert_params = sum(p.numel() for p in expert_tensors) // m.num_experts
            expert_bytes = sum(p.numel() * p.element_size() for p in expert_tensors) // m.num_experts
        hf = getattr(cfg, "hf_config", {}) or {}
        if hf.get("kv_lora_rank"):  # MLA
            qk_dim = int(hf["qk_nope_head_dim"]) + int(hf["qk_rope_head_dim"])
            v_dim = int(hf["v_head_dim"])
        else:
            qk_dim = v_dim = cfg.head_dim
        kv_per_token = cfg.num_hidden_layers * cfg.kv_bytes_per_token_per_layer_elem * elem
        state_bytes = 0
        specs = []
        declare = getattr(type(model), "cache_specs", None)
        if declare is not None:  # hybrids: KV only in the paged layers, a state per sequence in the others
            specs = declare(cfg, dtype=kv_dtype)
            if any(not s.paged for s in specs):
                kv_per_token = sum(s.bytes_per_token for s in specs if s.paged)
                state_bytes = sum(s.slot_bytes for s in specs if not s.paged)
        sparse_topk = int(hf.get("index_topk") or 0)
        indexer_layers = sum(1 for kind in (hf.get("indexer_types") or ["full"] * cfg.num_hidden_layers)
                             [:cfg.num_hidden_layers] if kind == "full") if sparse_topk else 0
        # the indexer keys' own dtype where the model declares it (bf16 under an FP8 latent cache)
        key_specs = [s for s in specs if s.name == "indexer_k"]
        index_key_bytes = (key_specs[0].bytes_per_token if key_specs
                           else indexer_layers * int(hf.get("index_head_dim") or 0) * elem)
        return ModelCost(
            sparse_topk=sparse_topk,
            index_key_bytes_per_token=index_key_bytes if sparse_topk else 0,
            param_bytes=param_bytes,
            decode_weight_bytes=param_bytes - untied_embed_bytes,
            num_params=num_params,
            body_params=body,
            lm_head_params=lm_params,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            head_dim=cfg.head_dim,
            kv_bytes_per_token=kv_per_token,
            qk_head_dim=qk_dim,
            v_head_dim=v_dim,
            moe_layers=len(moe),
            num_experts=moe[0].num_experts if moe else 0,
            top_k=moe[0].top_k if moe else 0,
            expert_params=expert_params,
            expert_bytes=expert_bytes,
            state_bytes_per_seq=state_bytes,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------ FLOPs
    @property
    def attn_flops_per_pair(self) -> int:
        qk, v = self.qk_head_dim or self.head_dim, self.v_head_dim or self.head_dim
        return 2 * self.num_layers * self.num_heads * (qk + v)

    @property
    def active_body_params(self) -> int:
        """Body parameters one token passes through: MoE layers count only its top-k experts."""
        idle = self.moe_layers * (self.num_experts - self.top_k) * self.expert_params
        return self.body_params - idle

    def expected_experts_touched(self, num_tokens: float) -> float:
        """Mean distinct experts per MoE layer that `num_tokens` tokens route to, if each token
        picks top_k distinct experts uniformly at random."""
        if not self.num_experts:
            return 0.0
        return self.num_experts * (1.0 - (1.0 - self.top_k / self.num_experts) ** max(0.0, num_tokens))

    def weight_bytes_for_tokens(self, num_tokens: float) -> float:
        """Weight bytes a step over `num_tokens` tokens reads: `decode_weight_bytes` for dense
        models; MoE layers read only the experts the tokens route to."""
        if not self.moe_layers:
            return float(self.decode_weight_bytes)
        idle = self.num_experts - self.expected_experts_touched(num_tokens)
        return self.decode_weight_bytes - self.moe_layers * idle * self.expert_bytes

    def prefill_flops(self, prompt_len: int, num_cached: int = 0) -> float:
        """One prompt's prefill: linear layers over the computed tokens, causal attention over them
        (pairs (L^2 - cached^2) / 2), and the LM head on the last position."""
        computed = prompt_len - num_cached
        linear = 2.0 * self.active_body_params * computed + 2.0 * self.lm_head_params
        attn = self.attn_flops_per_pair * (prompt_len**2 - num_cached**2) / 2.0
        return linear + attn

    def decode_flops(self, context_len: float) -> float:
        """One decode token attending to `context_len` tokens (itself included)."""
        return 2.0 * (self.active_body_params + self.lm_head_params) + self.attn_flops_per_pair * context_len

    def request_flops(self, prompt_len: int, output_len: int, num_cached: int = 0) -> float:
        """A whole request: its prefill (which samples output token 1) and output_len - 1 decode
        tokens, the k-th of which (k = 2..output_len) attends to prompt_len + k - 1 tokens."""
        n_dec = max(0, output_len - 1)
        ctx_sum = n_dec * prompt_len + n_dec * (n_dec + 1) / 2.0
        return (self.prefill_flops(prompt_len, num_cached) + 2.0 * (self.active_body_params + self.lm_head_params) * n_dec
                + self.attn_flops_per_pair * ctx_sum)

    # ------------------------------------------------------------------ bytes
    def decode_step_bytes(self, context_lens: Iterable[float]) -> float:
        """Bytes one decode step reads: the weights once (MoE: the experts its tokens route to)
        plus every sequence's KV context (and its recurrent state, read and written)."""
        context_lens = list(context_lens)
        return (self.weight_bytes_for_tokens(len(context_lens)) + sum(self.kv_bytes_read(c) for c in context_lens)
                + 2.0 * self.state_bytes_per_seq * len(context_lens))

    def kv_bytes_read(self, context_len: float) -> float:
        """Cache bytes one decode token with `context_len` tokens of context reads: all of it, or
        under sparse attention the selected tokens' latents and every token's indexer key."""
        if not self.sparse_topk:
            return self.kv_bytes_per_token * float(context_len)
        return (self.kv_bytes_per_token * float(min(context_len, self.sparse_topk))
                + self.index_key_bytes_per_token * float(context_len))

    def request_decode_kv_bytes(self, prompt_len: int, output_len: int) -> float:
        """KV bytes read by a request's output_len - 1 decode steps (contexts prompt_len+1 ..
        prompt_len+output_len-1)."""
        n_dec = max(0, output_len - 1)
        state = 2.0 * self.state_bytes_per_seq * n_dec  # recurrent state read and written per step
        if self.sparse_topk:
            return sum(self.kv_bytes_read(prompt_len + k) for k in range(1, n_dec + 1)) + state
        return self.kv_bytes_per_token * (n_dec * prompt_len + n_dec * (n_dec + 1) / 2.0) + state
