"""The decode role: admit requests carrying kv_transfer_params, pull their KV, decode.

A migrated request goes through: queued (waiting for free blocks) -> pulling (one batched DLSlime
read of coalesced per-layer segments) -> verifying (re-read the prefill side's pin slot: if it
was released meanwhile the copy is discarded) -> running (handed to the scheduler with the prompt
counted as computed and the prefill's first token appended). The prefill side is told to free
its blocks (a one-sided write of the request's nonce into its done slot) as soon as the decode
side no longer needs them: after the pull, or when the request fails or is aborted.

Every failure ends the request with finish_reason "error" and a message saying what happened,
and frees every block it held here; this engine keeps serving the others. A pull that times out
shuts down the endpoint to that prefill engine (DLSlime then never completes the stalled read,
so its target blocks can be reused safely) and fails the other pulls from it.

Prefix caching on this side: not used for migrated prompts (the whole prompt is pulled); the
pulled blocks are published in the prefix cache, so later local prefills can hit them.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from dlengine.disagg.params import KVTransferParams, prompt_hash
from dlengine.disagg.prefill import DONE, META_BYTES, PIN
from dlengine.engine.sampler import skip_sampling_steps
from dlengine.parallel.transfer.base import HandshakeError, KVLayout, TransferError
from dlengine.parallel.transfer.kv_region import KVRegion
from dlengine.sampling_params import InvalidRequestError

logger = logging.getLogger("dlengine.disagg")
NUM_SCRATCH = 4096


@dataclass
class _Pull:
    request: object
    params: KVTransferParams
    queued_at: float
    region_blocks: list[int] = field(default_factory=list)
    future: object = None
    deadline: float = 0.0
    state: str = "queued"  # queued | pulling | verifying | draining
    scratch: int = -1
    started: float = 0.0
    nbytes: int = 0
    segments: int = 0


@dataclass
class MigrationRecord:
    request_id: str
    prefill_engine: str
    num_tokens: int
    num_blocks: int
    num_segments: int
    nbytes: int
    seconds: float  # from issuing the read to the pin check passing


class DecodeRole:
    name = "decode"

    def __init__(self, engine, transfer, engine_id: str, fingerprint: str, pull_timeout_s: float = 30.0,
                 queue_timeout_s: float = 60.0, staging_blocks: int | None = None,
                 on_pull_failure: str = "fail") -> None:
        self.engine = engine
        self.on_pull_failure = on_pull_failure
        self.transfer = transfer
        self.engine_id = engine_id
        self.fingerprint = fingerprint
        self.pull_timeout_s = pull_timeout_s
        self.queue_timeout_s = queue_timeout_s
        if staging_blocks == 0:
            from dlengine.config import ConfigError

            raise ConfigError("a decode engine always pulls into staging (staging_blocks=0 is for prefill engines): "
                              "a pull abandoned on timeout may still land late, and must not land in the cache")
        self.region = KVRegion(engine.kv_cache, engine.config.model, staging_blocks,
                               min_blocks=-(-engine.config.max_model_len // engine.kv_cache.block_size))
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
        self.queue: deque[_Pull] = deque()
        self.active: dict[str, _Pull] = {}  # request id -> pull in flight (pulling/verifying/draining)
        self.migrations: list[MigrationRecord] = []
        self.counts = {"pulled": 0, "failed": 0, "recomputed": 0}  # per request, by outcome
        self.registration = None  # a discovery.Registration when registered with a control plane

    # ------------------------------------------------------------------ admission
    def prepare(self, request) -> None:
        """Engine hook for a request added without kv_transfer_params: a decode engine computes
        it as a hybrid engine would, so there is nothing to set up."""

    def admit(self, request, kv_transfer_params) -> None:
        """Validate and queue a migrated request (called by Engine.add_request)."""
        p = KVTransferParams.from_dict(kv_transfer_params)
        if p.num_computed_tokens != request.num_prompt_tokens:
            raise InvalidRequestError(
                f"kv_transfer_params cover {p.num_computed_tokens} tokens but the prompt has "
                f"{request.num_prompt_tokens}; pass the same prompt to both engines")
        if p.prompt_hash != prompt_hash(request.prompt_token_ids):
            raise InvalidRequestError("kv_transfer_params were computed for another prompt (prompt hash differs)")
        if p.first_token >= self.engine.config.model.vocab_size:
            raise InvalidRequestError(f"kv_transfer_params first_token {p.first_token} is outside the vocabulary")
        KVLayout.from_dict(p.layout)  # malformed layout: HandshakeError now, not mid-pull
        request.append_token(p.first_token)
        # the prefill engine drew the first token's noise from this seed: draw past it here, so
        # seeded sampling continues exactly as on one engine
        skip_sampling_steps(request, self.engine.config.model.vocab_size, self.engine.config.device)
        self.queue.append(_Pull(request, p, time.monotonic()))

    def has_pending(self) -> bool:
        return bool(self.queue) or any(x.state != "draining" for x in self.active.values())

    # ------------------------------------------------------------------ the loop
    def before_step(self) -> list:
        outputs: list = []
        self._reap_notifies()
        for pull in list(self.active.values()):
            self._advance(pull, outputs)
        self._start_queued(outputs)
        return outputs

    def _start_queued(self, outputs: list) -> None:
        bm = self.engine.block_manager
        sched = self.engine.scheduler
        now = time.monotonic()
        while self.queue:
            pull = self.queue[0]
            req, p = pull.request, pull.params
            try:
                self._ensure_peer(p)
            except TransferError as e:
                self.queue.popleft()
                self._fail(pull, str(e), outputs)
                continue
            busy = len(sched.running) + len(sched.waiting) + len(self.active)
            n_blocks = bm.blocks_needed(p.num_computed_tokens)
            ok = busy < self.engine.config.scheduler.max_num_seqs and bm.allocate_slots(req, p.num_computed_tokens)
            if ok:
                region_blocks = self.region.allocate(req.block_ids)
                if region_blocks is None:
                    bm.free(req)
                    ok = False
            if not ok:
                if now - pull.queued_at > self.queue_timeout_s:
                    self.queue.popleft()
                    self._fail(pull, f"decode engine {self.engine_id} is out of KV blocks: waited "
                                     f"{now - pull.queued_at:.1f}s for {n_blocks} blocks ({bm.num_free_blocks} of "
                                     f"{bm.num_blocks} free, {busy} requests running)", outputs)
                    continue
                return  # first come first served: later requests wait behind this one
            self.queue.popleft()
            pull.region_blocks = region_blocks
            local = self.region.layout
            remote = KVLayout.from_dict(p.layout)
            segments = local.segments_from(remote, p.block_ids, region_blocks, p.num_computed_tokens)
            pull.nbytes = sum(s[2] for s in segments)
            pull.started = time.monotonic()
            pull.deadline = pull.started + self.pull_timeout_s
            self.active[req.request_id] = pull
            try:
                pull.future = self.transfer.read(p.engine_id, "kv", "kv", segments)
                pull.state = "pulling"
                pull.segments = len(segments)
            except TransferError as e:
                self.active.pop(req.request_id)
                self._fail(pull, f"KV pull from prefill engine {p.engine_id} failed to start: {e}", outputs)

    def _advance(self, pull: _Pull, outputs: list) -> None:
        p = pull.params
        try:
            finished = pull.future.wait(0.0)
        except TransferError as e:
            self.transfer.disconnect(p.engine_id)
            self._peers.pop(p.engine_id, None)
            return self._end_pull(pull, f"KV pull from prefill engine {p.engine_id} failed: {e}", outputs)
        if not finished:
            if time.monotonic() > pull.deadline:
                self._timeout_peer(p.engine_id, outputs)
            return
        if pull.state == "draining":
            return self._end_pull(pull, None, outputs)
        if pull.state == "pulling":  # data is here; was it still pinned when the read finished?
            pull.scratch = self._take_scratch()
            self.scratch[1, pull.scratch] = 0
            try:
                pull.future = self.transfer.read(p.engine_id, "scratch", "ctrl",
                                                 [((PIN * self._remote_slots(p) + p.slot) * 8, (NUM_SCRATCH + pull.scratch) * 8, 8)])
            except TransferError as e:
                return self._end_pull(pull, f"KV pull from prefill engine {p.engine_id} failed: {e}", outputs)
            pull.state = "verifying"
            return self._advance(pull, outputs)
        # verifying done
        pinned = int(self.scratch[1, pull.scratch]) == p.nonce
        if not pinned:
            return self._end_pull(pull, f"prefill engine {p.engine_id} released the KV blocks of its request "
                                        f"{p.request_id} before the pull finished (aborted there, or its pin timeout of "
                                        f"{p.pin_timeout_s}s passed); the copy was discarded", outputs)
        self._end_pull(pull, None, outputs)

    def _remote_slots(self, p: KVTransferParams) -> int:
        mr = p.endpoint.get("mr_info", {}).get("ctrl", {})
        return int(mr.get("length", 2 * 4096 * 8)) // 16

    def _end_pull(self, pull: _Pull, error: str | None, outputs: list) -> None:
        req, p = pull.request, pull.params
        self.active.pop(req.request_id, None)
        if pull.scratch >= 0:
            self._free_scratch.append(pull.scratch)
            pull.scratch = -1
        if pull.state == "draining":  # aborted here while the read ran: only now is its staging reusable
            self.region.release(pull.region_blocks)
            return
        if error is not None:
            return self._fail(pull, error, outputs)
        self.region.stage_in(pull.region_blocks, req.block_ids, p.num_computed_tokens)
        self.region.release(pull.region_blocks)
        self._notify_done(p)
        req.num_computed_tokens = p.num_computed_tokens
        req.metrics.num_cached_tokens = p.num_computed_tokens
        req.metrics.first_token_time = req.metrics.first_token_time or time.perf_counter()
        self.engine.block_manager.cache_full_blocks(req)
        self.engine.scheduler.add_running(req)
        self.migrations.append(MigrationRecord(req.request_id, p.engine_id, p.num_computed_tokens, len(req.block_ids),
                                               pull.segments, pull.nbytes,
                                               time.monotonic() - pull.started))
        self.counts["pulled"] += 1

    def _timeout_peer(self, engine_id: str, outputs: list) -> None:
        """A pull from `engine_id` is past its deadline: shut the endpoint down (DLSlime then never
        completes nor writes the stalled reads) and fail every pull from that engine."""
        logger.warning("decode %s: KV pull from %s timed out after %.1fs; dropping the connection",
                       self.engine_id, engine_id, self.pull_timeout_s)
        self.transfer.disconnect(engine_id)
        self._peers.pop(engine_id, None)
        for pull in [x for x in self.active.values() if x.params.engine_id == engine_id]:
            # the abandoned reads may still land: their staging and scratch slots are never reused
            self.region.quarantine(pull.region_blocks)
            pull.region_blocks = []
            pull.scratch = -1
            if pull.state == "draining":
                self._end_pull(pull, None, outputs)
            else:
                self._end_pull(pull, f"KV transfer from prefill engine {engine_id} timed out after "
                                     f"{self.pull_timeout_s}s (peer stalled or network down)", outputs)

    def _fail(self, pull: _Pull, error: str, outputs: list) -> None:
        req = pull.request
        self.region.release(pull.region_blocks)
        pull.region_blocks = []
        self._notify_done(pull.params)  # best effort: the prefill side frees on its timeout otherwise
        if self.on_pull_failure == "recompute":
            return self._recompute(req, error)
        self.counts["failed"] += 1
        req.error = error
        logger.warning("decode %s: request %s failed: %s", self.engine_id, req.request_id, error)
        self.engine._finish(req, "error")  # frees the request's blocks here
        outputs.append(self.engine._output(req, []))

    def _recompute(self, req, error: str) -> None:
        """on_pull_failure="recompute": the prompt is computed here instead. The request keeps the
        first token the prefill engine sampled (as a request preempted by recompute keeps its
        output) and joins the scheduler's waiting queue with nothing computed, so its next step
        prefills prompt + that token locally and decoding goes on."""
        self.counts["recomputed"] += 1
        logger.warning("decode %s: request %s recomputes its prompt locally: %s", self.engine_id, req.request_id, error)
        self.engine.block_manager.free(req)  # blocks allocated for the pull, if it got that far
        req.num_computed_tokens = 0
        req.metrics.num_cached_tokens = 0
        self.engine.scheduler.add_request(req)

    # ------------------------------------------------------------------ aborts
    def on_finish(self, request, reason: str) -> str:
        """Engine._finish hook: an abort of a request whose pull is queued or in flight."""
        rid = request.request_id
        pull = self.active.get(rid)
        if pull is not None and pull.state != "draining":
            # the read lands in staging, never in the cache: the cache blocks are freed now (by
            # the scheduler), the staging blocks when the read has ended
            pull.state = "draining"
            self._notify_done(pull.params)
            return reason
        for pull in list(self.queue):
            if pull.request is request:
                self.queue.remove(pull)
                self._notify_done(pull.params)
        return reason

    def abort(self, request_id: str) -> bool:
        return False

    # ------------------------------------------------------------------ peers
    def _ensure_peer(self, p: KVTransferParams) -> None:
        """Connect and handshake with a prefill engine once: read its handshake record over the
        transport and compare model fingerprint and KV layout with ours."""
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
            raw = bytes(self.meta_in.tolist())
            n = int.from_bytes(raw[:4], "little")
            record = json.loads(raw[4:4 + n].decode())
            if record.get("fingerprint") != self.fingerprint:
                raise HandshakeError(
                    f"handshake with prefill engine {p.engine_id} failed: model fingerprints differ (prefill "
                    f"{record.get('architecture')} {record.get('fingerprint')}, this decode engine "
                    f"{self.engine.config.model.architecture} {self.fingerprint}); both engines must load the same "
                    "checkpoint with the same dtype")
            remote = KVLayout.from_dict(record.get("layout", {}))
            try:
                self.region.layout.check_compatible(remote)
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

    def _notify_done(self, p: KVTransferParams) -> None:
        """Tell the prefill engine it may free the request's blocks (one 8-byte one-sided write)."""
        if not self.transfer.is_connected(p.engine_id) or not self._free_scratch:
            return
        i = self._free_scratch.popleft()
        self.scratch[0, i] = p.nonce
        try:
            fut = self.transfer.write(p.engine_id, "scratch", "ctrl", [((DONE * self._remote_slots(p) + p.slot) * 8, i * 8, 8)])
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
