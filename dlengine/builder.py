"""EngineBuilder: collect choices fluently, validate them all into an `EngineConfig`, build.

Every check that can fail does so in `config()`, with a message naming the setting, so a wrong
config never fails halfway through a run. The config describes the whole engine (user objects
included); `dlengine.assemble.build_core(config)` turns it into an EngineCore, in this process or
in each worker of a parallel engine.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from dlengine.config import (
    ROLES,
    CacheConfig,
    Components,
    ConfigError,
    EncoderCacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    TransferConfig,
    parse_dtype,
    parse_kv_cache_dtype,
)
from dlengine.engine.engine import Engine
from dlengine.models.registry import get_model_class

LOAD_FORMATS = ("auto", "safetensors", "dummy")
logger = logging.getLogger("dlengine")


CONFIG_PRESETS_DIR = os.path.join(os.path.dirname(__file__), "presets")


def config_presets() -> list[str]:
    """Names of the shipped config-only presets (real model shapes, for load_format="dummy")."""
    return sorted(d for d in os.listdir(CONFIG_PRESETS_DIR) if os.path.isdir(os.path.join(CONFIG_PRESETS_DIR, d)))


def resolve_model_path(model: str | os.PathLike) -> str:
    """A checkpoint folder, a built-in tiny model ("tiny-qwen3", built on first use), or a
    config-only preset of a released model ("qwen3-0.6b", "qwen3-8b": dummy weights only)."""
    model = os.fspath(model)
    from dlengine.testing import PRESETS, tiny_checkpoint

    if model in PRESETS:
        return tiny_checkpoint(PRESETS[model])
    if not os.path.exists(model) and model in config_presets():
        return os.path.join(CONFIG_PRESETS_DIR, model)
    return model


class EngineBuilder:
    """Assemble an Engine from a checkpoint and your choices.

    >>> from dlengine import EngineBuilder, SamplingParams
    >>> engine = (EngineBuilder("tiny-qwen3")
    ...           .dtype("float32")
    ...           .cache(block_size=16, prefix_caching=True)
    ...           .scheduler(max_num_batched_tokens=256, max_num_seqs=8)
    ...           .build())
    >>> outs = engine.generate(["a prompt", [12, 7, 99]], SamplingParams(max_tokens=8, temperature=0.0))
    >>> [len(o.token_ids) for o in outs]
    [8, 8]
    """

    def __init__(self, model: str | os.PathLike) -> None:
        self._model = model
        self._dtype: str | torch.dtype | None = None
        self._device: str | None = None
        self._cache: dict[str, Any] = {}
        self._scheduler: dict[str, Any] = {}
        self._parallel: dict[str, Any] = {}
        self._role = "hybrid"
        self._attention = "auto"
        self._mla_decode = "auto"
        self._prefill_attention = "auto"
        self._load_format = "auto"
        self._seed = 0
        self._max_model_len: int | None = None
        self._cuda_graphs: bool | None = None  # None: on where the device and backend allow
        self._cuda_graph_max_batch: int | None = None
        self._async_scheduling: bool | None = None  # None: on for CUDA
        self._hf_overrides: dict[str, Any] = {}
        self._quantization = "auto"
        self._transfer: dict[str, Any] | None = None
        self._control_plane: dict[str, Any] | None = None
        self._encoder_cache: dict[str, Any] = {}
        self._components: dict[str, Any] = {}
        self._speculative_tokens = 0
        self._spec_forced_acceptance: float | None = None

    # each method records a choice and returns self so calls chain
    def dtype(self, dtype: str | torch.dtype) -> "EngineBuilder":
        self._dtype = dtype
        return self

    def device(self, device: str) -> "EngineBuilder":
        self._device = device
        return self

    def cache(self, **options: Any) -> "EngineBuilder":
        """block_size, num_blocks, prefix_caching, dtype, memory_utilization, cpu_kv_cache_bytes.
        block_size defaults to 16, or to 64 for MLA models whose decode runs on the Hopper Gluon
        kernel (its fastest page). dtype: "auto" (the model's), a float dtype name, or
        "fp8_e4m3" (alias "fp8"): float8_e4m3fn KV with a scale per layer and tensor, about twice
        the tokens in the same memory (docs/fp8_kv.md)."""
        self._cache.update(options)
        return self

    def scheduler(self, **options: Any) -> "EngineBuilder":
        """max_num_batched_tokens, max_num_seqs, max_model_len, chunked_prefill, and `policy`: an
        object deciding admission order and preemption victims
        (dlengine.engine.scheduler.SchedulerPolicy; default first come, first served).

        >>> from dlengine import EngineBuilder, SamplingParams
        >>> class ShortestFirst:  # admit the shortest waiting prompt first
        ...     name = "shortest-first"
        ...     def admission_order(self, waiting):
        ...         return sorted(waiting, key=lambda r: r.num_tokens)
        ...     def preemption_victim(self, running):
        ...         return running[-1]
        >>> engine = EngineBuilder("tiny-qwen3").scheduler(policy=ShortestFirst()).build()
        >>> engine.describe()["scheduler_policy"]
        'shortest-first'
        """
        self._scheduler.update(options)
        return self

    def sampler(self, sampler: Any) -> "EngineBuilder":
        """Replace the sampler: a callable (logits [rows, vocab], SamplingTensors) -> SamplerOutput,
        like dlengine.engine.sampler.Sampler."""
        self._components["sampler"] = sampler
        return self

    def block_manager(self, factory: Any) -> "EngineBuilder":
        """Replace the block manager: a callable (num_blocks, block_size, enable_prefix_caching)
        -> an object with BlockManager's methods (e.g. a subclass of
        dlengine.cache.block_manager.BlockManager). The pool size is only known after memory
        planning, hence a factory rather than an object."""
        self._components["block_manager"] = factory
        return self

    def kv_connector(self, factory: Any) -> "EngineBuilder":
        """A KV connector of your own (dlengine.engine.seams.KVConnector): a callable
        (kv_cache, block_manager, config) -> connector. `role(...)` + `transfer(...)` build the
        shipped DLSlime connectors instead."""
        self._components["kv_connector"] = factory
        return self

    def speculative(self, method: Any, num_tokens: int = 1,
                    forced_acceptance: float | None = None) -> "EngineBuilder":
        """Speculative decoding: "mtp" (the checkpoint's multi-token-prediction layer, DeepSeek-V3 /
        Kimi-K2 checkpoints with num_nextn_predict_layers >= 1), "ngram" (prompt lookup, no
        weights) (both in dlengine.speculative) or a proposer object (dlengine.engine.seams.Speculator)
        drafting up to `num_tokens` tokens a step; the engine verifies them in one forward
        (docs/speculative.md).

        `forced_acceptance=p` (benchmarking only) keeps each draft with probability p in [0, 1]
        instead of when it equals the target's token, stopping at the first rejection (seeded by
        `seed(...)`): the verify step's cost at a chosen acceptance, e.g. on dummy weights whose
        drafts are never right. The output is then NOT the model's; describe(), the repr and
        `stats` say "forced acceptance p" (docs/speculative.md, "Benchmarking at a fixed
        acceptance rate").

        >>> from dlengine import EngineBuilder, SamplingParams
        >>> engine = EngineBuilder("tiny-qwen3").speculative("ngram", num_tokens=3).build()
        >>> [out] = engine.generate([[5, 6, 7, 5, 6, 7, 5, 6]], SamplingParams(max_tokens=16, temperature=0.0))
        >>> engine.stats.num_accepted_tokens > 0, engine.stats.mean_accepted_length > 1
        (True, True)
        """
        self._components["speculator"] = method
        self._speculative_tokens = num_tokens
        self._spec_forced_acceptance = forced_acceptance
        return self

    def parallel(self, **options: Any) -> "EngineBuilder":
        """tp, attention_dp, ffn_ep, expert_placement, dispatch_backend (docs/parallel.md).

        With more than one rank, `build()` run in a plain process spawns one worker process per
        rank and returns a front (`dlengine.parallel.ParallelEngine`) whose `generate()` works
        like the single-process engine's; under `torchrun` (or inside `dlengine.parallel.launch`)
        it builds this rank's engine instead (`dlengine.parallel.DistributedEngine`).

        >>> from dlengine import EngineBuilder, SamplingParams
        >>> with EngineBuilder("tiny-qwen3").parallel(tp=2).build() as engine:   # 2 worker processes
        ...     outs = engine.generate(["a prompt", [12, 7, 99]], SamplingParams(max_tokens=8, temperature=0.0))
        >>> [len(o.token_ids) for o in outs]
        [8, 8]
        """
        self._parallel.update(options)
        return self

    def role(self, role: str) -> "EngineBuilder":
        """"hybrid" (default: prefill and decode here), "prefill" or "decode" (PD disaggregation:
        needs `transfer(...)`; see docs/disaggregation.md), or "encode": an encoder engine of a
        vision model (only its vision tower, no KV cache; `build()` returns an EncoderEngine that
        hands image and video embeddings to prefill engines, see docs/vision.md)."""
        self._role = role
        return self

    def encoder_cache(self, *, staging_bytes: int | None = None, pull_timeout_s: float | None = None,
                      on_pull_failure: str | None = None, pull_mode: str | None = None) -> "EngineBuilder":
        """Image and video embeddings between engines (encode-prefill-decode). An encoder engine keeps each
        request's embeddings in `staging_bytes` of registered host memory (default 256 MiB) until
        the prefill side pulls them or its transfer(pin_timeout_s=...) passes; an engine given ec_transfer_params
        pulls them into a receive region of that size and fails after `pull_timeout_s`.
        `on_pull_failure`: "fail" (default) refuses the request naming the encoder; "local" encodes
        the images and videos here instead. `pull_mode`: "sync" (default) pulls inside add_request; "async"
        pulls while the engine steps its other requests (docs/vision.md, EPD)."""
        given = dict(staging_bytes=staging_bytes, pull_timeout_s=pull_timeout_s, on_pull_failure=on_pull_failure,
                     pull_mode=pull_mode)
        self._encoder_cache.update({k: v for k, v in given.items() if v is not None})
        return self

    def transfer(self, backend: str = "dlslime", *, transport: str = "tcp", host: str = "127.0.0.1", port: int = 0,
                 engine_id: str | None = None, pin_timeout_s: float = 60.0, pull_timeout_s: float = 30.0,
                 queue_timeout_s: float = 60.0, staging_blocks: int | None = None,
                 on_pull_failure: str = "fail") -> "EngineBuilder":
        """The KV transfer engine of a prefill or decode engine.

        backend "dlslime" (pip install 'dlengine[dlslime]'); transport "tcp" (any machine) or
        "rdma". backend "cuda_ipc": both engines on one host with CUDA caches; the KV moves
        GPU to GPU by CUDA IPC (staging on the GPU, no host copy), the small control records over
        DLSlime tcp (docs/disaggregation.md). The engine listens on host:port (0: a free port). A prefill engine frees a
        handed-off request's blocks when the decode side has pulled them, or after
        `pin_timeout_s`; a decode engine fails a pull after `pull_timeout_s` and a request that
        waited `queue_timeout_s` for free blocks. CUDA caches go through `staging_blocks` pinned
        host blocks (default min(num_blocks, 1024)). `on_pull_failure` (decode engines): "fail"
        ends a request whose KV cannot be pulled with the reason; "recompute" computes its prompt
        here instead, like a request preempted by recompute (same tokens, slower first step).

        >>> from dlengine import EngineBuilder, SamplingParams
        >>> prefill = EngineBuilder("tiny-qwen3").role("prefill").transfer("dlslime", transport="tcp").build()
        >>> decode = EngineBuilder("tiny-qwen3").role("decode").transfer("dlslime", transport="tcp").build()
        >>> greedy = SamplingParams(max_tokens=6, temperature=0.0)
        >>> [p] = prefill.generate([[5, 6, 7, 8]], greedy)
        >>> p.finish_reason, len(p.token_ids), sorted(p.kv_transfer_params)[:3]
        ('kv_transfer', 1, ['block_ids', 'endpoint', 'engine_id'])
        >>> rid = decode.add_request([5, 6, 7, 8], greedy, kv_transfer_params=p.kv_transfer_params)
        >>> while decode.has_unfinished_requests():
        ...     outs = decode.step(); _ = prefill.step()
        >>> len(outs[-1].token_ids), outs[-1].token_ids[0] == p.token_ids[0]
        (6, True)
        >>> prefill.close(); decode.close()
        """
        self._transfer = dict(backend=backend, transport=transport, host=host, port=port, engine_id=engine_id,
                              pin_timeout_s=pin_timeout_s, pull_timeout_s=pull_timeout_s,
                              queue_timeout_s=queue_timeout_s, staging_blocks=staging_blocks,
                              on_pull_failure=on_pull_failure)

        return self

    def control_plane(self, url: str, *, scope: str | None = None, heartbeat_s: float = 2.0) -> "EngineBuilder":
        """Register the engine (role, engine id, transfer address) with a dlslime-ctrl server at
        `url` and heartbeat every `heartbeat_s`; see dlengine.disagg.discovery."""
        self._control_plane = dict(url=url, scope=scope, heartbeat_s=heartbeat_s)
        return self

    def attention(self, backend: Any) -> "EngineBuilder":
        """Attention backend: "auto", one of dlengine.kernels.selection.available_attention_backends(),
        or an object following the AttentionBackend protocol (its `name` shows in describe())."""
        if isinstance(backend, str):
            self._attention = backend
        else:
            self._components["attention"] = backend
            self._attention = getattr(backend, "name", type(backend).__name__)
        return self

    def mla_decode(self, kernel: str) -> "EngineBuilder":
        """Decode kernel of multi-head latent attention (DeepSeek-V3, Kimi-K2) on the triton
        backend: "auto" (default: on Hopper with DeepSeek's latent dims on a 16-bit cache our Gluon
        kernel, elsewhere FlashInfer's MLA kernel when flashinfer imports and applies, else our
        Triton kernel), "flashinfer", "gluon" or "triton". All of them run in CUDA graphs;
        prefills and extends always run our kernels. See docs/mla.md."""
        self._mla_decode = kernel
        return self

    def prefill_attention(self, kernel: str) -> "EngineBuilder":
        """GQA prefill / extend kernel on the triton backend: "auto" (default; the portable Triton
        kernel for now), "triton" (portable: any GPU, any page size, FP8 caches) or "hopper" (sm_90:
        the step's own keys read by TMA, only the cached prefix through the block table; a
        ConfigError on other GPUs, other backends and FP8 caches). Decode rows and CUDA-graph verify
        steps run the same kernels either way. See kernels/attention/prefill_choice.py."""
        self._prefill_attention = kernel
        return self

    def load_format(self, fmt: str) -> "EngineBuilder":
        """"auto"/"safetensors" read the checkpoint; "dummy" makes random weights of the real size."""
        self._load_format = fmt
        return self

    def seed(self, seed: int) -> "EngineBuilder":
        self._seed = seed
        return self

    def cuda_graphs(self, enabled: bool = True, max_batch: int | None = None) -> "EngineBuilder":
        """Capture decode steps as CUDA graphs for batch sizes up to `max_batch` (default
        min(max_num_seqs, 512)), and with speculative(...) its verify steps too (1 + num_tokens
        tokens per request, docs/speculative.md). On by default on CUDA with a capturable
        attention backend."""
        self._cuda_graphs = enabled
        self._cuda_graph_max_batch = max_batch
        return self

    def async_scheduling(self, enabled: bool = True) -> "EngineBuilder":
        """Schedule and prepare step N+1 on the CPU while step N runs on the device (default on
        CUDA). Outputs are identical; `step()` then returns each step's outputs one call later."""
        self._async_scheduling = enabled
        return self

    def hf_overrides(self, **fields: Any) -> "EngineBuilder":
        """Replace top-level config.json fields before the model is built, e.g.
        `hf_overrides(num_hidden_layers=4)` to run a real-size model with its first 4 layers (with
        dummy weights, or with a checkpoint whose later layers are then skipped unread). A field
        config.json does not have, or a value of another type, is a ConfigError."""
        self._hf_overrides.update(fields)
        return self

    def quantization(self, mode: str) -> "EngineBuilder":
        """How to run a quantised (block-scaled FP8) checkpoint: "fp8" keeps FP8 weights and runs
        FP8 GEMMs (Triton/DeepGEMM on CUDA; the torch reference on CPU, slow), "dequant" converts the
        weights to the model dtype at load, "auto" (default) is "fp8" on GPUs with FP8 tensor cores
        and "dequant" elsewhere. Ignored for unquantised checkpoints, except that "fp8" is an error."""
        self._quantization = mode
        return self

    def max_model_len(self, n: int) -> "EngineBuilder":
        self._max_model_len = n
        return self

    # ------------------------------------------------------------------ build
    def config(self) -> EngineConfig:
        """Validate every choice and return the EngineConfig that describes the engine (raises
        ConfigError naming the first bad setting). `build()` builds from it."""
        path = resolve_model_path(self._model)
        model = ModelConfig.from_pretrained(path, self._hf_overrides)
        get_model_class(model)  # fail early on an unknown architecture

        def make(cls, options, what):
            try:
                cfg = cls(**options)
            except TypeError as e:
                raise ConfigError(f"bad {what} option: {e}") from None
            cfg.validate()
            return cfg

        cache = make(CacheConfig, self._cache, "cache")
        sched = make(SchedulerConfig, self._scheduler, "scheduler")
        parallel = make(ParallelConfig, self._parallel, "parallel")
        if self._role not in ROLES:
            raise ConfigError(f"unknown role {self._role!r}; choose one of {ROLES}")
        if self._role != "hybrid" and self._transfer is None:
            what = "a transfer engine for its embeddings" if self._role == "encode" else "a KV transfer engine"
            raise ConfigError(
                f"role {self._role!r} needs {what}: add .transfer('dlslime', transport='tcp') "
                "(transport='rdma' is not wired yet, see docs/disaggregation.md)"
            )
        if self._role != "hybrid" and parallel.attention_dp > 1:
            raise ConfigError(f"role {self._role!r} with attention_dp={parallel.attention_dp} is not supported yet: "
                              "a decode request would need routing to the DP rank holding its blocks; prefill and "
                              "decode engines run with tp=N")
        if self._role == "decode" and parallel.tp > 1:
            self._check_tp_decode(model, parallel.tp)
        encoder_cache = make(EncoderCacheConfig, self._encoder_cache, "encoder_cache")
        if self._role == "encode":
            self._check_encode_role(model, parallel)
        if self._role == "hybrid" and self._components.get("kv_connector") is None and self._transfer is not None:
            raise ConfigError("transfer(...) needs role('prefill') or role('decode')")
        if self._transfer is not None:
            from dlengine.parallel.transfer import BACKENDS

            if self._transfer["backend"] not in BACKENDS:
                raise ConfigError(f"unknown KV transfer backend {self._transfer['backend']!r}; choose one of {BACKENDS}")
            for name in ("pin_timeout_s", "pull_timeout_s", "queue_timeout_s"):
                if not self._transfer[name] > 0:
                    raise ConfigError(f"transfer {name} must be positive, got {self._transfer[name]}")
            if self._transfer["on_pull_failure"] not in ("fail", "recompute"):
                raise ConfigError(f"transfer on_pull_failure must be 'fail' or 'recompute', "
                                  f"got {self._transfer['on_pull_failure']!r}")
        if self._load_format not in LOAD_FORMATS:
            raise ConfigError(f"unknown load_format {self._load_format!r}; choose one of {LOAD_FORMATS}")

        attention = self._attention
        # MLA attends over a latent cache: the torch reference, the Triton kernels
        # (kernels/triton_mla.py) and FlashInfer's MLA kernel, which is built for DeepSeek-V3's
        # latent dims only
        if model.uses_mla and attention == "flashinfer":
            dims = (model.hf_config.get("kv_lora_rank"), model.hf_config.get("qk_rope_head_dim"))
            if dims != (512, 64):
                raise ConfigError(
                    f"attention backend 'flashinfer' runs multi-head latent attention (MLA) only with "
                    f"kv_lora_rank 512 and qk_rope_head_dim 64, not {dims[0]} and {dims[1]}; use attention('triton'), "
                    "attention('torch') or attention('auto')"
                )

        device = torch.device(self._device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self._transfer is not None and self._transfer["backend"] == "cuda_ipc" and device.type != "cuda":
            raise ConfigError(f"transfer('cuda_ipc') moves KV between GPU caches of one host; this engine runs on "
                              f"{device}: use transfer('dlslime') for CPU engines")
        if parallel.ffn_ep > 1 and self._cuda_graphs:
            # expert-parallel dispatch sizes its all-to-all from routing counts read on the host
            raise ConfigError("cuda_graphs(True) cannot capture expert-parallel MoE (parallel(ffn_ep>1)): the "
                              "all-to-all split sizes are read on the host every step; use cuda_graphs(False)")
        speculator = self._components.get("speculator")
        if self._spec_forced_acceptance is not None:
            from dlengine.speculative.acceptance import check_forced_rate

            if speculator is None:
                raise ConfigError("speculative(forced_acceptance=...) needs a speculator to force: pass a method "
                                  "('mtp', 'ngram') or a proposer object")
            check_forced_rate(self._spec_forced_acceptance)
        if speculator is not None:
            if not (isinstance(self._speculative_tokens, int) and self._speculative_tokens >= 1):
                raise ConfigError(f"speculative num_tokens must be an integer >= 1, got {self._speculative_tokens!r}")
            if isinstance(speculator, str):
                if speculator == "ngram":
                    from dlengine.speculative import NgramProposer

                    speculator = self._components["speculator"] = NgramProposer(self._speculative_tokens)
                elif speculator == "mtp":
                    from dlengine.speculative.mtp import MTPFactory, check_mtp_supported

                    check_mtp_supported(model)
                    speculator = self._components["speculator"] = MTPFactory(self._speculative_tokens)
                else:
                    raise ConfigError(f"unknown speculative method {speculator!r}; choose 'mtp', 'ngram' or pass a "
                                      "proposer object (dlengine.engine.seams.Speculator)")
            if self._async_scheduling:
                raise ConfigError("async_scheduling(True) with speculative decoding: a step's verified tokens are "
                                  "needed before the next proposal; speculative engines step synchronously")
        if self._components.get("attention") is not None and not all(
                callable(getattr(self._components["attention"], m, None)) for m in ("write_kv", "attend")):
            raise ConfigError(f"attention backend object {self._components['attention']!r} lacks write_kv/attend "
                              "(see dlengine.kernels.attention.backend.AttentionBackend)")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device")
        if self._dtype is not None:
            dtype = parse_dtype(self._dtype)
        elif device.type == "cpu":
            dtype = torch.float32
        else:
            dtype = parse_dtype(model.torch_dtype) if model.torch_dtype in ("bfloat16", "float16", "float32") else torch.bfloat16

        from dlengine.kernels.attention.prefill_choice import resolve_prefill_attention
        from dlengine.kernels.mla.decode_choice import preferred_block_size, resolve_mla_decode
        from dlengine.kernels.selection import attention_backend_name

        kv_dtype = parse_kv_cache_dtype(cache.dtype, dtype)  # what the KV cache stores (FP8 or a float dtype)
        mla_decode = resolve_mla_decode(self._mla_decode, model, attention if isinstance(attention, str) else "custom",
                                        device, kv_dtype)
        if self._components.get("attention") is not None:
            backend_name = "custom"
        else:  # (names are checked here only for "hopper": other choices do not depend on the backend)
            backend_name = attention_backend_name(attention, device) if self._prefill_attention == "hopper" else attention
        prefill_attention = resolve_prefill_attention(self._prefill_attention, backend_name, device, kv_dtype)
        if "block_size" not in self._cache and cache.dtype == "auto":
            block_size = preferred_block_size(mla_decode, model, attention, device, kv_dtype)
            if block_size is not None:  # MLA decode on the Gluon kernel: its fastest page size
                logger.info("KV block size %d: the Gluon MLA decode kernel's fastest page (cache(block_size=...) "
                            "overrides)", block_size)
                cache = dataclasses.replace(cache, block_size=block_size)
        quantization = self._resolve_quantization(model, device)
        if self._cuda_graphs and device.type != "cuda":
            raise ConfigError("cuda_graphs(True) needs a CUDA device")

        max_model_len = self._max_model_len or sched.max_model_len or model.max_position_embeddings
        if max_model_len > model.max_position_embeddings:
            raise ConfigError(
                f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
                f"{model.max_position_embeddings}"
            )
        if not sched.chunked_prefill and sched.max_num_batched_tokens < max_model_len:
            raise ConfigError(
                f"without chunked prefill a whole prompt must fit in one step: max_num_batched_tokens="
                f"{sched.max_num_batched_tokens} < max_model_len={max_model_len}"
            )
        return EngineConfig(
            model=model, cache=cache, scheduler=sched, parallel=parallel, dtype=dtype, device=device,
            role=self._role, attention_backend=attention, load_format=self._load_format,
            seed=self._seed, max_model_len=max_model_len,
            async_scheduling=(device.type == "cuda" and speculator is None if self._async_scheduling is None
                              else self._async_scheduling),
            quantization=quantization, mla_decode=mla_decode, prefill_attention=prefill_attention,
            cuda_graphs=self._cuda_graphs, cuda_graph_max_batch=self._cuda_graph_max_batch,
            load_num_layers=self._hf_overrides.get("num_hidden_layers"),
            transfer=TransferConfig(**self._transfer) if self._transfer is not None else None,
            control_plane=self._control_plane, speculative_tokens=self._speculative_tokens,
            speculative_forced_acceptance=(None if self._spec_forced_acceptance is None
                                           else float(self._spec_forced_acceptance)),
            components=Components(**self._components), encoder_cache=encoder_cache,
        )

    def _check_encode_role(self, model: ModelConfig, parallel) -> None:
        from dlengine.multimodal.processor import VISION_ARCHITECTURES

        if model.architecture not in VISION_ARCHITECTURES:
            raise ConfigError(f"role 'encode' runs a vision tower; {model.architecture} has none (vision models: "
                              f"{', '.join(VISION_ARCHITECTURES)})")
        if parallel.world_size > 1:
            raise ConfigError(f"role 'encode' runs on one device (its vision tower is replicated, not sharded); got "
                              f"parallel world size {parallel.world_size}: start one encoder engine per device")
        if self._transfer["backend"] != "dlslime":
            raise ConfigError(f"role 'encode' hands embeddings off through host memory over DLSlime: use "
                              f"transfer('dlslime'), not {self._transfer['backend']!r}")
        if self._components.get("speculator") is not None or self._components.get("kv_connector") is not None:
            raise ConfigError("role 'encode' has no decoder: speculative(...) and kv_connector(...) do not apply")

    @staticmethod
    def _check_tp_decode(model: ModelConfig, tp: int) -> None:
        """A tensor-parallel decode rank pulls its own kv heads from whichever prefill rank(s) hold
        them (docs/disaggregation.md); what else a model caches must be whole on every rank."""
        from dlengine.cache.specs import cache_specs_for

        specs = cache_specs_for(model, torch.float32, tp, 0, get_model_class(model))  # refuses models without tp
        states = [s.describe() for s in specs if not s.paged]
        if states:
            raise ConfigError(f"role 'decode' with tp={tp} is not supported for {model.architecture}: it keeps a "
                              f"per-sequence recurrent state ({', '.join(states)}) that a decode rank would need "
                              "split by its heads out of the prefill engine's; run its decode engines with tp=1")
        paged = [s for s in specs if s.paged]
        if len(paged) > 1 and any(getattr(s, "total_kv_heads", 0) > getattr(s, "num_kv_heads", 0) for s in paged):
            raise ConfigError(f"role 'decode' with tp={tp} is not supported for {model.architecture}: its cache keeps "
                              f"paged groups beside the kv heads it splits ({', '.join(s.describe() for s in paged)}); "
                              "run its decode engines with tp=1")

    _make_config = config  # the name earlier versions used

    def _resolve_quantization(self, model: ModelConfig, device: torch.device) -> str:
        from dlengine.models.layers.fp8_linear import resolve_fp8_mode

        quant = model.quantization  # parses (and rejects unknown methods) when present
        mode = resolve_fp8_mode(self._quantization, device, quant)  # validates the name too
        if quant is None:
            if self._quantization == "fp8":
                raise ConfigError(f"quantization('fp8') needs an FP8 checkpoint; {model.path} has no "
                                  "quantization_config (online quantisation is not supported)")
            return "none"
        if self._load_format == "dummy":
            if self._quantization == "fp8":
                raise ConfigError("load_format('dummy') makes random weights in the model dtype; it cannot be "
                                  "combined with quantization('fp8')")
            return "none"  # random weights: nothing to dequantise
        return mode

    def build(self) -> Engine:
        """Build the engine: this process's (an `Engine`), or for parallel(...) with more than one
        rank a front over spawned workers (`ParallelEngine`), or this rank's engine under
        torchrun (`DistributedEngine`). All three have the same API."""
        cfg = self.config()
        if cfg.role == "encode":
            from dlengine.disagg.encoder import build_encoder_engine

            return build_encoder_engine(cfg)
        if cfg.parallel.world_size > 1:
            from dlengine.parallel.front import build_parallel_engine

            return build_parallel_engine(cfg)
        from dlengine.assemble import build_engine

        return build_engine(cfg)
