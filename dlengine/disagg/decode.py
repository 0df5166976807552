"""The decode side's KV connector: requests carrying kv_transfer_params pull their KV, then decode.

A migrated request goes through the scheduler like any other (engine/seams.py, KVConnector):
waiting (for free blocks; `num_external_tokens` says its prompt arrives from elsewhere) ->
blocks allocated, `on_allocated` starts the pull (one batched DLSlime read of coalesced
per-layer segments into staging, per prefill rank) -> verifying (re-read the prefill side's pin
slot: if it was released meanwhile the copy is discarded) -> `poll` reports it ready and the
scheduler runs it with the prompt counted as computed (the prefill's first token was appended
at `on_add`). The prefill side is told to free its blocks (a one-sided write of the request's
nonce into its done slot) as soon as the decode side no longer needs them: after the pull, or
when the request fails or is aborted.

Every failure ends the request with finish_reason "error" and a message saying what happened,
and frees every block it held here; this engine keeps serving the others. A pull that times out
shuts down the endpoint to that prefill engine (DLSlime then never completes the stalled read,
so its target blocks can be reused safely) and fails the other pulls from it.

A tensor-parallel prefill engine hands off one KV shard per rank (params with "shards"): the
pull then has one leg per rank (disagg/shards.py), each with its own peer, handshake, read into
its head range's sub-buffer of staging, pin check and done slot; the request is ready when every
leg is verified, and fails (every rank told to free) when one fails. Unsharded params are one leg.
A decode engine under tensor parallelism runs one connector per rank (disagg/tp_decode.py), each
pulling the kv heads of its own cache shard from whichever prefill rank(s) hold them; the ranks
then agree on when a request is ready or failed.

A model with a recurrent state (docs/gdn.md) reads the prefill side's staging state slot into a
staging slot of its own in the same read, and copies it into the request's state slot when the
pin check passes: the request resumes from the state after the prompt.

Prefix caching on this side: not used for migrated prompts (the whole prompt is pulled); the
pulled blocks are published in the prefix cache, so later local prefills can hit them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from dlengine.disagg.params import KVTransferParams, check_shards
from dlengine.disagg.pin_table import DONE, PIN, ctrl_offset
from dlengine.disagg.prefill import META_BYTES
from dlengine.disagg.records import read_record
from dlengine.disagg.shards import Leg, plan_legs
from dlengine.engine.sampler import skip_sampling_steps
from dlengine.engine.seams import PollResult
from dlengine.parallel.transfer.base import HandshakeError, KVLayout, TransferError
from dlengine.parallel.transfer.kv_region import KVRegion
from dlengine.parallel.transfer.base import kv_layout
from dlengine.parallel.transfer.kv_shards import region_rows, stage_in_slice

logger = logging.getLogger("dlengine.disagg")
NUM_SCRATCH = 4096


@dataclass
class _Pull:
    request: object
    params: KVTransferParams  # rank 0's (the only rank's, unless the prefill engine is tensor-parallel)
    ranks: list[KVTransferParams]  # every prefill rank's params: each is told when we are done
    queued_at: float
    legs: list[Leg] = field(default_factory=list)  # planned once blocks are allocated (disagg/shards.py)
    region_blocks: list[int] = field(default_factory=list)
    region_state_slot: int = -1  # staging slot its recurrent state lands in (models with state specs)
    deadline: float = 0.0
    state: str = "queued"  # queued | failing | pulling | draining
    started: float = 0.0
    nbytes: int = 0
    segments: int = 0

    def in_flight(self) -> bool:
        return any(leg.future is not None for leg in self.legs)


@dataclass
class MigrationRecord:
    request_id: str
    prefill_engine: str
    num_tokens: int
    num_blocks: int
    num_segments: int
    nbytes: int
    seconds: float  # from issuing the read to the pin check passing
    num_shards: int = 1  # prefill ranks read from (tensor-parallel prefill engines hand off one shard per rank)


class DecodeConnector:
    name = "decode"
    migrates_state = True  # pulls a state model's recurrent state with the KV (assemble.py checks)

    def __init__(self, kv_cache, block_manager, config, transfer, engine_id: str, fingerprint: str,
                 pull_timeout_s: float = 30.0, queue_timeout_s: float = 60.0, staging_blocks: int | None = None,
                 on_pull_failure: str = "fail", tp_rank: int = 0) -> None:
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.config = config
        self.on_pull_failure = on_pull_failure
        self.transfer = transfer
        self.engine_id = engine_id
        self.fingerprint = fingerprint
        self.pull_timeout_s = pull_timeout_s
        self.queue_timeout_s = queue_timeout_s
        self.tp_rank = tp_rank  # which of the prefill ranks holding the same heads this rank reads (spreads the load)
        if staging_blocks == 0:
            from dlengine.config import ConfigError

            raise ConfigError("a decode engine always pulls into staging (staging_blocks=0 is for prefill engines): "
                              "a pull abandoned on timeout may still land late, and must not land in the cache")
        # a cache shard of a tensor-parallel rank may read whole blocks of a prefill rank holding
        # more of the heads (prefill tp < decode tp): staging rows per block to cover every head
        first = kv_layout(kv_cache).groups[0]
        rows_per_block = -(-first.total_heads // first.heads) if first.head_split else 1
        self.region = KVRegion(kv_cache, config.model, staging_blocks,
                               min_blocks=-(-config.max_model_len // kv_cache.block_size),
                               staging_on_device=getattr(transfer, "reads_device_memory", False),
                               rows_per_block=rows_per_block)
        # scratch row 0: nonces to write into a prefill engine's done slots; row 1: pin re-reads
        self.scratch = torch.zeros((2, NUM_SCRATCH), dtype=torch.int64)
        self.meta_in = torch.zeros(META_BYTES, dtype=torch.uint8)
        transfer.register_region("kv", self.region.tensor)
        transfer.register_region("scratch", self.scratch)
        transfer.register_region("meta_in", self.meta_in)
        self._free_scratch = deque(range(NUM_SCRATCH))
        self._notify: list[tuple[object, int]] = []  # (future, scratch index) of done-writes in flight
        self._peers: dict[str, tuple[str, int]] = {}  # engine id -> (host, port) handshaken
        self._incompatible: dict[str, str] = {}  # engine id -> why its handshake failed
        self.queue: dict[str, _Pull] = {}  # request id -> pull waiting for blocks
        self.active: dict[str, _Pull] = {}  # request id -> pull in flight (pulling/verifying/draining)
        self._result = PollResult()  # what the next poll() reports
        self.migrations: list[MigrationRecord] = []
        self.counts = {"pulled": 0, "failed": 0, "recomputed": 0}  # per request, by outcome
        self.registration = None  # a discovery.Registration when registered with a control plane

    # ------------------------------------------------------------------ the seam
    def on_add(self, request) -> None:
        """A request with kv_transfer_params (checked by the front): it starts with the prefill
        side's first token and waits for blocks."""
        if request.remote_kv is None:
            return  # computed here, as a hybrid engine would
        p = KVTransferParams.from_dict(request.remote_kv)
        if not request.output_token_ids:  # a parallel engine's front appends it to the copy it sends (parallel/front.py)
            request.append_token(p.first_token)
        # the prefill engine drew the first token's noise from this seed: draw past it here, so
        # seeded sampling continues exactly as on one engine
        skip_sampling_steps(request, self.config.model.vocab_size, self.config.device)
        ranks = [p, *check_shards(request.remote_kv, p)]
        self.queue[request.request_id] = _Pull(request, p, ranks, time.monotonic())

    def num_external_tokens(self, request) -> int:
        pull = self.queue.get(request.request_id)
        if pull is None:
            return 0
        self._check_queue_timeout(pull)
        return pull.params.num_computed_tokens

    def _check_queue_timeout(self, pull: _Pull) -> None:
        waited = time.monotonic() - pull.queued_at
        if waited > self.queue_timeout_s and pull.state == "queued":
            bm = self.block_manager
            pull.state = "failing"
            self._fail(pull, f"decode engine {self.engine_id} is out of KV blocks: waited {waited:.1f}s for "
                             f"{bm.blocks_needed(pull.params.num_computed_tokens)} blocks ({bm.num_free_blocks} of "
                             f"{bm.num_blocks} free)")

    def on_allocated(self, request, num_external_tokens: int) -> bool:
        pull = self.queue.get(request.request_id)
        if pull is None or pull.state == "failing":
            return False
        req = pull.request
        try:
            pull.legs = pull.legs or plan_legs(req.remote_kv, pull.params, self.region.layout, self.tp_rank)
            for leg in pull.legs:  # every rank, also those read from none: each is told when we are done
                self._ensure_peer(leg.params, leg.expected)
            self._check_state_handoff(pull)
        except TransferError as e:
            del self.queue[req.request_id]
            self._fail(pull, str(e))
            return True  # the scheduler holds it as waiting for KV until poll() fails it
        return self._start(pull)

    def _start(self, pull: _Pull) -> bool:
        """Take staging for a planned pull and issue its legs' reads; False (nothing taken) when
        staging is full: retry when pulls in flight have landed."""
        req = pull.request
        slices = [leg.slice for leg in pull.legs if leg.slice is not None]
        region_blocks = self.region.allocate_rows(region_rows(slices, pull.params.num_computed_tokens))
        if region_blocks is None:
            return False
        if self.region.has_state:
            state_slot = self.region.allocate_state()
            if state_slot is None:
                self.region.release(region_blocks)
                return False  # every staging state slot is in use
            pull.region_state_slot = state_slot
        self.queue.pop(req.request_id, None)
        pull.region_blocks = region_blocks
        pull.started = time.monotonic()
        pull.deadline = pull.started + self.pull_timeout_s
        pull.state = "pulling"
        self.active[req.request_id] = pull
        for leg in pull.legs:
            if leg.slice is None:
                leg.state = "verified"  # its heads come from another rank: nothing to read or check
                continue
            lp = leg.params
            try:
                remote = KVLayout.from_dict(lp.layout)
                segments = leg.slice.segments(remote, lp.block_ids, region_blocks, lp.num_computed_tokens)
                if pull.region_state_slot >= 0:  # the state after the prompt, in the same read
                    segments += self.region.layout.state_segments_from(remote, lp.state_slot, pull.region_state_slot)
                leg.future = self.transfer.read(lp.engine_id, "kv", "kv", segments)
            except TransferError as e:
                self._end_pull(pull, f"KV pull from prefill engine {lp.engine_id} failed to start: {e}")
                return True
            leg.state = "pulling"
            pull.nbytes += sum(seg[2] for seg in segments)
            pull.segments += len(segments)
        return True

    def _check_state_handoff(self, pull: _Pull) -> None:
        """A model with a recurrent state resumes decoding from the prefill engine's state after
        the prompt: the params must name its staging slot, from one unsharded prefill engine
        (state models run tp=1; a state is not split by kv head). Raises HandshakeError."""
        if not self.region.has_state:
            return
        p = pull.params
        if len(pull.legs) != 1 or not pull.legs[0].slice or not pull.legs[0].slice.whole:
            raise HandshakeError(f"{self.config.model.architecture} keeps a recurrent state, which a tensor-parallel "
                                 f"prefill engine ({len(pull.legs)} shards) cannot hand off")
        if p.state_slot < 0:
            raise HandshakeError(f"kv_transfer_params from prefill engine {p.engine_id} carry no recurrent state "
                                 f"(state_slot), which {self.config.model.architecture} needs to resume decoding")
        if pull.request.state_slot is None:
            raise TransferError(f"request {pull.request.request_id} was allocated no state slot")

    def poll(self) -> PollResult:
        self._advance_all()
        result, self._result = self._result, PollResult()
        return result

    def _advance_all(self) -> None:
        self._reap_notifies()
        for rid, pull in list(self.active.items()):
            if self.active.get(rid) is pull:  # a peer's timeout may have ended it meanwhile
                self._advance(pull)

    def _advance(self, pull: _Pull) -> None:
        """Move each leg on (KV read -> pin re-read -> verified); end the pull when every leg is
        verified, or when one failed (the others' reads still drain before staging is reused)."""
        error = None
        for leg in pull.legs:
            while leg.future is not None:
                lp = leg.params
                try:
                    finished = leg.future.wait(0.0)
                except TransferError as e:
                    leg.future = None
                    if leg.state == "pulling":
                        self.transfer.disconnect(lp.engine_id)
                        self._peers.pop(lp.engine_id, None)
                    error = error or f"KV pull from prefill engine {lp.engine_id} failed: {e}"
                    break
                if not finished:
                    if time.monotonic() > pull.deadline:
                        return self._timeout_peer(lp.engine_id)
                    break
                leg.future = None
                if pull.state == "draining" or error is not None:
                    break
                error = self._verify_step(leg)
        if pull.state == "draining":
            return self._retire(pull)
        if error is not None:
            return self._end_pull(pull, error)
        if all(leg.state == "verified" for leg in pull.legs):
            self._end_pull(pull, None)

    def _verify_step(self, leg: Leg) -> str | None:
        """A leg's read finished: its data is here; was it still pinned when the read finished?
        Issues the pin re-read, or checks its result; returns an error or None."""
        lp = leg.params
        if leg.state == "pulling":
            leg.scratch = self._take_scratch()
            self.scratch[1, leg.scratch] = 0
            try:
                leg.future = self.transfer.read(lp.engine_id, "scratch", "ctrl",
                                                [(ctrl_offset(PIN, lp.slot, self._remote_slots(lp)),
                                                  (NUM_SCRATCH + leg.scratch) * 8, 8)])
            except TransferError as e:
                return f"KV pull from prefill engine {lp.engine_id} failed: {e}"
            leg.state = "verifying"
            return None
        leg.state = "verified"
        if int(self.scratch[1, leg.scratch]) != lp.nonce:
            return (f"prefill engine {lp.engine_id} released the KV blocks of its request {lp.request_id} before the "
                    f"pull finished (aborted there, or its pin timeout of {lp.pin_timeout_s}s passed); the copy was "
                    "discarded")
        return None

    def _remote_slots(self, p: KVTransferParams) -> int:
        mr = p.endpoint.get("mr_info", {}).get("ctrl", {})
        return int(mr.get("length", 2 * 4096 * 8)) // 16

    def _end_pull(self, pull: _Pull, error: str | None) -> None:
        """The pull is over: the request is ready (its KV is scattered into its cache blocks) or
        failed; its staging is freed once no read of it is in flight."""
        req, p = pull.request, pull.params
        if error is not None:
            self._fail(pull, error)
            return self._retire(pull)
        for leg in pull.legs:
            if leg.slice is None:
                continue
            if leg.slice.whole:  # the only shard read: its staging rows are cache blocks
                n = leg.slice.num_blocks(p.num_computed_tokens)
                self.region.stage_in(pull.region_blocks[:n], req.block_ids[:n], p.num_computed_tokens)
            else:  # one prefill rank's heads: into their head range of the cache blocks
                stage_in_slice(self.region.tensor, leg.slice, self.kv_cache, pull.region_blocks, req.block_ids,
                               p.num_computed_tokens)
        if pull.region_state_slot >= 0:
            # the decode step resumes from it (has_initial_state: num_computed_tokens > 0)
            self.region.stage_state_in(pull.region_state_slot, req.state_slot)
        self._retire(pull)
        req.metrics.first_token_time = req.metrics.first_token_time or time.perf_counter()
        self.migrations.append(MigrationRecord(req.request_id, p.engine_id, p.num_computed_tokens, len(req.block_ids),
                                               pull.segments, pull.nbytes, time.monotonic() - pull.started,
                                               sum(leg.slice is not None for leg in pull.legs)))
        self._landed(pull)

    def _landed(self, pull: _Pull) -> None:
        """The pull's KV is in the request's cache blocks: the prefill side may free its copy, and
        the request decodes from the next step on."""
        self._notify_all(pull)
        self._result.ready.append(pull.request)
        self.counts["pulled"] += 1

    def _retire(self, pull: _Pull) -> None:
        """Free the pull's staging blocks and scratch slots, or, while a read of it is still in
        flight (it lands in that staging), keep it draining until the read has ended."""
        if pull.in_flight():
            pull.state = "draining"
            return
        if self.active.get(pull.request.request_id) is pull:
            del self.active[pull.request.request_id]
        self.region.release(pull.region_blocks)
        pull.region_blocks = []
        self.region.release_state(pull.region_state_slot)
        pull.region_state_slot = -1
        for leg in pull.legs:
            if leg.scratch >= 0:
                self._free_scratch.append(leg.scratch)
                leg.scratch = -1

    def _timeout_peer(self, engine_id: str) -> None:
        """A pull from `engine_id` is past its deadline: shut the endpoint down (DLSlime then never
        completes nor writes the stalled reads) and fail every pull from that engine."""
        logger.warning("decode %s: KV pull from %s timed out after %.1fs; dropping the connection",
                       self.engine_id, engine_id, self.pull_timeout_s)
        self.transfer.disconnect(engine_id)
        self._peers.pop(engine_id, None)
        for pull in [x for x in self.active.values() if any(leg.params.engine_id == engine_id for leg in x.legs)]:
            # the abandoned reads may still land: their staging and scratch slots are never reused
            self.region.quarantine(pull.region_blocks)
            pull.region_blocks = []
            pull.region_state_slot = -1  # not released: quarantined with the blocks
            for leg in pull.legs:
                if leg.params.engine_id == engine_id:
                    leg.future, leg.scratch = None, -1
            if pull.state == "draining":
                self._retire(pull)
            else:
                self._end_pull(pull, f"KV transfer from prefill engine {engine_id} timed out after "
                                     f"{self.pull_timeout_s}s (peer stalled or network down)")

    def _fail(self, pull: _Pull, error: str) -> None:
        """Report the request failed (or to recompute) at the next poll and tell the prefill side
        it may free its blocks (the pull's staging is freed by _retire)."""
        req = pull.request
        self._notify_all(pull)  # best effort: the prefill side frees on its timeout otherwise
        if self.on_pull_failure == "recompute":
            # computed here instead, like a request preempted by recompute: it keeps the first
            # token the prefill engine sampled, and its next step prefills prompt + that token
            self.counts["recomputed"] += 1
            logger.warning("decode %s: request %s recomputes its prompt locally: %s", self.engine_id, req.request_id,
                           error)
            self.queue.pop(req.request_id, None)
            self._result.recompute.append(req)
            return
        self.counts["failed"] += 1
        logger.warning("decode %s: request %s failed: %s", self.engine_id, req.request_id, error)
        self._result.failed.append((req, error))

    def on_finish(self, request, reason: str) -> str:
        """A request ends (aborted, failed, or done decoding): a pull queued or in flight stops."""
        rid = request.request_id
        pull = self.active.get(rid)
        if pull is not None and pull.state != "draining":
            # the read lands in staging, never in the cache: the cache blocks are freed now (by
            # the scheduler), the staging blocks when the read has ended
            pull.state = "draining"
            self._notify_all(pull)
            self._retire(pull)
            return reason
        pull = self.queue.pop(rid, None)
        if pull is not None and pull.state != "failing":
            self._notify_all(pull)
        return reason

    def abort(self, request_id: str) -> bool:
        return False

    # ------------------------------------------------------------------ peers
    def _ensure_peer(self, p: KVTransferParams, expected: KVLayout) -> None:
        """Connect and handshake with a prefill engine (rank) once: read its handshake record over
        the transport and compare its model fingerprint with ours and its KV layout with
        `expected` (ours, or the shard of our heads a tensor-parallel rank holds)."""
        addr = (p.endpoint.get("host"), p.endpoint.get("port"))
        if self._peers.get(p.engine_id) == addr and self.transfer.is_connected(p.engine_id):
            if p.engine_id in self._incompatible:
                raise HandshakeError(self._incompatible[p.engine_id])
            return
        self._incompatible.pop(p.engine_id, None)
        self.transfer.connect(p.engine_id, p.endpoint)
        try:
            try:
                ok = self.transfer.read(p.engine_id, "meta_in", "meta", [(0, 0, META_BYTES)]).wait(self.pull_timeout_s)
            except TransferError as e:
                raise TransferError(f"cannot reach prefill engine {p.engine_id} at {addr[0]}:{addr[1]} (dead, or "
                                    f"not listening): {e}") from None
            if not ok:
                raise TransferError(f"handshake with prefill engine {p.engine_id} at {addr[0]}:{addr[1]} timed out "
                                    f"after {self.pull_timeout_s}s")
            record = read_record(self.meta_in)
            if record.get("fingerprint") != self.fingerprint:
                raise HandshakeError(
                    f"handshake with prefill engine {p.engine_id} failed: model fingerprints differ (prefill "
                    f"{record.get('architecture')} {record.get('fingerprint')}, this decode engine "
                    f"{self.config.model.architecture} {self.fingerprint}); both engines must load the same "
                    "checkpoint with the same dtype")
            remote = KVLayout.from_dict(record.get("layout", {}))
            try:
                expected.check_compatible(remote)
            except HandshakeError as e:
                raise HandshakeError(f"handshake with prefill engine {p.engine_id} failed: {e}") from None
            if record.get("engine_id") != p.engine_id:
                raise HandshakeError(f"kv_transfer_params name engine {p.engine_id!r} but {addr[0]}:{addr[1]} is "
                                     f"{record.get('engine_id')!r}")
        except HandshakeError as e:
            # stay connected: the prefill side is alive and can be told to free its blocks now
            # (its control slots are the same for any dlengine); later requests fail fast
            self._peers[p.engine_id] = addr
            self._incompatible[p.engine_id] = str(e)
            raise
        except (TransferError, ValueError) as e:
            self.transfer.disconnect(p.engine_id)
            raise e if isinstance(e, TransferError) else TransferError(f"bad handshake record: {e}") from None
        self._peers[p.engine_id] = addr

    def _take_scratch(self) -> int:
        if not self._free_scratch:
            self._reap_notifies(wait=True)
        return self._free_scratch.popleft()

    def _notify_all(self, pull: _Pull) -> None:
        for p in pull.ranks:
            self._notify_done(p)

    def _notify_done(self, p: KVTransferParams) -> None:
        """Tell the prefill engine it may free the request's blocks (one 8-byte one-sided write)."""
        if not self.transfer.is_connected(p.engine_id) or not self._free_scratch:
            return
        i = self._free_scratch.popleft()
        self.scratch[0, i] = p.nonce
        try:
            fut = self.transfer.write(p.engine_id, "scratch", "ctrl",
                                      [(ctrl_offset(DONE, p.slot, self._remote_slots(p)), i * 8, 8)])
        except TransferError:
            self._free_scratch.append(i)
            return
        self._notify.append((fut, i))

    def _reap_notifies(self, wait: bool = False) -> None:
        keep = []
        for fut, i in self._notify:
            if fut.done() or (wait and _safe_wait(fut)):
                self._free_scratch.append(i)
            else:
                keep.append((fut, i))
        self._notify = keep

    def describe(self) -> dict:
        return {"engine_id": self.engine_id, "transfer_backend": self.transfer.backend,
                "transfer_transport": self.transfer.transport, "kv_staging": self.region.staged,
                "queued": len(self.queue), "pulling": len(self.active),
                "quarantined_staging_blocks": self.region.num_quarantined, **self.counts}

    def close(self) -> None:
        if self.registration is not None:
            self.registration.close()
            self.registration = None
        self.transfer.close()


def _safe_wait(fut) -> bool:
    try:
        return fut.wait(1.0)
    except TransferError:
        return True
