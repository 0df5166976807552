"""Frozen configuration dataclasses.

`ModelConfig` is parsed from a Hugging Face checkpoint folder (config.json and, when present,
generation_config.json). The other configs hold the user's choices collected by EngineBuilder.
Everything here is plain data: validation errors name the offending setting so a wrong config
fails at `build()` and never halfway through a run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from dlengine.errors import ConfigError  # defined there (parallel/ep.py raises it too), public here
from dlengine.parallel.ep import DISPATCH_BACKENDS, PLACEMENTS
from dlengine.models.architectures import NESTED_TEXT_CONFIG, SUPPORTED_ARCHITECTURES


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


# cache(dtype=...) names of the FP8 KV cache (kernels/kv_quant.py); "fp8" is an alias of "fp8_e4m3"
FP8_KV_CACHE_NAMES = ("fp8_e4m3", "fp8", "float8_e4m3fn")


def parse_kv_cache_dtype(name: str | torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a KV cache is stored in: "auto" -> the model's activation dtype, "fp8_e4m3" (or
    "fp8") -> float8_e4m3fn with per-layer scales (docs/fp8_kv.md), else a float dtype name."""
    if isinstance(name, torch.dtype):
        if name in (torch.float8_e4m3fn, *set(_DTYPES.values())):
            return name
        raise ConfigError(f"KV cache dtype {name} is not supported; choose 'auto', 'fp8_e4m3' or one of "
                          f"{sorted(set(_DTYPES))}")
    key = str(name).lower().replace("torch.", "")
    if key == "auto":
        return model_dtype
    if key in FP8_KV_CACHE_NAMES:
        return torch.float8_e4m3fn
    if key not in _DTYPES:
        raise ConfigError(f"unknown KV cache dtype {name!r}; choose 'auto', 'fp8_e4m3' (alias 'fp8') or one of "
                          f"{sorted(set(_DTYPES))}")
    return _DTYPES[key]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[str(name).lower().replace("torch.", "")]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; choose one of {sorted(set(_DTYPES))}") from None


def _read_json_object(file: str) -> dict[str, Any]:
    """A checkpoint's JSON file as a dict; ConfigError naming the file when it is not one."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file} must hold a JSON object, found a {type(data).__name__}")
    return data


@dataclass(frozen=True)
class RopeConfig:
    """RoPE parameters normalised from either `rope_parameters` (transformers 5) or
    `rope_theta` + `rope_scaling` (older checkpoints)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    partial_rotary_factor: float = 1.0

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> "RopeConfig":
        params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        orig = params.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
        if rope_type in ("yarn", "llama3") and orig is None:
            orig = cfg.get("max_position_embeddings")
        factor = params.get("factor")
        if factor is None:
            if rope_type == "yarn" and orig:
                factor = cfg["max_position_embeddings"] / orig
            else:
                factor = 1.0
        return RopeConfig(
            rope_type=rope_type,
            theta=float(theta),
            factor=float(factor),
            original_max_position_embeddings=orig,
            attention_factor=params.get("attention_factor"),
            beta_fast=params.get("beta_fast"),
            beta_slow=params.get("beta_slow"),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            truncate=params.get("truncate", True),
            low_freq_factor=params.get("low_freq_factor"),
            high_freq_factor=params.get("high_freq_factor"),
            partial_rotary_factor=float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))),
        )


