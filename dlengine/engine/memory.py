"""Memory planning: how many KV blocks fit.

On a GPU the cache gets what is left of `memory_utilization` x total memory after the weights,
the activations of the largest possible step (measured by running one), and what CUDA graphs
will hold. On CPU a fixed byte budget (`cpu_kv_cache_bytes`) bounds it, capped at what
`max_num_seqs` full-length requests could ever use.

What a block costs comes from the cache specs (cache/specs.py): the sum of every paged spec's
page bytes (all paged groups share block ids), so the KV dtype sets the capacity: an FP8 cache
(1 byte an element, `cache(dtype="fp8_e4m3")`) holds twice the tokens of a bf16 one in the same
memory. State specs cost a fixed slot per sequence;
`max_num_seqs` slots are set aside first (a running sequence holds one), plus prefix-cache
checkpoints and, when such a model speculates, k draft snapshots per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dlengine.cache.block_manager import BlockManager
from dlengine.cache.kv_cache import KVCache, bytes_per_block, bytes_per_state_slot
from dlengine.cache.specs import CacheSpec, cache_specs_for, dtype_name, state_checkpointable
from dlengine.config import ConfigError, EngineConfig
from dlengine.engine.request import Request
from dlengine.engine.sampler import Sampler, SamplingTensors
from dlengine.engine.scheduler import ScheduledRequest, SchedulerOutput
from dlengine.sampling_params import SamplingParams


@dataclass
class MemoryPlan:
    num_blocks: int
    bytes_per_block: int
    weights_bytes: int = 0
    peak_activation_bytes: int = 0
    reserved_bytes: int = 0  # CUDA graphs and allocator slack
    total_bytes: int = 0
    num_state_slots: int = 0  # per-sequence state slots (state specs only)
    bytes_per_state_slot: int = 0
    kv_dtype: str = ""  # what the KV cache stores, e.g. "bfloat16" or "float8_e4m3fn"
    # prefix-cache checkpoints of the state (hybrid models with prefix caching), each a state
    # slot after the running ones (cache/state_slots.py StateCheckpointPool)
    num_checkpoint_slots: int = 0
    # speculative decoding of a state model: snapshots of the state after each draft, k per running
    # sequence, after the checkpoints (cache/state_rollback.py StateSnapshots)
    num_snapshot_slots: int = 0

    @property
    def num_cache_state_slots(self) -> int:
        """State slots the cache holds: the running sequences', the checkpoints' and the snapshots'."""
        return self.num_state_slots + self.num_checkpoint_slots + self.num_snapshot_slots

    @property
    def first_snapshot_slot(self) -> int:
        return self.num_state_slots + self.num_checkpoint_slots

    @property
    def state_bytes(self) -> int:
        return self.num_cache_state_slots * self.bytes_per_state_slot

    def token_capacity(self, block_size: int) -> int:
        """Tokens the paged cache holds (all requests together)."""
        return self.num_blocks * block_size

    def describe(self, block_size: int) -> str:
        gib = 1 << 30
        dtype = f" ({self.kv_dtype}, {self.bytes_per_block // block_size} B per token)" if self.kv_dtype else ""
        s = (f"KV cache{dtype}: {self.num_blocks} blocks x {block_size} tokens = "
             f"{self.token_capacity(block_size)} tokens ({self.num_blocks * self.bytes_per_block / gib:.2f} GiB)")
        if self.num_state_slots:
            ckpt = f" + {self.num_checkpoint_slots} prefix-cache checkpoints" if self.num_checkpoint_slots else ""
            if self.num_snapshot_slots:
                ckpt += f" + {self.num_snapshot_slots} draft snapshots"
            s += f" + {self.num_state_slots} state slots{ckpt} ({self.state_bytes / gib:.2f} GiB)"
        if self.total_bytes:
            s += (f"; weights {self.weights_bytes / gib:.2f} GiB, peak activations "
                  f"{self.peak_activation_bytes / gib:.2f} GiB, reserved {self.reserved_bytes / gib:.2f} GiB "
                  f"of {self.total_bytes / gib:.1f} GiB")
        return s


