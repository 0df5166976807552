"""DeepSeek-V4 (DeepseekV4ForCausalLM), as transformers 5.25 implements it; every component and
its mapping is listed in docs/deepseek_v4.md.

A layer: hyper-connection split -> attn_norm -> attention (sliding window, + CSA or HCA compressed
entries: layers/v4_attention.py) -> merge; hyper-connection split -> ffn_norm -> MoE (hash- or
learned-routed, clamped SwiGLU: layers/v4_moe.py) -> merge. The residual is `hc_mult` streams
(layers/hyper_connection.py), collapsed by the hyper head before the final norm and `head`.

Module names are the released checkpoint's (`embed`, `layers.N.attn.wq_a`, `layers.N.ffn.gate`,
`hc_head_fn`, `head`, no `model.` prefix), so loading renames nothing but the per-expert tensors.
The `mtp.*` tensors (the multi-token-prediction module) are not loaded, as in transformers.

Under tensor parallelism the query heads, output groups, experts' intermediate dims and vocab are
split; the shared K=V head, compressors, indexer, routers and hyper-connections are replicated,
so every rank holds the whole cache (docs/deepseek_v4.md, "Tensor and expert parallelism").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dlengine.cache.specs import CacheSpec, StateTensor
from dlengine.cache.v4_specs import CompressedKVSpec, V4StateSpec
from dlengine.config import ConfigError, ModelConfig, RopeConfig
from dlengine.kernels.context import ForwardContext
from dlengine.models.layers.hyper_connection import HyperConnection, hyper_head
from dlengine.models.layers.norm import RMSNorm
from dlengine.models.layers.parallel_linear import ParallelLMHead, VocabParallelEmbedding
from dlengine.models.layers.v4_attention import CSA, HCA, SLIDING, V4_STATE, InterleavedRope, V4Attention, float32_param
from dlengine.models.layers.v4_moe import V4MoE
from dlengine.parallel.state import get_parallel_state

_COMPRESS_RATIO_TO_KIND = {0: SLIDING, 4: CSA, 128: HCA}  # legacy `compress_ratios`


@dataclass(frozen=True)
class V4Settings:
    """The fields of a DeepSeek-V4 config.json, with transformers' defaults and legacy names."""

    hidden: int
    num_heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int
    compress_rates: dict
    layer_types: tuple[str, ...]
    mlp_layer_types: tuple[str, ...]
    index_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    eps: float
    num_experts: int
    top_k: int
    moe_intermediate: int
    routed_scaling_factor: float
    swiglu_limit: float
    main_rope: RopeConfig
    compress_rope: RopeConfig

    @staticmethod
    def from_config(cfg: ModelConfig) -> "V4Settings":
        hf, n = cfg.hf_config, cfg.num_hidden_layers
        where = f"{cfg.path}/config.json"
        rates = dict(hf.get("compress_rates") or {CSA: 4, HCA: 128})
        rates.setdefault(CSA, hf.get("compress_rate_csa", 4))
        rates.setdefault(HCA, hf.get("compress_rate_hca", 128))
        types = hf.get("layer_types")
        if types is None and hf.get("compress_ratios") is not None:
            types = [_COMPRESS_RATIO_TO_KIND.get(r, "?") for r in hf["compress_ratios"]]
        if types is None:
            types = [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
        types = tuple(types[:n])
        if len(types) < n or set(types) - {SLIDING, CSA, HCA}:
            raise ConfigError(f"{where}: layer_types must name {n} layers, each {SLIDING!r}, {CSA!r} or {HCA!r}; "
                              f"got {list(types)}")
        mlp = hf.get("mlp_layer_types")
        if mlp is None:
            n_hash = int(hf.get("num_hash_layers", 3))
            mlp = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
        mlp = tuple(mlp[:n])
        if len(mlp) < n or set(mlp) - {"hash_moe", "moe"}:
            raise ConfigError(f"{where}: mlp_layer_types must name {n} layers, each 'hash_moe' or 'moe'; got {list(mlp)}")
        if hf.get("scoring_func", "sqrtsoftplus") != "sqrtsoftplus":
            raise ConfigError(f"{where}: scoring_func={hf['scoring_func']!r} is not supported (DeepSeek-V4 uses "
                              "'sqrtsoftplus')")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (DeepSeek-V4 uses 'silu')")
        if int(hf.get("num_key_value_heads", 1) or 1) != 1:
            raise ConfigError(f"{where}: DeepSeek-V4 attention has one shared KV head; got num_key_value_heads="
                              f"{hf['num_key_value_heads']}")
        head_dim = int(hf.get("head_dim", 512))
        rope_params = hf.get("rope_parameters") or {}
        partial = hf.get("partial_rotary_factor")
        if partial is None:
            partial = hf["qk_rope_head_dim"] / head_dim if "qk_rope_head_dim" in hf else 64 / 512
        main, compress = _rope_configs(hf, rope_params, float(partial))
        try:
            s = V4Settings(
                hidden=cfg.hidden_size, num_heads=cfg.num_attention_heads, head_dim=head_dim,
                rope_dim=int(head_dim * float(partial)), q_lora_rank=int(hf.get("q_lora_rank", 1024)),
                o_groups=int(hf.get("o_groups", 8)), o_lora_rank=int(hf.get("o_lora_rank", 1024)),
                window=int(hf.get("sliding_window", 128)), compress_rates={k: int(v) for k, v in rates.items()},
                layer_types=types, mlp_layer_types=mlp, index_heads=int(hf.get("index_n_heads", 64)),
                index_head_dim=int(hf.get("index_head_dim", 128)), index_topk=int(hf.get("index_topk", 512)),
                hc_mult=int(hf.get("hc_mult", 4)), hc_sinkhorn_iters=int(hf.get("hc_sinkhorn_iters", 20)),
                hc_eps=float(hf.get("hc_eps", 1e-6)), eps=cfg.rms_norm_eps,
                num_experts=int(hf.get("n_routed_experts", 256)), top_k=int(hf.get("num_experts_per_tok", 6)),
                moe_intermediate=int(hf.get("moe_intermediate_size", 2048)),
                routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.5)),
                swiglu_limit=float(hf.get("swiglu_limit", 10.0)), main_rope=main, compress_rope=compress)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: a DeepSeek-V4 field has a value of the wrong kind: {e}") from None
        if s.rope_dim <= 0 or s.rope_dim % 2:
            raise ConfigError(f"{where}: partial_rotary_factor={partial} gives {s.rope_dim} rotary dims; need a "
                              "positive even number")
        if (s.num_heads * s.head_dim) % s.o_groups:
            raise ConfigError(f"{where}: o_groups={s.o_groups} must divide num_attention_heads * head_dim")
        if not 0 < s.top_k <= s.num_experts:
            raise ConfigError(f"{where}: num_experts_per_tok={s.top_k} must be in [1, n_routed_experts="
                              f"{s.num_experts}]")
        return s

    def check_tensor_parallel(self, tp: int, where: str) -> None:
        """ConfigError unless `tp` ranks can each hold whole shards: query heads (and their sinks),
        output groups (wo_a is one block per group) and the experts' intermediate dim."""
        if tp == 1:
            return
        for name, n, why in (("num_attention_heads", self.num_heads, "the query heads are split across ranks"),
                             ("o_groups", self.o_groups, "the grouped output projection wo_a is one block per "
                              "group, so each rank holds whole groups"),
                             ("moe_intermediate_size", self.moe_intermediate, "every expert's intermediate dim "
                              "(routed and shared) is split across ranks")):
            if n % tp:
                raise ConfigError(f"{where}: DeepSeek-V4 under tensor parallelism: {name}={n} is not divisible by "
                                  f"tp={tp} ({why}); choose a tp dividing it")