@dataclass(frozen=True)
class QuantizationConfig:
    """A checkpoint's `quantization_config`. Only DeepSeek-style block-scaled FP8 is understood:
    {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
    "activation_scheme": "dynamic"}; weights float8_e4m3fn with `<prefix>.weight_scale_inv`."""

    method: str
    weight_block_size: tuple[int, int]
    modules_to_not_convert: tuple[str, ...] = ()

    @staticmethod
    def from_hf(cfg: dict[str, Any], where: str) -> "QuantizationConfig | None":
        q = cfg.get("quantization_config")
        if not q:
            return None
        method = q.get("quant_method")
        if method != "fp8":
            raise ConfigError(f"{where}: quantization_config.quant_method={method!r} is not supported; dlengine "
                              "reads block-scaled FP8 checkpoints (quant_method 'fp8', DeepSeek-V3 / Kimi-K2 style)")
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ConfigError(f"{where}: FP8 fmt={fmt!r} is not supported (only 'e4m3')")
        scheme = q.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ConfigError(f"{where}: FP8 activation_scheme={scheme!r} is not supported (only 'dynamic')")
        block = q.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2
                and all(isinstance(b, int) and b > 0 for b in block)):
            raise ConfigError(f"{where}: FP8 weight_block_size={block!r} is not supported; per-block scales "
                              "[block_n, block_k] are needed (per-tensor FP8 is not read)")
        # scale_fmt "ue8m0" (DeepSeek-V3.1) only says the scales are powers of two; they load as float32 either way
        skip = tuple(q.get("modules_to_not_convert") or q.get("ignored_layers") or ())  # MiniMax: ignored_layers
        return QuantizationConfig("fp8", (int(block[0]), int(block[1])), skip)


