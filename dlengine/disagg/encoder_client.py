"""The pulling side of encode-prefill-decode: a prefill (or hybrid) engine's front, given a request
with images or videos and an encoder engine's `ec_transfer_params`, reads their embeddings over
DLSlime and sets them on the request's images and videos (`ImageInput.embeddings`,
`VideoInput.embeddings`), so the model skips its vision tower for them (models/qwen3_vl.py
`encode_images`).

One pull per request: check the params against the request's own images and videos (content
hashes, token counts, embedding shape) -> connect and handshake once per encoder (its "ec_meta" record:
engine id and model fingerprint) -> read the request's run of the encoder's "ec" region into a
run of our receive region -> re-read the encoder's pin slot (a release that raced the read is
detected, the copy discarded) -> copy the embeddings out, free our run, and write the nonce into
the encoder's done slot so it frees its run at once.

Each stage is one non-blocking DLSlime future, advanced by `poll()`: the engine front starts a
pull in `add_request` (`start`) and polls every step, holding the request out of the scheduler
meanwhile, so its other requests keep running while the embeddings travel (as a decode engine's
requests wait in WAITING_FOR_REMOTE_KV for their KV). `pull()` drives the same state machine to
its end on the calling thread (encoder_cache(pull_mode="sync")).

Failures end the pull with an error naming the encoder and what happened, after freeing what it
held: our receive run (quarantined instead after a timeout: the abandoned read may still land),
and the encoder's run (told through its done slot when it is reachable; its pin timeout frees it
otherwise). A timeout drops the endpoint to that encoder, which ends its other pulls in flight
the same way. An aborted pull keeps its receive run until its read has landed (or timed out):
the bytes may still arrive, so the run cannot be handed out before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from dlengine.disagg.ec_params import EncoderTransferParams, check_inputs
from dlengine.disagg.ec_staging import ChunkedStaging
from dlengine.disagg.encoder import META_BYTES
from dlengine.disagg.pin_table import DONE, PIN, ctrl_offset
from dlengine.disagg.records import read_record
from dlengine.parallel.transfer.errors import HandshakeError, TransferError

logger = logging.getLogger("dlengine.disagg")
NUM_SCRATCH = 256  # pulls verifying or notifying at once (each holds one column: its nonce, its pin re-read)
NUM_META = 4  # handshakes in flight at once (each reads one encoder's record into its own slot)
NOTIFY_TIMEOUT_S = 1.0  # a done-slot write not finished by then is given up (the pin timeout frees the run)


class EncoderPullError(TransferError):
    """The image or video embeddings of a request could not be pulled from its encoder engine."""


@dataclass
class PullOutcome:
    """How a pull ended, reported once by `poll()`."""

    request_id: str
    pulled: bool  # the embeddings are set on the request's images and videos
    error: str | None = None  # why it failed (None when pulled)
    encode_locally: bool = False  # failed, and on_pull_failure="local": encode the images and videos here


@dataclass
class _Pull:
    request_id: str
    params: EncoderTransferParams
    multimodal: object
    where: str  # "encoder engine X at host:port", for messages
    deadline: float  # of the stage in flight (each stage gets pull_timeout_s, as the synchronous pull did)
    state: str = "connecting"  # connecting | reading | verifying
    future: object = None
    run: tuple[int, int] | None = None  # our receive run
    scratch: int = -1  # its column of the scratch region (verifying)
    aborted: bool = False  # the request is gone: finish the read, then free the run and tell the encoder


@dataclass
class _Handshake:
    engine_id: str
    addr: tuple
    where: str
    future: object
    slot: int  # of meta_in
    deadline: float
    waiting: list[str] = field(default_factory=list)  # request ids of the pulls it gates


class EncoderCacheClient:
    def __init__(self, config, transfer) -> None:
        """`config`: the pulling engine's EngineConfig; `transfer`: a TransferEngine of its own."""
        from dlengine.parallel.transfer import model_fingerprint

        self.config = config
        self.options = config.encoder_cache
        self.transfer = transfer
        self.fingerprint = model_fingerprint(config.model, config.dtype, config.load_format, config.seed)
        vc = config.model.hf_config.get("vision_config") or {}
        self.hidden_size = int(vc.get("out_hidden_size", 0))
        self.num_levels = 1 + len(vc.get("deepstack_visual_indexes") or [])
        self.staging = ChunkedStaging(self.options.staging_bytes)
        # row 0: nonces to write into done slots; row 1: pin re-reads. One column per pull.
        self.scratch = torch.zeros((2, NUM_SCRATCH), dtype=torch.int64)
        self.meta_in = torch.zeros(NUM_META * META_BYTES, dtype=torch.uint8)
        transfer.register_region("ec_in", self.staging.tensor)
        transfer.register_region("ec_scratch", self.scratch)
        transfer.register_region("ec_meta_in", self.meta_in)
        self._free_scratch = deque(range(NUM_SCRATCH))
        self._free_meta = deque(range(NUM_META))
        self._peers: dict[str, tuple] = {}  # encoder engine id -> (host, port) handshaken
        self._incompatible: dict[str, str] = {}  # encoder engine id -> why its handshake failed
        self._handshakes: dict[str, _Handshake] = {}  # encoder engine id -> handshake in flight
        self._pulls: dict[str, _Pull] = {}  # request id -> pull in flight (aborted ones until their read lands)
        self._notify: list[tuple[object, int, float]] = []  # (future, scratch column, deadline) of done-writes
        self._outcomes: list[PullOutcome] = []  # what the next poll() reports
        self._lock = threading.Lock()
        self._sync_ids = 0
        self._aborted_ids = 0
        self.counts = {"pulled": 0, "failed": 0, "encoded_locally": 0, "bytes": 0}

    # ------------------------------------------------------------------ the front's API
    def start(self, request_id: str, raw_params, multimodal) -> None:
        """Check the params against `multimodal`'s images and videos (a mismatch raises
        InvalidRequestError, nothing started) and start pulling; never blocks. `poll()` reports
        the outcome."""
        p = EncoderTransferParams.from_dict(raw_params)
        check_inputs(p, multimodal, self.hidden_size, self.num_levels)
        where = f"encoder engine {p.engine_id} at {p.endpoint.get('host')}:{p.endpoint.get('port')}"
        with self._lock:
            pull = _Pull(request_id, p, multimodal, where, time.monotonic() + self.options.pull_timeout_s)
            self._pulls[request_id] = pull
            self._begin(pull)

    def poll(self) -> list[PullOutcome]:
        """Advance every pull (never blocks) and return the ones that ended since the last call."""
        with self._lock:
            now = time.monotonic()
            for hs in list(self._handshakes.values()):
                self._advance_handshake(hs, now)
            for pull in list(self._pulls.values()):
                if pull.request_id in self._pulls:  # a timeout above may have ended it
                    self._advance(pull, now)
            self._reap_notifies(now)
            out, self._outcomes = self._outcomes, []
        return out

    def abort(self, request_id: str) -> bool:
        """The request is gone: stop its pull. A read in flight keeps its receive run until it
        lands (or times out); the encoder is told to free its run once nothing reads it."""
        with self._lock:
            pull = self._pulls.get(request_id)
            if pull is None:
                return False
            if pull.state == "connecting":
                self._detach_from_handshake(pull)
                self._end(pull, None)  # nothing of ours in flight; the encoder is told if reachable
            else:
                # drains under a key of its own: the request id may be used again meanwhile
                pull.aborted = True
                self._aborted_ids += 1
                pull.request_id = f"\0aborted-{self._aborted_ids}"
                self._pulls[pull.request_id] = self._pulls.pop(request_id)
            self._outcomes = [o for o in self._outcomes if o.request_id != request_id]
            return True

    def pull(self, raw_params, multimodal) -> bool:
        """The pull driven to its end on this thread. True when the embeddings are set; False
        when it failed and the images and videos will be encoded here
        (on_pull_failure="local"); raises EncoderPullError otherwise (InvalidRequestError for
        params that do not match)."""
        self._sync_ids += 1
        rid = f"\0sync-{self._sync_ids}"  # never a request id the front hands out
        self.start(rid, raw_params, multimodal)
        while True:
            for o in self.poll():
                if o.request_id == rid:
                    self._drain_notifies()
                    if o.pulled or o.encode_locally:
                        return o.pulled
                    raise EncoderPullError(o.error)
            self._wait_a_little(rid)

    @property
    def busy(self) -> bool:
        """Something is in flight: a pull (aborted ones until their read lands) or a done-slot
        write. The engine keeps stepping until it is not, so every buffer is freed."""
        return bool(self._pulls or self._notify)

    def describe(self) -> dict:
        return {"receive_bytes": self.staging.nbytes, "receive_free_bytes": self.staging.free_bytes,
                "quarantined_bytes": self.staging.num_quarantined_bytes, "in_flight": len(self._pulls),
                "notifying": len(self._notify),
                **self.counts}

    def close(self) -> None:
        self.transfer.close()

    # ------------------------------------------------------------------ stages
    def _begin(self, pull: _Pull) -> None:
        p = pull.params
        if p.engine_id in self._incompatible:
            return self._fail(pull, self._incompatible[p.engine_id])  # its run is freed now through the done slot
        addr = (p.endpoint.get("host"), p.endpoint.get("port"))
        if self._peers.get(p.engine_id) == addr and self.transfer.is_connected(p.engine_id):
            return self._issue_read(pull)
        hs = self._handshakes.get(p.engine_id)
        if hs is not None:
            if hs.addr == addr:
                hs.waiting.append(pull.request_id)  # one handshake per encoder, however many pulls wait
                return
            return self._fail(pull, f"a handshake with encoder engine {p.engine_id} at another address "
                                    f"({hs.addr[0]}:{hs.addr[1]}) is in flight; retry once it ended")
        waiting = [pull.request_id]
        if not self._free_meta:
            return self._fail(pull, f"too many encoder handshakes in flight to reach {pull.where}; retry")
        slot = self._free_meta.popleft()
        try:
            self._peers.pop(p.engine_id, None)
            self.transfer.connect(p.engine_id, p.endpoint)
            future = self.transfer.read(p.engine_id, "ec_meta_in", "ec_meta", [(0, slot * META_BYTES, META_BYTES)])
        except TransferError as e:
            self._free_meta.append(slot)
            self._drop_peer(p.engine_id)
            for rid in waiting:
                if rid in self._pulls:
                    self._fail(self._pulls[rid], f"cannot reach {pull.where} (dead, or not listening): {e}")
            return
        self._handshakes[p.engine_id] = _Handshake(p.engine_id, addr, pull.where, future, slot,
                                                   time.monotonic() + self.options.pull_timeout_s, waiting)

    def _advance_handshake(self, hs: _Handshake, now: float) -> None:
        try:
            ok = hs.future.wait(0.0)
        except TransferError as e:
            return self._handshake_failed(hs, f"cannot reach {hs.where} (dead, or not listening): {e}", drop=True)
        if not ok:
            if now > hs.deadline:
                self._handshake_failed(hs, f"handshake with {hs.where} timed out after "
                                           f"{self.options.pull_timeout_s}s", drop=True)
            return
        try:
            record = read_record(self.meta_in[hs.slot * META_BYTES:(hs.slot + 1) * META_BYTES])
        except ValueError as e:
            return self._handshake_failed(hs, f"bad handshake record from {hs.where}: {e}", drop=True)
        if record.get("engine_id") != hs.engine_id or record.get("role") != "encode":
            return self._handshake_failed(hs, f"ec_transfer_params name encoder engine {hs.engine_id!r} but "
                                              f"{hs.addr[0]}:{hs.addr[1]} is {record.get('role')} engine "
                                              f"{record.get('engine_id')!r}", drop=True)
        if record.get("fingerprint") != self.fingerprint:
            # alive but another model: keep the endpoint to tell it to free the runs it holds for us
            error = (f"handshake with {hs.where} failed: model fingerprints differ (encoder "
                     f"{record.get('fingerprint')}, this engine {self.fingerprint}); both must load the same "
                     "checkpoint with the same dtype")
            self._incompatible[hs.engine_id] = error
            return self._handshake_failed(hs, error, drop=False)
        self._handshakes.pop(hs.engine_id)
        self._free_meta.append(hs.slot)
        self._peers[hs.engine_id] = hs.addr
        for rid in hs.waiting:
            pull = self._pulls.get(rid)
            if pull is not None:
                pull.deadline = now + self.options.pull_timeout_s
                self._issue_read(pull)

    def _handshake_failed(self, hs: _Handshake, error: str, drop: bool) -> None:
        """End the pulls waiting for a handshake. `drop`: shut the endpoint down (DLSlime then never
        completes a stalled meta read, so its slot can be reused); kept for an encoder that answered
        but runs another model, so each pull's done-slot write frees its run there at once."""
        self._handshakes.pop(hs.engine_id, None)
        self._free_meta.append(hs.slot)
        if drop:
            self._drop_peer(hs.engine_id)
        for rid in hs.waiting:
            pull = self._pulls.get(rid)
            if pull is not None:
                self._fail(pull, error)

    def _issue_read(self, pull: _Pull) -> None:
        p = pull.params
        if pull.aborted:
            return self._end(pull, None)
        run = self.staging.allocate(p.nbytes)
        if run is None:
            return self._fail(pull, f"this engine's receive region for embeddings is full ({p.nbytes} bytes "
                                    f"needed, {self.staging.free_bytes} of {self.staging.nbytes} free): raise "
                                    "encoder_cache(staging_bytes=...)")
        pull.run = run
        # the encoder's tensors lie back to back (ec_params.py): one run here, the same layout
        first = p.items[0].offset
        segments = [(x.offset, run[0] + (x.offset - first), p.item_nbytes(x)) for x in p.items]
        pull.state = "reading"
        try:
            pull.future = self.transfer.read(p.engine_id, "ec_in", "ec", segments)
        except TransferError as e:
            pull.future = None
            self._stage_failed(pull, f"reading the embeddings from {pull.where} failed: {e}")

    def _advance(self, pull: _Pull, now: float) -> None:
        if pull.state == "connecting":
            return  # its handshake advances it
        if pull.future is not None:
            what = "reading the embeddings from" if pull.state == "reading" else "re-reading the pin slot of"
            try:
                ok = pull.future.wait(0.0)
            except TransferError as e:
                pull.future = None
                return self._stage_failed(pull, f"{what} {pull.where} failed: {e}")
            if not ok:
                if now > pull.deadline:
                    self._timed_out(pull)
                return
            pull.future = None
            if pull.aborted:
                return self._end(pull, None)  # the read landed: its run can be handed out again
        p = pull.params
        if pull.state == "reading":  # the embeddings landed: re-read the pin slot
            if pull.aborted:
                return self._end(pull, None)
            if not self._free_scratch:
                return  # every column is busy: verify on a later poll
            pull.scratch = self._free_scratch.popleft()
            self.scratch[1, pull.scratch] = 0
            pull.state = "verifying"
            pull.deadline = now + self.options.pull_timeout_s
            try:
                pull.future = self.transfer.read(p.engine_id, "ec_scratch", "ec_ctrl",
                                                 [(ctrl_offset(PIN, p.slot, p.num_slots),
                                                   (NUM_SCRATCH + pull.scratch) * 8, 8)])
            except TransferError as e:
                pull.future = None
                self._stage_failed(pull, f"re-reading the pin slot of {pull.where} failed: {e}")
            return
        # verifying: the pin slot still holds our nonce, so the bytes read are the embeddings
        if int(self.scratch[1, pull.scratch]) != p.nonce:
            return self._stage_failed(pull, f"{pull.where} released the embeddings of its request {p.request_id} "
                                            f"before the pull finished (freed there, or its pin timeout of "
                                            f"{p.pin_timeout_s}s passed); the copy was discarded",
                                      endpoint_broke=False)
        dtype, first = p.torch_dtype, p.items[0].offset
        # images, then videos: the order of both the params' items and the request's visual inputs
        for x, target in zip(p.items, pull.multimodal.visual_inputs):
            local = pull.run[0] + (x.offset - first)
            target.embeddings = self.staging.view(local, dtype, (p.num_levels, x.num_tokens, p.hidden_size)).clone()
        self.counts["pulled"] += 1
        self.counts["bytes"] += p.nbytes
        self._end(pull, PullOutcome(pull.request_id, pulled=True))

    # ------------------------------------------------------------------ endings
    def _end(self, pull: _Pull, outcome: PullOutcome | None) -> None:
        """Free what the pull holds (its run, its scratch column) and tell the encoder to free its
        run; report `outcome` unless the pull was aborted."""
        self._pulls.pop(pull.request_id, None)
        if pull.run is not None:
            self.staging.release(pull.run)
            pull.run = None
        self._notify_done(pull.params, pull.scratch)
        pull.scratch = -1
        if outcome is not None and not pull.aborted:
            self._outcomes.append(outcome)

    def _fail(self, pull: _Pull, error: str) -> None:
        """End a pull with nothing of ours in flight (its run, if any, is free to reuse)."""
        self._end(pull, self._failure(pull, error))

    def _stage_failed(self, pull: _Pull, error: str, endpoint_broke: bool = True) -> None:
        """A read finished with an error, or the pin check failed: nothing will land in the pull's
        run any more, so it is freed. `endpoint_broke`: the endpoint goes (the next pull
        reconnects), and with it the other pulls through it."""
        if endpoint_broke:
            self._drop_peer(pull.params.engine_id)  # first: no done-slot write goes through a broken endpoint
        self._end(pull, self._failure(pull, error))
        if endpoint_broke:
            self._break_endpoint(pull.params.engine_id, f"the connection to {pull.where} failed ({error})")

    def _timed_out(self, pull: _Pull) -> None:
        """A read passed its deadline: shut the endpoint down (DLSlime then never completes the
        stalled read) and never hand out the runs it targeted again."""
        self._break_endpoint(pull.params.engine_id, f"pulling embeddings from {pull.where} timed out after "
                                                    f"{self.options.pull_timeout_s}s (peer stalled or network down)")

    def _break_endpoint(self, engine_id: str, error: str) -> None:
        """Drop the endpoint to an encoder and end every pull whose reads went through it: a run
        with a read still in flight is quarantined for good (nothing in DLSlime's contract says an
        abandoned read cannot land later), one whose read landed is freed."""
        self._drop_peer(engine_id)
        for q in [q for q in self._pulls.values() if q.params.engine_id == engine_id and q.state != "connecting"]:
            if q.run is not None and q.future is not None:
                self.staging.quarantine(q.run)
                q.run = None  # never released
            q.future = None
            self._end(q, self._failure(q, error))

    def _failure(self, pull: _Pull, error: str) -> PullOutcome | None:
        if pull.aborted:
            return None  # nobody waits for it: its request is gone
        self.counts["failed"] += 1
        if self.options.on_pull_failure == "local":
            self.counts["encoded_locally"] += 1
            logger.warning("embeddings from %s could not be pulled (%s); encoding locally", pull.where, error)
            return PullOutcome(pull.request_id, pulled=False, error=error, encode_locally=True)
        return PullOutcome(pull.request_id, pulled=False, error=error)

    def _detach_from_handshake(self, pull: _Pull) -> None:
        hs = self._handshakes.get(pull.params.engine_id)
        if hs is not None and pull.request_id in hs.waiting:
            hs.waiting.remove(pull.request_id)

    # ------------------------------------------------------------------ the encoder's done slot
    def _notify_done(self, p: EncoderTransferParams, column: int = -1) -> None:
        """Tell the encoder it may free the request's run: one 8-byte one-sided write, not waited
        for here (best effort: its pin timeout frees the run otherwise). `column`: the pull's
        scratch column, kept until the write is done; -1 takes a free one."""
        if column < 0:
            if not self._free_scratch:
                return
            column = self._free_scratch.popleft()
        if not self.transfer.is_connected(p.engine_id):
            self._free_scratch.append(column)
            return
        self.scratch[0, column] = p.nonce
        try:
            future = self.transfer.write(p.engine_id, "ec_scratch", "ec_ctrl",
                                         [(ctrl_offset(DONE, p.slot, p.num_slots), column * 8, 8)])
        except TransferError:
            self._free_scratch.append(column)
            return
        self._notify.append((future, column, time.monotonic() + NOTIFY_TIMEOUT_S))

    def _reap_notifies(self, now: float) -> None:
        keep = []
        for future, column, deadline in self._notify:
            try:
                done = future.wait(0.0)
            except TransferError:
                done = True
            if done or now > deadline:
                # a write given up on may still read its column later: it reads the same nonce,
                # which is harmless, but the column is only reused after the deadline
                self._free_scratch.append(column)
            else:
                keep.append((future, column, deadline))
        self._notify = keep

    def _drain_notifies(self) -> None:
        """Wait (each at most NOTIFY_TIMEOUT_S) for the done-slot writes in flight: a synchronous
        pull returns with the encoder told to free its run, as the pull always did."""
        while self._notify:
            future, _, deadline = self._notify[0]
            try:
                future.wait(max(0.0, deadline - time.monotonic()) + 0.001)
            except TransferError:
                pass
            with self._lock:
                self._reap_notifies(time.monotonic())

    def _wait_a_little(self, request_id: str) -> None:
        """Block briefly on what the synchronous pull `request_id` waits for (instead of spinning)."""
        pull = self._pulls.get(request_id)
        future = None
        if pull is not None:
            future = pull.future if pull.state != "connecting" else getattr(
                self._handshakes.get(pull.params.engine_id), "future", None)
        if future is None:
            time.sleep(0.001)
            return
        try:
            future.wait(0.05)
        except TransferError:
            pass  # poll() reports it

    def _drop_peer(self, engine_id: str) -> None:
        self.transfer.disconnect(engine_id)
        self._peers.pop(engine_id, None)