def _rope_configs(hf: dict, params: dict, partial: float) -> tuple[RopeConfig, RopeConfig]:
    """"main" (sliding layers: rope_theta, no scaling) and "compress" (CSA / HCA layers, their
    compressors and the indexer: compress_rope_theta, plus YaRN with attention_factor 1.0 when
    configured), from the nested `rope_parameters` transformers writes or the flat legacy form."""
    if isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
        main, compress = dict(params["main"]), dict(params["compress"])
    else:
        yarn = {k: v for k, v in params.items() if k not in ("main", "compress")}
        main = {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
        compress = {**yarn, "rope_theta": hf.get("compress_rope_theta", 160000.0)}
        compress.setdefault("rope_type", "default")
        if compress["rope_type"] == "yarn":
            compress.setdefault("attention_factor", 1.0)
    # rotation acts on rope_dim dims only: the factor is consumed by the caller, not RotaryEmbedding
    for p in (main, compress):
        p["partial_rotary_factor"] = 1.0
    max_pos = hf.get("max_position_embeddings", 4096)
    return (RopeConfig.from_hf({"rope_parameters": main, "max_position_embeddings": max_pos}),
            RopeConfig.from_hf({"rope_parameters": compress, "max_position_embeddings": max_pos}))


class DeepseekV4DecoderLayer(nn.Module):
    def __init__(self, s: V4Settings, layer_idx: int, main_rope: InterleavedRope, compress_rope: InterleavedRope,
                 vocab_size: int) -> None:
        super().__init__()
        self.hc = HyperConnection(s.hc_mult, s.hc_sinkhorn_iters, s.hc_eps, s.eps)
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = HyperConnection.params(s.hidden, s.hc_mult)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = HyperConnection.params(s.hidden, s.hc_mult)
        self.attn_norm = RMSNorm(s.hidden, s.eps)
        self.attn = V4Attention(s, layer_idx, s.layer_types[layer_idx], main_rope, compress_rope)
        self.ffn_norm = RMSNorm(s.hidden, s.eps)
        self.ffn = V4MoE(s.hidden, s.num_experts, s.top_k, s.moe_intermediate, s.routed_scaling_factor,
                         s.swiglu_limit, s.mlp_layer_types[layer_idx] == "hash_moe", vocab_size)

    def forward(self, positions: torch.Tensor, streams: torch.Tensor, input_ids: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        post, comb, x = self.hc.split(streams, self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale)
        streams = self.hc.merge(streams, self.attn(positions, self.attn_norm(x), ctx), post, comb)
        post, comb, x = self.hc.split(streams, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale)
        return self.hc.merge(streams, self.ffn(self.ffn_norm(x), input_ids), post, comb)


class DeepseekV4ForCausalLM(nn.Module):
    # assemble.py refuses cache(dtype="fp8_e4m3") with this reason
    fp8_kv_unsupported = "its sliding-window, compressed and indexer caches (kernels/v4/) are read as bf16"
    def __init__(self, cfg: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        s = self.settings = V4Settings.from_config(cfg)
        s.check_tensor_parallel(get_parallel_state().tp_size, f"{cfg.path}/config.json")
        self.expert_params = V4MoE.checkpoint_mapping(s.num_experts)
        self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        main_rope = InterleavedRope(s.rope_dim, max_position, s.main_rope)
        compress_rope = InterleavedRope(s.rope_dim, max_position, s.compress_rope)
        self.layers = nn.ModuleList(DeepseekV4DecoderLayer(s, i, main_rope, compress_rope, cfg.vocab_size)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        n = s.hc_mult
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = (float32_param(n, n * s.hidden), float32_param(n),
                                                                  float32_param(1))
        self.head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, self.embed if cfg.tie_word_embeddings else None)

    @property
    def lm_head(self) -> ParallelLMHead:
        """`head` under the name other families (and the roofline) use."""
        return self.head

    @classmethod
    def cache_specs(cls, model_config: ModelConfig, *, dtype: torch.dtype, tp_size: int = 1,
                    tp_rank: int = 0) -> list[CacheSpec]:
        """Compressed entries (paged) for the CSA / HCA layers and the CSA indexer; per-sequence
        rings (window K=V, partial compression windows) for every layer: docs/deepseek_v4.md.
        The same on every tensor-parallel rank: the one K=V head, the compressors and the indexer
        are replicated (only the query heads are split), so each rank holds the whole cache."""
        s = V4Settings.from_config(model_config)
        s.check_tensor_parallel(tp_size, f"{model_config.path}/config.json")
        by_kind = {k: tuple(i for i, t in enumerate(s.layer_types) if t == k) for k in (SLIDING, CSA, HCA)}
        if not by_kind[CSA] and not by_kind[HCA]:
            raise ConfigError(f"{model_config.path}: every layer is sliding_attention; the paged cache holds the "
                              "compressed entries of CSA / HCA layers, so keep at least one")
        specs: list[CacheSpec] = []
        m_csa, m_hca = s.compress_rates[CSA], s.compress_rates[HCA]
        if by_kind[CSA]:
            specs.append(CompressedKVSpec(by_kind[CSA], cache_name="csa_kv", compress_rate=m_csa,
                                          entry_dim=s.head_dim, dtype=dtype))
            specs.append(CompressedKVSpec(by_kind[CSA], cache_name="csa_index_k", compress_rate=m_csa,
                                          entry_dim=s.index_head_dim, dtype=dtype))
        if by_kind[HCA]:
            specs.append(CompressedKVSpec(by_kind[HCA], cache_name="hca_kv", compress_rate=m_hca,
                                          entry_dim=s.head_dim, dtype=dtype))
        for kind, layers in by_kind.items():
            if layers:
                tensors = [StateTensor("window_kv", (s.window, s.head_dim), dtype)]
                for name, (ring, width) in _compressor_rings(s, kind).items():
                    tensors.append(StateTensor(name, (ring, width), dtype))
                specs.append(V4StateSpec(layers, tensors=tuple(tensors), cache_name=V4_STATE[kind]))
        return specs

    def skip_checkpoint_tensor(self, name: str) -> bool:
        return name.startswith("mtp.")  # the MTP module: no speculator uses it yet (transformers drops it too)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [T, hidden] for the flattened batch."""
        x = self.embed(input_ids)
        streams = x.unsqueeze(1).expand(-1, self.settings.hc_mult, -1).contiguous()
        for layer in self.layers:
            streams = layer(positions, streams, input_ids, ctx)
        s = self.settings
        return self.norm(hyper_head(streams, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, s.hc_eps, s.eps))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)


def _compressor_rings(s: V4Settings, kind: str) -> dict[str, tuple[int, int]]:
    """(rows, width) of each projection ring a layer kind keeps (V4Attention.state_shapes)."""
    if kind == SLIDING:
        return {}
    m = s.compress_rates[kind]
    if kind == HCA:
        return {"hca_kv_kv": (m, s.head_dim), "hca_kv_gate": (m, s.head_dim)}
    return {"csa_kv_kv": (2 * m, 2 * s.head_dim), "csa_kv_gate": (2 * m, 2 * s.head_dim),
            "csa_index_k_kv": (2 * m, 2 * s.index_head_dim), "csa_index_k_gate": (2 * m, 2 * s.index_head_dim)}
