"""EngineBuilder: collect choices fluently, validate them all at `build()`, assemble an Engine.

Every check that can fail does so here, with a message naming the setting, so a wrong config
never fails halfway through a run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from dlengine.cache.block_manager import BlockManager
from dlengine.cache.kv_cache import KVCache
from dlengine.config import (
    ROLES,
    CacheConfig,
    ConfigError,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    parse_dtype,
)
from dlengine.engine.engine import Engine
from dlengine.engine.memory import plan_kv_cache
from dlengine.engine.runner import ModelRunner
from dlengine.engine.sampler import Sampler
from dlengine.engine.scheduler import Scheduler
from dlengine.kernels.selection import kernel_scope, resolve_kernels
from dlengine.models.loader import init_dummy_weights, load_weights, run_post_load_hooks
from dlengine.models.registry import get_model_class
from dlengine.tokenizer import load_tokenizer

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
        kernel (its fastest page)."""
        self._cache.update(options)
        return self

    def scheduler(self, **options: Any) -> "EngineBuilder":
        """max_num_batched_tokens, max_num_seqs, max_model_len, chunked_prefill."""
        self._scheduler.update(options)
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
        needs `transfer(...)`; see docs/disaggregation.md)."""
        self._role = role
        return self

    def transfer(self, backend: str = "dlslime", *, transport: str = "tcp", host: str = "127.0.0.1", port: int = 0,
                 engine_id: str | None = None, pin_timeout_s: float = 60.0, pull_timeout_s: float = 30.0,
                 queue_timeout_s: float = 60.0, staging_blocks: int | None = None,
                 on_pull_failure: str = "fail") -> "EngineBuilder":
        """The KV transfer engine of a prefill or decode engine.

        backend "dlslime" (pip install 'dlengine[dlslime]'); transport "tcp" (any machine) or
        "rdma". The engine listens on host:port (0: a free port). A prefill engine frees a
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

    def attention(self, backend: str) -> "EngineBuilder":
        """Attention backend: "auto", one of dlengine.kernels.selection.available_attention_backends(),
        or an object following dlengine.kernels.attention.backend.AttentionBackend. "torch" runs the
        pure torch reference everywhere (the fused ops too); see kernels/selection.py."""
        self._attention = backend
        return self

    def mla_decode(self, kernel: str) -> "EngineBuilder":
        """Decode kernel of multi-head latent attention (DeepSeek-V3, Kimi-K2) on the triton
        backend: "auto" (default: on Hopper with DeepSeek's latent dims on a 16-bit cache our Gluon
        kernel, elsewhere FlashInfer's MLA kernel when flashinfer imports and applies, else our
        Triton kernel), "flashinfer", "gluon" or "triton". All of them run in CUDA graphs;
        prefills and extends always run our kernels. See docs/mla.md."""
        self._mla_decode = kernel
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
        min(max_num_seqs, 512)). On by default on CUDA with a capturable attention backend."""
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
    def _make_config(self) -> EngineConfig:
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
            raise ConfigError(
                f"role {self._role!r} needs a KV transfer engine: add .transfer('dlslime', transport='tcp') "
                "(transport='rdma' is not wired yet, see docs/disaggregation.md)"
            )
        if self._role != "hybrid" and parallel.world_size > 1:
            raise ConfigError(f"role {self._role!r} with parallel(...) (world size {parallel.world_size}) is not "
                              "supported yet: prefill and decode engines run on one device each")
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
        if parallel.world_size > 1:
            # collectives inside a step: no CUDA graphs (all-to-all splits are read on the host)
            # and no async scheduling (every rank must agree on each step before it runs)
            if self._cuda_graphs:
                raise ConfigError("cuda_graphs(True) is not supported with parallel(...) yet; use cuda_graphs(False)")
            if self._async_scheduling:
                raise ConfigError("async_scheduling(True) is not supported with parallel(...) yet")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but torch sees no CUDA device")
        if self._dtype is not None:
            dtype = parse_dtype(self._dtype)
        elif device.type == "cpu":
            dtype = torch.float32
        else:
            dtype = parse_dtype(model.torch_dtype) if model.torch_dtype in ("bfloat16", "float16", "float32") else torch.bfloat16

        from dlengine.kernels.mla.decode_choice import preferred_block_size, resolve_mla_decode

        mla_decode = resolve_mla_decode(self._mla_decode, model, attention, device, dtype)
        if "block_size" not in self._cache and cache.dtype == "auto":
            block_size = preferred_block_size(mla_decode, model, attention, device, dtype)
            if block_size is not None:  # MLA decode on the Gluon kernel: its fastest page size
                logger.info("KV block size %d: the Gluon MLA decode kernel's fastest page (cache(block_size=...) "
                            "overrides)", block_size)
                cache = dataclasses.replace(cache, block_size=block_size)
        quantization = self._resolve_quantization(model, device)
        if quantization != "none" and parallel.world_size > 1:
            # the tensor/expert-parallel layers shard bf16 weights; FP8 shards (with their block
            # scales) are not written yet
            raise ConfigError(f"FP8 checkpoints ({model.path}) cannot run with parallel(...) yet "
                              f"(world size {parallel.world_size}); run them on one device")

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
            async_scheduling=(device.type == "cuda" and parallel.world_size == 1 if self._async_scheduling is None
                              else self._async_scheduling),
            quantization=quantization, mla_decode=mla_decode,
        )

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
        cfg = self._make_config()
        if cfg.parallel.world_size > 1:
            from dlengine.parallel.front import build_parallel_engine

            return build_parallel_engine(self, cfg)
        return self._build_local(cfg)

    def _build_local(self, cfg: EngineConfig, state=None) -> Engine:
        """This process's engine; `state` (a ParallelState) makes it one rank of a parallel layout."""
        from dlengine.models.layers.parallel_linear import kv_heads_per_rank
        from dlengine.parallel.state import ParallelState, parallel_state

        state = state or ParallelState()
        if cfg.device.type == "cuda":
            import gc

            gc.collect()  # an engine dropped just before still holds device memory until collected
            torch.cuda.empty_cache()
        kernels = resolve_kernels(cfg.attention_backend, cfg.mla_decode, cfg.model, cfg.device, cfg.dtype,
                                  cfg.quantization)
        backend = kernels.attention
        model_cls = get_model_class(cfg.model)
        prev_dtype = torch.get_default_dtype()
        torch.set_default_dtype(cfg.dtype)
        try:
            # layers size their shards from `state` and keep the kernels they call from `kernels`
            with torch.device(cfg.device), parallel_state(state), kernel_scope(kernels):
                model = model_cls(cfg.model, max_position=cfg.max_model_len)
        finally:
            torch.set_default_dtype(prev_dtype)
        if cfg.quantization != "none":
            from dlengine.models.layers.fp8_linear import prepare_fp8_model

            prepare_fp8_model(model, cfg.model.quantization, kernels.ops)
        if cfg.load_format == "dummy":
            init_dummy_weights(model, seed=cfg.seed)
        else:
            load_weights(model, cfg.model.path, num_layers=self._hf_overrides.get("num_hidden_layers"))
        if cfg.quantization != "none":
            from dlengine.models.layers.fp8_linear import finish_fp8_load

            finish_fp8_load(model, cfg.quantization, cfg.dtype)
        run_post_load_hooks(model)  # after FP8 finishing: MLA's absorbed views need the final kv_b_proj
        model.eval()
        tokenizer = load_tokenizer(cfg.model.path)

        kv_dtype = cfg.dtype if cfg.cache.dtype == "auto" else parse_dtype(cfg.cache.dtype)
        use_graphs = self._use_cuda_graphs(cfg, backend)
        if use_graphs and state.ep_group is not None:
            # expert-parallel dispatch sizes its all-to-all from routing counts read on the host:
            # not capturable (a 1-rank EP world gets here with world_size 1)
            use_graphs = False
        graph_batch = min(self._cuda_graph_max_batch or 512, cfg.scheduler.max_num_seqs)
        # graphs keep a private pool of decode activations (about a decode step's worth)
        graph_reserve = (256 << 20) + graph_batch * cfg.model.vocab_size * 4 * 2 if use_graphs else 0
        # under tensor parallelism the cache holds this rank's kv heads only (MLA's latent is whole)
        kv_model = cfg.model
        if state.tp_size > 1 and not cfg.model.uses_mla:
            kv_model = dataclasses.replace(cfg.model, num_key_value_heads=kv_heads_per_rank(
                cfg.model.num_key_value_heads, state.tp_size))
        plan = plan_kv_cache(dataclasses.replace(cfg, model=kv_model), model, backend, kv_dtype,
                             reserve_bytes=graph_reserve)
        if state.world_group is not None:
            # TP ranks must make identical scheduling decisions (same preemptions), so every
            # rank takes the smallest cache any rank can hold (free memory differs per GPU)
            import torch.distributed as dist

            n = torch.tensor([plan.num_blocks], dtype=torch.int64, device=cfg.device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN, group=state.world_group)
            plan.num_blocks = int(n.item())
        logger.info("%s", plan.describe(cfg.cache.block_size))
        kv_cache = KVCache(kv_model, plan.num_blocks, cfg.cache.block_size, kv_dtype, cfg.device)
        block_manager = BlockManager(plan.num_blocks, cfg.cache.block_size, cfg.cache.prefix_caching)
        scheduler = Scheduler(cfg.scheduler, block_manager)
        runner = ModelRunner(model, kv_cache, backend, Sampler(cfg.seed), cfg.model.vocab_size, cfg.device,
                             kernels=kernels)
        if use_graphs:
            from dlengine.engine.cuda_graph import CUDAGraphRunner

            runner.graph_runner = CUDAGraphRunner(model, kv_cache, backend, graph_batch, cfg.max_model_len, cfg.device)
            runner.graph_runner.capture()
            logger.info("captured %d CUDA graphs (batch sizes up to %d), %.2f GiB",
                        len(runner.graph_runner.graphs), graph_batch, runner.graph_runner.memory_bytes / 2**30)
        engine = Engine(cfg, model, tokenizer, kv_cache, block_manager, scheduler, runner)
        engine.memory_plan = plan
        if cfg.role != "hybrid":
            from dlengine.disagg.roles import attach_role

            attach_role(engine, self._transfer, self._control_plane)
        return engine

    def _use_cuda_graphs(self, cfg: EngineConfig, backend) -> bool:
        capturable = getattr(backend, "supports_cuda_graphs", False)
        if self._cuda_graphs is None:
            return cfg.device.type == "cuda" and capturable and cfg.parallel.world_size == 1
        if self._cuda_graphs and cfg.device.type != "cuda":
            raise ConfigError("cuda_graphs(True) needs a CUDA device")
        if self._cuda_graphs and not capturable:
            raise ConfigError(f"attention backend {backend.name!r} cannot be captured in CUDA graphs; "
                              "use attention('triton') or cuda_graphs(False)")
        return self._cuda_graphs
