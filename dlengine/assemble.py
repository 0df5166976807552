"""Turn an EngineConfig into a running engine: load the model, size and allocate the KV cache,
and wire scheduler, runner, sampler and the seams (connector, speculator) together.

`build_engine(config)` is what `EngineBuilder.build()` calls; `build_core(config, state)` is
what every rank of a parallel engine calls in its own process with its `ParallelState`.
Objects are built complete: nothing is patched onto them afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dlengine.cache.block_manager import BlockManager
from dlengine.cache.kv_cache import KVCache
from dlengine.cache.specs import cache_specs_for, check_specs, graph_uncapturable
from dlengine.cache.state_rollback import StateSnapshots
from dlengine.config import ConfigError, EngineConfig, parse_dtype
from dlengine.engine.core import EngineCore
from dlengine.engine.engine import Engine
from dlengine.engine.memory import plan_kv_cache
from dlengine.engine.runner import ModelRunner
from dlengine.engine.sampler import Sampler
from dlengine.engine.scheduler import Scheduler
from dlengine.kernels.selection import Kernels, kernel_scope, resolve_kernels
from dlengine.kernels.kv_quant import is_fp8
from dlengine.models.loader import init_dummy_weights, kv_scale_source, load_weights, run_post_load_hooks
from dlengine.models.registry import get_model_class
from dlengine.speculative.acceptance import make_acceptance
from dlengine.tokenizer import load_tokenizer

logger = logging.getLogger("dlengine")


def build_engine(cfg: EngineConfig) -> Engine:
    """The one-process engine `cfg` describes (parallel layouts: dlengine.parallel.front)."""
    return Engine(cfg, build_core(cfg), load_tokenizer(cfg.model.path))


def build_model(cfg: EngineConfig, state, kernels: Kernels, model_cls: type | None = None):
    """The model with its weights (or dummy weights), sized for this rank, its layers running
    `kernels` (kernels/selection.py). `model_cls`: another module of the same checkpoint built the
    same way (an MTP speculator's next-n layer); default: the registry's model class."""
    from dlengine.parallel.state import parallel_state

    model_cls = model_cls or get_model_class(cfg.model)
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
        load_weights(model, cfg.model.path, num_layers=cfg.load_num_layers)
    if cfg.quantization != "none":
        from dlengine.models.layers.fp8_linear import finish_fp8_load

        finish_fp8_load(model, cfg.quantization, cfg.dtype)
    run_post_load_hooks(model)  # after FP8 finishing: MLA's absorbed views need the final kv_b_proj
    return model.eval()


def _use_cuda_graphs(cfg: EngineConfig, backend, state, cache_specs=()) -> bool:
    capturable = getattr(backend, "supports_cuda_graphs", False)
    uncapturable = graph_uncapturable(cache_specs)
    if uncapturable:
        # a state kind whose decode layers sync with the host. (Gated DeltaNet state and
        # DeepSeek-V4's rings are captured: their slots are static graph inputs, engine/cuda_graph.py)
        if cfg.cuda_graphs:
            names = ", ".join(s.describe() for s in uncapturable)
            raise ConfigError(f"{cfg.model.architecture} keeps per-sequence state ({names}) whose layers CUDA "
                              "graphs do not capture yet; use cuda_graphs(False)")
        return False
    if cfg.cuda_graphs is None:
        # expert-parallel dispatch reads routing counts on the host: not capturable
        return cfg.device.type == "cuda" and capturable and state.ep_group is None
    if cfg.cuda_graphs and not capturable:
        raise ConfigError(f"attention backend {backend.name!r} cannot be captured in CUDA graphs; "
                          "use attention('triton') or cuda_graphs(False)")
    return cfg.cuda_graphs and state.ep_group is None


def _check_state_model_features(cfg: EngineConfig, cache_specs) -> None:
    """Features that would silently compute wrong tokens with a recurrent state (StateSpec).
    Speculative decoding undoes rejected drafts in the state from snapshots
    (cache/state_rollback.py) when every state kind supports it (`speculative_rollback`). (A KV
    connector must also move the state: `_check_connector_moves_state`; the draft snapshots are
    local to the decode engine, which speculates on the state it pulled like on its own.)"""
    states = [s for s in cache_specs if not s.paged]
    if not states or cfg.components.speculator is None:
        return
    cannot = [s.describe() for s in states if not getattr(s, "speculative_rollback", False)]
    if cannot:
        raise ConfigError(f"{cfg.model.architecture} keeps recurrent state ({', '.join(cannot)}) whose layers cannot "
                          "roll rejected drafts back (no per-position snapshots); drop speculative(...)")


def _draft_snapshots(cache_specs, speculator, cfg: EngineConfig) -> int:
    """State snapshots per running sequence: k for a speculating model with recurrent state (the
    state after each of a verify step's positions but the last; cache/state_rollback.py), else 0."""
    if speculator is None or all(s.paged for s in cache_specs):
        return 0
    return int(getattr(speculator, "num_tokens", 0) or cfg.speculative_tokens or 0)


def _check_connector_moves_state(cfg: EngineConfig, cache_specs, connector) -> None:
    """A decode engine given the KV without the recurrent state would resume from zeros: the
    prefill/decode roles' connectors migrate it (`migrates_state`); a user's connector must say so."""
    if connector is None or all(s.paged for s in cache_specs) or getattr(connector, "migrates_state", False):
        return
    connector_close = getattr(connector, "close", None)
    if callable(connector_close):
        connector_close()
    raise ConfigError(f"{cfg.model.architecture} keeps recurrent state, which the KV connector "
                      f"{type(connector).__name__} does not migrate (it has no migrates_state = True); "
                      "use role('prefill') / role('decode') or role('hybrid') without a KV connector")


def _graph_verify_tokens(cfg: EngineConfig, backend, speculator) -> int:
    """k for verify graphs of 1 + k tokens per request (engine/cuda_graph.py), 0 for none: the
    speculator's num_tokens where the backend captures multi-token queries; elsewhere verify
    steps run eagerly (decode steps still replay graphs, keeping hidden states for MTP)."""
    if speculator is None:
        return 0
    k = int(getattr(speculator, "num_tokens", 0) or cfg.speculative_tokens or 0)
    if k and not getattr(backend, "supports_cuda_graph_verify", False):
        logger.info("speculative verify steps run eagerly: attention backend %r captures one query token per "
                    "request only (no supports_cuda_graph_verify); decode steps replay CUDA graphs", backend.name)
        return 0
    return k


@dataclass(frozen=True)
class SpeculatorTarget:
    """What a speculator factory with `wants_target = True` gets beside the config: the target
    model (an MTP layer shares its embedding), the parallel layout and the kernels its own layers
    are built with."""

    model: torch.nn.Module
    state: object  # ParallelState
    kernels: Kernels


def _make_speculator(cfg: EngineConfig, model, state, kernels: Kernels):
    """The configured speculator: an object as given, or made by its factory."""
    speculator = cfg.components.speculator
    if speculator is not None and not hasattr(speculator, "propose") and callable(speculator):
        if getattr(speculator, "wants_target", False):
            return speculator(cfg, SpeculatorTarget(model, state, kernels))
        return speculator(cfg)
    return speculator


def _make_sampler(cfg: EngineConfig, state):
    sampler = cfg.components.sampler or Sampler(cfg.seed)
    if state.tp_group is not None:
        from dlengine.parallel.sampling import TPLeaderSampler

        sampler = TPLeaderSampler(sampler, state)
    return sampler


def build_core(cfg: EngineConfig, state=None) -> EngineCore:
    """This process's EngineCore; `state` (a ParallelState) makes it one rank of a parallel layout."""
    from dlengine.parallel.state import ParallelState

    state = state or ParallelState()
    if cfg.device.type == "cuda":
        import gc

        gc.collect()  # an engine dropped just before still holds device memory until collected
        torch.cuda.empty_cache()
    # one kernel choice for the whole engine: the backend object (a user's, or built with its MLA
    # decode kernel) and the fused ops the layers run
    kernels = resolve_kernels(cfg.components.attention or cfg.attention_backend, cfg.mla_decode, cfg.model,
                              cfg.device, cfg.kv_cache_dtype, cfg.quantization, cfg.prefill_attention)
    backend = kernels.attention
    model = build_model(cfg, state, kernels)

    kv_dtype = cfg.kv_cache_dtype
    # what the cache keeps per layer group; under tensor parallelism this rank's kv heads only
    # (MLA's latent is whole on every rank)
    cache_specs = cache_specs_for(cfg.model, kv_dtype, state.tp_size, state.tp_rank, get_model_class(cfg.model))
    # built before the cache is sized: an MTP speculator's weights take memory, and its layers
    # keep KV in the same blocks (one more layer in the cache specs)
    speculator = _make_speculator(cfg, model, state, kernels)
    if getattr(speculator, "needs_hidden_states", False):
        cache_specs = list(speculator.cache_specs(cache_specs))
        check_specs(cache_specs)
    _check_state_model_features(cfg, cache_specs)
    draft_snapshots = _draft_snapshots(cache_specs, speculator, cfg)
    use_graphs = _use_cuda_graphs(cfg, backend, state, cache_specs)
    graph_batch = min(cfg.cuda_graph_max_batch or 512, cfg.scheduler.max_num_seqs)
    verify_tokens = _graph_verify_tokens(cfg, backend, speculator) if use_graphs else 0
    # graphs keep a private pool of activations (about a step's worth of their largest graph) and
    # static float32 logits of every row of it: graph_batch rows, (1 + k) times that with verify graphs
    graph_rows = graph_batch * (1 + verify_tokens)
    # an MTP speculator's draft graphs add its head's logits, one row per request, to the pool
    draft_rows = graph_batch if getattr(speculator, "needs_hidden_states", False) else 0
    graph_reserve = (256 << 20) + (2 * graph_rows + draft_rows) * cfg.model.vocab_size * 4 if use_graphs else 0
    plan = plan_kv_cache(cfg, model, backend, kv_dtype, reserve_bytes=graph_reserve, specs=cache_specs,
                         draft_snapshots=draft_snapshots)
    if state.world_group is not None:
        # TP ranks must make identical scheduling decisions (same preemptions), so every
        # rank takes the smallest cache any rank can hold (free memory differs per GPU)
        import torch.distributed as dist

        n = torch.tensor([plan.num_blocks], dtype=torch.int64, device=cfg.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=state.world_group)
        plan.num_blocks = int(n.item())
    logger.info("%s", plan.describe(cfg.cache.block_size))
    if is_fp8(kv_dtype):
        refusal = getattr(model, "fp8_kv_unsupported", None)  # a model whose own kernels read its cache
        if refusal:
            raise ConfigError(f"cache(dtype='fp8_e4m3') is not supported for {cfg.model.architecture} yet: "
                              f"{refusal}; use a bf16 cache")
        logger.info("FP8 KV cache scales: %s", kv_scale_source(model))
    kv_cache = KVCache(cache_specs, plan.num_blocks, cfg.cache.block_size, kv_dtype, cfg.device,
                       num_state_slots=plan.num_cache_state_slots)
    # a speculating model with recurrent state: snapshot slots after the running and checkpoint ones
    state_rollback = (StateSnapshots(kv_cache, plan.first_snapshot_slot, plan.num_state_slots, draft_snapshots)
                      if draft_snapshots else None)
    if cfg.components.block_manager is not None:
        block_manager = cfg.components.block_manager(plan.num_blocks, cfg.cache.block_size, cfg.cache.prefix_caching)
    else:
        block_manager = BlockManager(plan.num_blocks, cfg.cache.block_size, cfg.cache.prefix_caching,
                                     specs=cache_specs, num_state_slots=plan.num_state_slots,
                                     num_checkpoint_slots=plan.num_checkpoint_slots)

    blocker = getattr(block_manager, "prefix_cache_blocker", None)
    if cfg.cache.prefix_caching and blocker is not None:
        logger.info("prefix caching finds no hits for this model: %s keeps a state per sequence that summarises "
                    "its whole prefix, and without copies of that state at block boundaries a cached prefix "
                    "cannot be resumed (requests compute every token; results are unaffected)", blocker)
    if getattr(block_manager, "checkpoints", None) is not None:
        logger.info("prefix caching of the recurrent state: %d checkpoint slots, one checkpoint per prompt at its "
                    "last full block (docs/gdn.md says why not every block)", block_manager.checkpoints.num_slots)

    connector = None
    if cfg.components.kv_connector is not None:
        connector = cfg.components.kv_connector(kv_cache, block_manager, cfg)
    elif cfg.role != "hybrid":
        from dlengine.disagg.roles import make_connector

        connector = make_connector(cfg.role, cfg.transfer, kv_cache, block_manager, cfg, cfg.control_plane,
                                   rank=state.rank, parallel_state=state)
    _check_connector_moves_state(cfg, cache_specs, connector)

    # a speculator drafting from the target's hidden states (MTP) reads them after every step,
    # eager or replayed (the graphs then write them to a static buffer too)
    keep_hidden = getattr(speculator, "needs_hidden_states", False)
    graph_runner = None
    if use_graphs:
        from dlengine.engine.cuda_graph import CUDAGraphRunner

        graph_runner = CUDAGraphRunner(model, kv_cache, backend, graph_batch, cfg.max_model_len, cfg.device,
                                       num_spec_tokens=verify_tokens, keep_hidden_states=keep_hidden,
                                       state_rollback=state_rollback)
        graph_runner.capture()
        logger.info("captured %d CUDA graphs (batch sizes up to %d, %s tokens per request), %.2f GiB",
                    len(graph_runner.graphs), graph_batch, " and ".join(map(str, graph_runner.query_lens)),
                    graph_runner.memory_bytes / 2**30)
        # a speculator with work of its own after each step (MTP drafting) captures it for the
        # same graph keys, after the target's (it reads their static hidden states, in their pool)
        capture_drafts = getattr(speculator, "capture_cuda_graphs", None)
        if keep_hidden and callable(capture_drafts):
            capture_drafts(graph_runner)
    runner = ModelRunner(model, kv_cache, backend, _make_sampler(cfg, state), cfg.model.vocab_size, cfg.device,
                         graph_runner=graph_runner, kernels=kernels, keep_hidden_states=keep_hidden,
                         acceptance=make_acceptance(cfg.speculative_forced_acceptance, cfg.seed),
                         state_rollback=state_rollback)
    scheduler = Scheduler(cfg.scheduler, block_manager, policy=cfg.scheduler.policy, connector=connector,
                          num_lookahead_tokens=getattr(speculator, "num_lookahead_tokens", 0),
                          max_model_len=cfg.max_model_len)
    return EngineCore(cfg, model, kv_cache, block_manager, scheduler, runner, connector=connector,
                      speculator=speculator, memory_plan=plan, state_rollback=state_rollback)
