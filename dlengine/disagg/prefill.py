"""The prefill side's KV connector: run prompts, keep the finished ones' KV pinned, hand out
kv_transfer_params (engine/seams.py, KVConnector: `on_add` caps a request to one token,
`on_finish` pins its blocks and returns the finish reason "kv_transfer", `poll` releases blocks
decode engines are done with).

The prompt's KV is copied into block-major staging at hand-off (one contiguous range per
request; the cache blocks return to the pool at once), or, with `staging_blocks=0` on CPU, the
cache blocks themselves stay pinned and are read in place. A model with a recurrent state (Gated
DeltaNet hybrids) also copies the request's state after the prompt into a staging state slot,
named in the params and held with the blocks (docs/gdn.md); it needs staging.

Control traffic rides on the same DLSlime transport as the KV, as one-sided reads and writes of
small registered regions of this engine, so the prefill side stays passive (no socket server of
its own, no thread):

- "kv": the KV region (the cache on CPU, pinned staging on CUDA);
- "meta": this engine's handshake record (JSON: engine id, model fingerprint, KV layout), read
  by a decode engine when it first connects;
- "ctrl": int64 [2, slots], the pin table's control region (disagg/pin_table.py). Row 0 ("pin")
  holds a request's nonce while its blocks are pinned and is cleared BEFORE the blocks are freed;
  a decode engine re-reads it after its pull, so a pull that raced a release is detected, never
  decoded. Row 1 ("done") is where a decode engine writes the nonce when it no longer needs the
  blocks; `poll` reads it.

Blocks are released when the decode side says it is done with them (event "done": pulled, or
failed/aborted there), after `pin_timeout_s` (decode engine dead or
never called), or by `Engine.abort(request_id)` here.

Under tensor parallelism every rank runs its own connector over its own shard of the KV heads
(same block ids on every rank, since the ranks schedule alike); rank 0's kv_transfer_params list
the other ranks' in `shards` (dlengine.parallel.lockstep gathers them).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from dlengine.disagg.params import KVTransferParams, prompt_hash
from dlengine.disagg.pin_table import Pin, PinTable
from dlengine.disagg.records import write_record
from dlengine.engine.seams import PollResult
from dlengine.parallel.transfer.kv_region import KVRegion

logger = logging.getLogger("dlengine.disagg")
META_BYTES = 16384


@dataclass
class _HeldKV:
    """What a handed-off request keeps pinned: its region blocks (and state slot) and, when the
    cache itself is the region, its cache block references (a BlockRequest for BlockManager.free)."""

    block_ids: list[int]
    region_blocks: list[int]
    num_cached_blocks: int = 0
    all_token_ids: list[int] = field(default_factory=list)
    region_state_slot: int = -1  # staging slot of its recurrent state (models with state specs)


class PrefillConnector:
    name = "prefill"
    migrates_state = True  # hands off a state model's recurrent state with the KV (assemble.py checks)

    def __init__(self, kv_cache, block_manager, config, transfer, engine_id: str, fingerprint: str,
                 pin_timeout_s: float = 60.0, num_slots: int = 4096, staging_blocks: int | None = None) -> None:
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.config = config
        self.transfer = transfer
        self.engine_id = engine_id
        self.fingerprint = fingerprint
        self.pin_timeout_s = pin_timeout_s
        self.region = KVRegion(kv_cache, config.model, staging_blocks,
                               min_blocks=-(-config.max_model_len // kv_cache.block_size),
                               staging_on_device=getattr(transfer, "reads_device_memory", False))
        if self.region.has_state and not self.region.staged:
            from dlengine.config import ConfigError

            raise ConfigError(f"{config.model.architecture} keeps a recurrent state per request, which travels "
                              "through a staging slot: staging_blocks=0 (the cache registered directly) cannot keep "
                              "a finished request's state slot pinned; leave staging_blocks unset")
        self.pins: PinTable[_HeldKV] = PinTable(num_slots, pin_timeout_s, self._free_held)
        self.meta = torch.zeros(META_BYTES, dtype=torch.uint8)
        write_record(self.meta, {"engine_id": engine_id, "role": "prefill", "fingerprint": fingerprint,
                                 "layout": self.region.layout.to_dict(), "architecture": config.model.architecture})
        transfer.register_region("kv", self.region.tensor)
        transfer.register_region("ctrl", self.pins.ctrl)
        transfer.register_region("meta", self.meta)
        self.registration = None  # a discovery.Registration when registered with a control plane

    # ------------------------------------------------------------------ the seam
    def on_add(self, request) -> None:
        """A prefill engine samples one token; the decode engine does the rest."""
        if request.score_only:
            return
        if request.params.max_tokens > 1:
            request.remote_max_tokens = request.params.max_tokens
            request.params = replace(request.params, max_tokens=1)

    def num_external_tokens(self, request) -> int:
        return 0  # a prefill engine computes every prompt itself

    def on_allocated(self, request, num_external_tokens: int) -> bool:
        return True

    def on_finish(self, request, reason: str) -> str:
        """Pin the blocks of a prompt that stopped only because prefill ends at one token."""
        if (reason != "length" or not request.remote_max_tokens or request.num_tokens >= self.config.max_model_len
                or not request.block_ids):
            return reason
        n = request.num_prompt_tokens
        bs = self.kv_cache.block_size
        cache_blocks = request.block_ids[: -(-n // bs)]
        region_blocks = self.region.allocate(cache_blocks)
        # the recurrent state after the whole prompt (the decode engine resumes from it)
        state_slot = self.region.allocate_state() if self.region.has_state else -1
        if region_blocks is None or not self.pins.has_free_slot or state_slot is None:
            if region_blocks is not None:
                self.region.release(region_blocks)
            if state_slot is not None:
                self.region.release_state(state_slot)
            request.error = "prefill engine has no free transfer staging/slot to hand the KV off; retry later"
            return "error"
        self.region.stage_out(cache_blocks, region_blocks)
        if state_slot >= 0:
            self.region.stage_state_out(request.state_slot, state_slot)
        if self.region.staged:
            # the KV now lives in staging: the cache blocks go back to the pool (and stay in the
            # prefix cache); only the staging blocks are pinned until the decode side is done
            cache_refs = []
        else:  # the cache itself is the region: pin its blocks (the scheduler frees nothing)
            cache_refs = list(request.block_ids)
            request.block_ids = []
            request.num_cached_blocks = 0
        pin = self.pins.pin(request.request_id, _HeldKV(cache_refs, region_blocks, region_state_slot=state_slot))
        request.kv_transfer_params = KVTransferParams(
            engine_id=self.engine_id, endpoint=self.transfer.local_info(), request_id=request.request_id,
            block_ids=region_blocks, num_computed_tokens=n, first_token=request.output_token_ids[0],
            prompt_hash=prompt_hash(request.prompt_token_ids), fingerprint=self.fingerprint,
            layout=self.region.layout.to_dict(), slot=pin.slot, nonce=pin.nonce, pin_timeout_s=self.pin_timeout_s,
            state_slot=state_slot,
        ).to_dict()
        return "kv_transfer"

    def poll(self) -> PollResult:
        """Release blocks that decode engines are done with, or whose pin expired."""
        for pin, why in self.pins.poll():
            if why == "timeout":
                logger.warning("prefill %s: request %s was not pulled within %.1fs; freeing its KV blocks",
                               self.engine_id, pin.request_id, self.pin_timeout_s)
        return PollResult()

    def abort(self, request_id: str) -> bool:
        return self.pins.release_request(request_id)

    def _free_held(self, held: _HeldKV) -> None:
        """The pin table's `free`: called after the request's pin entry is cleared."""
        self.block_manager.free(held)
        self.region.release(held.region_blocks)
        self.region.release_state(held.region_state_slot)

    # ------------------------------------------------------------------ facts
    @property
    def pinned(self) -> dict[int, Pin[_HeldKV]]:
        """The pins held, by slot (disagg/pin_table.py, Pin)."""
        return self.pins.pinned

    @property
    def counts(self) -> dict[str, int]:
        return self.pins.counts

    @property
    def events(self) -> deque[tuple[str, str]]:
        """(request id, why it was released) of the latest releases."""
        return self.pins.events

    @property
    def num_pinned_blocks(self) -> int:
        return sum(len(p.held.region_blocks) for p in self.pins.pinned.values())

    def describe(self) -> dict:
        return {"engine_id": self.engine_id, "transfer_backend": self.transfer.backend,
                "transfer_transport": self.transfer.transport, "kv_staging": self.region.staged,
                "pinned_requests": len(self.pins), **self.pins.counts}

    def close(self) -> None:
        if self.registration is not None:
            self.registration.close()
            self.registration = None
        self.pins.release_all()
        self.transfer.close()