def _text_model_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The text model's fields of a multimodal checkpoint (NESTED_TEXT_CONFIG) lifted to the top
    level, so the rest of the parse (and the model, through hf_config) reads one flat dict."""
    archs = cfg.get("architectures")
    text = cfg.get("text_config")
    if not (isinstance(archs, list) and archs and archs[0] in NESTED_TEXT_CONFIG and isinstance(text, dict)):
        return cfg
    # vision_config stays: a model with a vision tower (Qwen3-VL) builds it from there
    flat = {k: v for k, v in cfg.items() if k != "text_config"}
    flat.update(text)
    for key in ("architectures", "model_type", "tie_word_embeddings"):
        if key in cfg:
            flat[key] = cfg[key]
    return flat


@dataclass(frozen=True)
class ModelConfig:
    path: str
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope: RopeConfig
    torch_dtype: str
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    hf_config: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def quantization(self) -> QuantizationConfig | None:
        """The checkpoint's weight quantisation (None for plain bf16/fp16/fp32 weights)."""
        return QuantizationConfig.from_hf(self.hf_config, os.path.join(self.path, "config.json"))

    @property
    def uses_mla(self) -> bool:
        """Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): the KV cache holds a latent."""
        return bool(self.hf_config.get("kv_lora_rank"))

    @property
    def kv_cache_geometry(self) -> tuple[int, int, int]:
        """(heads, K head_dim, V head_dim) of one token's paged KV entry in one layer. GQA/MHA:
        (num_key_value_heads, head_dim, head_dim). MLA: one "head" holding the latent
        (kv_lora_rank normalised c_kv + qk_rope_head_dim rotated k_pe) in K, and no V."""
        if self.uses_mla:
            return 1, int(self.hf_config["kv_lora_rank"]) + int(self.hf_config.get("qk_rope_head_dim", 0) or 0), 0
        return self.num_key_value_heads, self.head_dim, self.head_dim

    @property
    def kv_bytes_per_token_per_layer_elem(self) -> int:
        """K and V elements per token per layer (dtype-independent)."""
        heads, k_dim, v_dim = self.kv_cache_geometry
        return heads * (k_dim + v_dim)

    @staticmethod
    def from_pretrained(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "ModelConfig":
        """Parse `path`/config.json (+ generation_config.json). `overrides` replace top-level
        config.json fields first (e.g. {"num_hidden_layers": 4} to benchmark a real-size model
        with a few of its layers)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ConfigError(
                f"model path {path!r} is not a directory; pass a Hugging Face checkpoint folder "
                "(config.json + *.safetensors + tokenizer.json) or a preset such as 'tiny-qwen3'"
            )
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ConfigError(f"{path!r} has no config.json; it does not look like a Hugging Face checkpoint")
        cfg = _read_json_object(cfg_file)
        cfg = _text_model_fields(cfg)
        for key, value in (overrides or {}).items():
            if key not in cfg:
                raise ConfigError(f"hf_overrides: {cfg_file} has no field {key!r} to override")
            if type(value) is not type(cfg[key]) and not (isinstance(cfg[key], (int, float)) and isinstance(value, (int, float))):
                raise ConfigError(f"hf_overrides: {key}={value!r} has type {type(value).__name__}, "
                                  f"config.json holds {type(cfg[key]).__name__}")
            cfg[key] = value
        archs = cfg.get("architectures") or []
        if not archs or not isinstance(archs, list):
            raise ConfigError(f"{cfg_file}: 'architectures' is missing; cannot tell which model class to build")
        arch = archs[0]
        # before any field is read: an unsupported family's config often lacks (or nests, as the
        # multimodal Qwen3-VL / Qwen3.5 do under "text_config") the fields parsed below
        if arch not in SUPPORTED_ARCHITECTURES:
            nested = " (its text-model fields sit under 'text_config')" if "text_config" in cfg else ""
            raise ConfigError(f"{cfg_file}: architecture {arch!r}{nested} is not supported yet; "
                              f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        gen_file = os.path.join(path, "generation_config.json")
        gen = _read_json_object(gen_file) if os.path.isfile(gen_file) else {}
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        try:
            eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            num_heads = cfg["num_attention_heads"]
            return ModelConfig(
                path=path,
                architecture=arch,
                model_type=cfg.get("model_type", ""),
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                # all-MoE families (Qwen3.5-MoE) have no dense MLP and no intermediate_size
                # (DeepSeek-V4 has n_routed_experts and only moe_intermediate_size)
                intermediate_size=cfg["intermediate_size"] if "intermediate_size" in cfg
                or not (cfg.get("num_experts") or cfg.get("model_type") == "deepseek_v4") else 0,
                num_hidden_layers=cfg["num_hidden_layers"],
                num_attention_heads=num_heads,
                num_key_value_heads=cfg.get("num_key_value_heads") or num_heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", False)),
                rope=RopeConfig.from_hf(cfg),
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
                eos_token_ids=eos_ids,
                bos_token_id=gen.get("bos_token_id", cfg.get("bos_token_id")),
                pad_token_id=gen.get("pad_token_id", cfg.get("pad_token_id")),
                hf_config=cfg,
            )
        except KeyError as e:
            nested = " (its text-model fields sit under 'text_config')" if "text_config" in cfg else ""
            raise ConfigError(f"{cfg_file}: this {arch!r} config{nested} lacks the field {e.args[0]!r}; "
                              "such a variant is not supported yet") from None
        except ConfigError:
            raise
        except (TypeError, ValueError, ArithmeticError) as e:
            raise ConfigError(f"{cfg_file}: a field has a value of the wrong kind for architecture {arch!r}: {e}") from None


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from memory (GPU) or a CPU budget
    prefix_caching: bool = True
    dtype: str = "auto"  # "auto" = the model's activation dtype; "fp8_e4m3" (alias "fp8"): FP8 KV
    memory_utilization: float = 0.9  # fraction of GPU memory the engine may take
    cpu_kv_cache_bytes: int = 512 << 20  # CPU budget when num_blocks is None

    def validate(self) -> None:
        bs = self.block_size
        if not isinstance(bs, int) or bs <= 0 or bs & (bs - 1):
            raise ConfigError(f"cache block_size must be a positive power of two, got {bs!r}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError(f"cache num_blocks must be positive, got {self.num_blocks}")
        if not 0.0 < self.memory_utilization <= 1.0:
            raise ConfigError(f"cache memory_utilization must be in (0, 1], got {self.memory_utilization}")
        parse_kv_cache_dtype(self.dtype, torch.float32)  # a clear error for an unknown name


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    chunked_prefill: bool = True
    # admission order / preemption victim (dlengine.engine.scheduler.SchedulerPolicy); None: FCFS
    policy: Any = None

    def validate(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len <= 0):
            raise ConfigError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        if self.policy is not None:
            missing = [m for m in ("admission_order", "preemption_victim") if not callable(getattr(self.policy, m, None))]
            if missing:
                raise ConfigError(f"scheduler policy {self.policy!r} lacks {missing} (see "
                                  "dlengine.engine.scheduler.SchedulerPolicy)")


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is spread over processes (docs/parallel.md). world size = tp x attention_dp.

    Supported layouts: tp=N (attention_dp=1, ffn_ep=1: MoE experts are tensor-parallel too);
    attention_dp=N with ffn_ep=N ("wide EP": experts partitioned, tokens sent by all-to-all) or
    ffn_ep=1 (replicas). tp > 1 together with attention_dp > 1, and EP inside a TP group, are not
    supported yet."""

    tp: int = 1
    attention_dp: int = 1
    ffn_ep: int = 1
    expert_placement: Any = "contiguous"  # a name or an ExpertPlacement (logical expert -> rank, slot): parallel/ep.py
    dispatch_backend: str = "auto"  # MoE token dispatch/combine: "auto", "all_to_all" (see parallel/ep.py)
    # seconds a build or a generate() of the spawned-worker front may take (and the collectives'
    # timeout) before every worker is stopped and TimeoutError raised; None: builds 900 s, no limit
    # on generate(), collectives 600 s
    timeout_s: float | None = None

    @property
    def world_size(self) -> int:
        return self.tp * self.attention_dp

    def validate(self) -> None:
        for name in ("tp", "attention_dp", "ffn_ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel {name} must be an integer >= 1, got {value!r}")
        tp, dp, ep = self.tp, self.attention_dp, self.ffn_ep
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ConfigError(f"parallel timeout_s must be positive seconds or None, got {self.timeout_s!r}")
        if tp > 1 and dp > 1:
            raise ConfigError(f"parallel tp={tp} with attention_dp={dp} is not supported yet; supported: "
                              "tp=N (attention_dp=1, ffn_ep=1) or attention_dp=N with ffn_ep=N or 1 (tp=1)")
        if ep not in (1, dp) or (ep > 1 and tp > 1):
            raise ConfigError(f"parallel ffn_ep={ep} is not supported with tp={tp}, attention_dp={dp}; expert "
                              "parallelism spans the attention-DP ranks: use ffn_ep=attention_dp (tp=1) or ffn_ep=1")
        if isinstance(self.expert_placement, str) and self.expert_placement not in PLACEMENTS:
            raise ConfigError(f"unknown expert_placement {self.expert_placement!r}; choose one of {sorted(PLACEMENTS)}")
        if self.dispatch_backend == "deep_ep":
            raise ConfigError("the DeepEP dispatch backend is not implemented in this version of dlengine; "
                              "use dispatch_backend='all_to_all' (or 'auto')")
        if self.dispatch_backend != "auto" and self.dispatch_backend not in DISPATCH_BACKENDS:
            raise ConfigError(f"unknown dispatch_backend {self.dispatch_backend!r}; choose 'auto' or one of "
                              f"{sorted(DISPATCH_BACKENDS)}")


ROLES = ("hybrid", "prefill", "decode", "encode")


@dataclass(frozen=True)
class Components:
    """User objects that replace a module of the engine (each follows its module's protocol;
    None: the built-in one). They travel to worker processes inside the EngineConfig, so they
    must be picklable for parallel engines.

    - attention: an AttentionBackend object (dlengine.kernels)
    - sampler: callable(logits, SamplingTensors) -> SamplerOutput (dlengine.engine.sampler.Sampler)
    - block_manager: callable(num_blocks, block_size, enable_prefix_caching) -> a BlockManager
    - kv_connector: callable(kv_cache, block_manager, config) -> a KVConnector (engine/seams.py)
    - speculator: a Speculator object (engine/seams.py), or callable(config) -> Speculator
    """

    attention: Any = None
    sampler: Any = None
    block_manager: Any = None
    kv_connector: Any = None
    speculator: Any = None


@dataclass(frozen=True)
class TransferConfig:
    """The KV transfer engine of a prefill or decode engine (EngineBuilder.transfer)."""

    backend: str = "dlslime"
    transport: str = "tcp"
    host: str = "127.0.0.1"
    port: int = 0
    engine_id: str | None = None
    pin_timeout_s: float = 60.0
    pull_timeout_s: float = 30.0
    queue_timeout_s: float = 60.0
    staging_blocks: int | None = None
    on_pull_failure: str = "fail"

    def __getitem__(self, name: str):  # the connectors read options by name
        return getattr(self, name)

    def get(self, name: str, default=None):
        return getattr(self, name, default)


@dataclass(frozen=True)
class EncoderCacheConfig:
    """Image and video embeddings between engines (encode-prefill-decode, EngineBuilder.encoder_cache):
    an encoder engine keeps each request's embeddings in `staging_bytes` of registered host
    memory until they are pulled (or its transfer(pin_timeout_s=...) passes); an engine given
    ec_transfer_params pulls them into a receive region of the same size, failing after
    `pull_timeout_s`.
    `on_pull_failure`: "fail" refuses the request with the reason; "local" encodes its images
    and videos here instead (the engine has the vision weights).
    `pull_mode`: "sync" pulls inside add_request (a failure raises there); "async" starts the
    pull there and holds the request out of the scheduler until it lands, advancing it every
    step, so the engine keeps stepping its other requests meanwhile (a failure ends the request
    with finish_reason "error"). Servers use "async"."""

    staging_bytes: int = 256 * 2**20
    pull_timeout_s: float = 30.0
    on_pull_failure: str = "fail"
    pull_mode: str = "sync"

    def validate(self) -> None:
        if not (isinstance(self.staging_bytes, int) and self.staging_bytes >= 1 << 16):
            raise ConfigError(f"encoder_cache staging_bytes must be an integer >= 65536, got {self.staging_bytes!r}")
        if not self.pull_timeout_s > 0:
            raise ConfigError(f"encoder_cache pull_timeout_s must be positive, got {self.pull_timeout_s!r}")
        if self.on_pull_failure not in ("fail", "local"):
            raise ConfigError(f"encoder_cache on_pull_failure must be 'fail' or 'local', got {self.on_pull_failure!r}")
        if self.pull_mode not in ("sync", "async"):
            raise ConfigError(f"encoder_cache pull_mode must be 'sync' or 'async', got {self.pull_mode!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that defines an engine: what `EngineBuilder.config()` returns and what worker
    processes receive to build their rank's engine."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    dtype: torch.dtype
    device: torch.device
    role: str
    attention_backend: str
    load_format: str
    seed: int
    max_model_len: int
    async_scheduling: bool = False
    quantization: str = "none"  # resolved weight mode: "none", "fp8" or "dequant" (EngineBuilder.quantization)
    # MLA decode kernel on the triton backend, resolved: "triton", "gluon", "flashinfer", or "auto"
    # (per call: gluon where it applies, else triton); see kernels/mla/decode_choice.py
    mla_decode: str = "auto"
    # GQA prefill / extend kernel on the triton backend, resolved: "triton" (portable) or "hopper";
    # see kernels/attention/prefill_choice.py
    prefill_attention: str = "triton"
    cuda_graphs: bool | None = None  # None: on where the device and backend allow
    cuda_graph_max_batch: int | None = None
    load_num_layers: int | None = None  # read only the first N layers of the checkpoint (hf_overrides)
    transfer: TransferConfig | None = None  # prefill / decode / encode roles
    encoder_cache: EncoderCacheConfig = field(default_factory=EncoderCacheConfig)  # EPD image and video embeddings
    control_plane: dict | None = None  # dlslime-ctrl registration of a prefill / decode engine
    speculative_tokens: int = 0  # drafts per step when a speculator is set
    # benchmarking: keep each draft with this probability, whatever it is (outputs are then not
    # the model's; dlengine/speculative/acceptance.py); None: keep drafts equal to the target's
    speculative_forced_acceptance: float | None = None
    components: Components = field(default_factory=Components)

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """What the KV cache stores: cache.dtype resolved ("auto": the model dtype)."""
        return parse_kv_cache_dtype(self.cache.dtype, self.dtype)