def profile_step_peak(cfg: EngineConfig, model, backend, kv_dtype: torch.dtype,
                      specs: Sequence[CacheSpec] | None = None) -> int:
    """Run the largest step the scheduler can produce (max_num_batched_tokens prompt tokens, logits
    and sampling for max_num_seqs rows) and return the extra device memory it needed at peak."""
    from dlengine.engine.runner import ModelRunner

    sched, bs = cfg.scheduler, cfg.cache.block_size
    n_tokens = sched.max_num_batched_tokens
    seq_len = min(n_tokens, cfg.max_model_len - 1)
    lengths = [seq_len] * (n_tokens // seq_len) + ([n_tokens % seq_len] if n_tokens % seq_len else [])
    num_blocks = sum(-(-L // bs) for L in lengths) + 8
    specs = list(specs) if specs is not None else cache_specs_for(cfg.model, kv_dtype)
    slots = sched.max_num_seqs if bytes_per_state_slot(specs) else 0
    cache = KVCache(specs, num_blocks, bs, kv_dtype, cfg.device, num_state_slots=slots)
    blocks = BlockManager(num_blocks, bs, enable_prefix_caching=False, specs=specs, num_state_slots=slots)
    runner = ModelRunner(model, cache, backend, Sampler(0), cfg.model.vocab_size, cfg.device)
    gen = torch.Generator().manual_seed(0)
    reqs = []
    for i, L in enumerate(lengths):
        r = Request(f"profile-{i}", torch.randint(0, cfg.model.vocab_size, (L,), generator=gen).tolist(),
                    SamplingParams(temperature=1.0, top_p=0.9, top_k=50))
        blocks.allocate_slots(r, L)
        reqs.append(r)
    out = SchedulerOutput([ScheduledRequest(r, r.num_tokens, sample=True) for r in reqs])
    is_cuda = cfg.device.type == "cuda"
    if is_cuda:
        torch.cuda.synchronize(cfg.device)
        torch.cuda.reset_peak_memory_stats(cfg.device)
        base = torch.cuda.memory_allocated(cfg.device)
    runner.execute(out)
    # a mixed step too (a decode beside a prompt chunk), so its kernels are compiled before serving
    reqs[0].append_token(1)
    reqs[0].num_computed_tokens = reqs[0].num_tokens - 1
    blocks.allocate_slots(reqs[0], 1)
    chunk = Request("profile-mixed", list(range(2, 2 + min(33, cfg.max_model_len - 1))), SamplingParams())
    blocks.allocate_slots(chunk, chunk.num_tokens)
    runner.execute(SchedulerOutput([ScheduledRequest(reqs[0], 1, sample=True),
                                    ScheduledRequest(chunk, chunk.num_tokens, sample=True)]))
    # and one whose decode row has a short context (a single KV split: another kernel variant)
    chunk.append_token(1)
    chunk.num_computed_tokens = chunk.num_tokens - 1
    blocks.allocate_slots(chunk, 1)
    fresh = Request("profile-mixed-2", list(range(2, 2 + min(40, cfg.max_model_len - 1))), SamplingParams())
    blocks.allocate_slots(fresh, fresh.num_tokens)
    runner.execute(SchedulerOutput([ScheduledRequest(chunk, 1, sample=True),
                                    ScheduledRequest(fresh, fresh.num_tokens, sample=True)]))
    # sampling runs for up to max_num_seqs rows at once: [rows, vocab] float32 buffers
    rows = sched.max_num_seqs
    logits = torch.zeros(rows, cfg.model.vocab_size, dtype=torch.float32, device=cfg.device)
    fake = [reqs[0]] * rows
    Sampler(0)(logits, SamplingTensors.from_requests(fake, cfg.model.vocab_size, cfg.device))
    peak = 0
    if is_cuda:
        torch.cuda.synchronize(cfg.device)
        peak = torch.cuda.max_memory_allocated(cfg.device) - base
    del cache, logits
    if is_cuda:
        torch.cuda.empty_cache()
    return peak


def plan_kv_cache(cfg: EngineConfig, model, backend, kv_dtype: torch.dtype, reserve_bytes: int = 0,
                  specs: Sequence[CacheSpec] | None = None, draft_snapshots: int = 0) -> MemoryPlan:
    """How many blocks (and state slots) the cache of `specs` gets; `specs` default to the
    model's single-rank ones (cache_specs_for(cfg.model, kv_dtype)). `draft_snapshots`: state
    snapshots per running sequence (k for a speculating state model; cache/state_rollback.py)."""
    cache, sched = cfg.cache, cfg.scheduler
    specs = list(specs) if specs is not None else cache_specs_for(cfg.model, kv_dtype)
    per_block = bytes_per_block(specs, cache.block_size)
    per_slot = bytes_per_state_slot(specs)
    min_blocks = -(-cfg.max_model_len // cache.block_size)
    plan = MemoryPlan(num_blocks=0, bytes_per_block=per_block, num_state_slots=sched.max_num_seqs if per_slot else 0,
                      bytes_per_state_slot=per_slot, kv_dtype=dtype_name(kv_dtype),
                      num_checkpoint_slots=(sched.max_num_seqs if per_slot and cache.prefix_caching
                                            and state_checkpointable(specs) else 0),
                      num_snapshot_slots=sched.max_num_seqs * draft_snapshots if per_slot else 0)
    if per_block == 0:
        raise ConfigError("the cache specs hold no paged group: every model needs blocks for its token positions")
    if cache.num_blocks is not None:
        plan.num_blocks = cache.num_blocks
    elif cfg.device.type == "cuda":
        plan.peak_activation_bytes = profile_step_peak(cfg, model, backend, kv_dtype, specs)
        free, total = torch.cuda.mem_get_info(cfg.device)
        # memory torch's caching allocator holds but does not use is free for our purposes
        free += torch.cuda.memory_reserved(cfg.device) - torch.cuda.memory_allocated(cfg.device)
        plan.total_bytes = total
        plan.weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        plan.reserved_bytes = reserve_bytes
        budget = (int(total * cache.memory_utilization) - (total - free) - plan.peak_activation_bytes - reserve_bytes
                  - plan.state_bytes)
        plan.num_blocks = max(0, budget // per_block)
    else:
        full = -(-sched.max_num_seqs * cfg.max_model_len // cache.block_size)
        plan.num_blocks = max(min_blocks, min(full, max(0, cache.cpu_kv_cache_bytes - plan.state_bytes) // per_block))
    if plan.num_blocks < min_blocks:
        raise ConfigError(
            f"KV cache too small for one max-length request: {plan.num_blocks} blocks x {cache.block_size} tokens "
            f"< max_model_len={cfg.max_model_len}; give the cache more blocks/memory or lower max_model_len"
        )
    return plan
