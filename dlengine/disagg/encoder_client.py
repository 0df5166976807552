"""The pulling side of encode-prefill-decode: a prefill (or hybrid) engine's front, given a request
with images and an encoder engine's `ec_transfer_params`, reads the images' embeddings over
DLSlime and sets them on the request's images (`ImageInput.embeddings`), so the model skips its
vision tower for them (models/qwen3_vl.py `encode_images`).

One pull, when the request is added (`Engine.add_request(..., ec_transfer_params=...)`):
check the params against the request's own images (content hashes, token counts, embedding
shape) -> connect and handshake once per encoder (its "ec_meta" record: engine id and model
fingerprint) -> read the request's run of the encoder's "ec" region into a run of our receive
region -> re-read the encoder's pin slot (a release that raced the read is detected, the copy
discarded) -> copy the embeddings out, free our run, and write the nonce into the encoder's done
slot so it frees its run at once.

Failures end the pull with `EncoderPullError` naming the encoder and what happened, after
freeing what it held: our receive run (quarantined instead after a timeout: the abandoned read
may still land), and the encoder's run (told through its done slot when it is reachable; its pin
timeout frees it otherwise). With `on_pull_failure="local"` the request is encoded here instead.
The pull is synchronous: it runs on the thread adding the request (on loopback TCP about a
millisecond per MB).
"""

from __future__ import annotations

import json
import logging
import threading

import torch

from dlengine.disagg.ec_params import EncoderTransferParams, check_images
from dlengine.disagg.ec_staging import ChunkedStaging
from dlengine.disagg.encoder import DONE, META_BYTES, PIN
from dlengine.parallel.transfer.errors import HandshakeError, TransferError

logger = logging.getLogger("dlengine.disagg")


class EncoderPullError(TransferError):
    """The image embeddings of a request could not be pulled from its encoder engine."""


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
        self.scratch = torch.zeros((2, 64), dtype=torch.int64)  # row 0: nonces to write, row 1: pin re-reads
        self.meta_in = torch.zeros(META_BYTES, dtype=torch.uint8)
        transfer.register_region("ec_in", self.staging.tensor)
        transfer.register_region("ec_scratch", self.scratch)
        transfer.register_region("ec_meta_in", self.meta_in)
        self._peers: dict[str, tuple] = {}  # encoder engine id -> (host, port) handshaken
        self._lock = threading.Lock()
        self.counts = {"pulled": 0, "failed": 0, "encoded_locally": 0, "bytes": 0}

    def pull(self, raw_params, multimodal) -> bool:
        """Pull the embeddings of `multimodal`'s images (checked against the params first: a
        mismatch raises InvalidRequestError). True when they are set; False when the pull failed
        and the images will be encoded here (on_pull_failure="local"); raises EncoderPullError
        otherwise."""
        p = EncoderTransferParams.from_dict(raw_params)
        check_images(p, multimodal, self.hidden_size, self.num_levels)
        with self._lock:
            try:
                embeddings = self._pull(p)
            except TransferError as e:
                self.counts["failed"] += 1
                if self.options.on_pull_failure == "local":
                    self.counts["encoded_locally"] += 1
                    logger.warning("image embeddings from encoder %s could not be pulled (%s); encoding locally",
                                   p.engine_id, e)
                    return False
                raise EncoderPullError(str(e)) from None
        for im, emb in zip(multimodal.images, embeddings):
            im.embeddings = emb
        self.counts["pulled"] += 1
        self.counts["bytes"] += p.nbytes
        return True

    # ------------------------------------------------------------------ one pull
    def _pull(self, p: EncoderTransferParams) -> list[torch.Tensor]:
        where = f"encoder engine {p.engine_id} at {p.endpoint.get('host')}:{p.endpoint.get('port')}"
        try:
            self._ensure_peer(p, where)
        except TransferError:
            self._notify_done(p)  # an incompatible (but alive) encoder frees its run now
            raise
        run = self.staging.allocate(p.nbytes)
        if run is None:
            self._notify_done(p)
            raise TransferError(f"this engine's receive region for image embeddings is full ({p.nbytes} bytes "
                                f"needed, {self.staging.free_bytes} of {self.staging.nbytes} free): raise "
                                "encoder_cache(staging_bytes=...)")
        timeout = self.options.pull_timeout_s
        try:
            segments = [(im.offset, run[0] + (im.offset - p.images[0].offset),
                         im.nbytes(p.num_levels, p.hidden_size, p.torch_dtype)) for im in p.images]
            self._wait(self.transfer.read(p.engine_id, "ec_in", "ec", segments), timeout,
                       f"reading the image embeddings from {where}", p, run)
            self.scratch[1, 0] = 0
            self._wait(self.transfer.read(p.engine_id, "ec_scratch", "ec_ctrl",
                                          [((PIN * p.num_slots + p.slot) * 8, (64 + 0) * 8, 8)]), timeout,
                       f"re-reading the pin slot of {where}", p, run)
            if int(self.scratch[1, 0]) != p.nonce:
                raise TransferError(f"{where} released the embeddings of its request {p.request_id} before the pull "
                                    f"finished (freed there, or its pin timeout of {p.pin_timeout_s}s passed); the "
                                    "copy was discarded")
            out, dtype = [], p.torch_dtype
            for im in p.images:
                local = run[0] + (im.offset - p.images[0].offset)
                out.append(self.staging.view(local, dtype, (p.num_levels, im.num_tokens, p.hidden_size)).clone())
        except _Abandoned:
            raise TransferError(f"pulling image embeddings from {where} timed out after {timeout}s (peer stalled "
                                "or network down)") from None
        except TransferError:
            self.staging.release(run)
            self._notify_done(p)
            raise
        self.staging.release(run)
        self._notify_done(p)
        return out

    def _wait(self, future, timeout: float, what: str, p: EncoderTransferParams, run) -> None:
        try:
            ok = future.wait(timeout)
        except TransferError as e:
            self._drop_peer(p.engine_id)
            raise TransferError(f"{what} failed: {e}") from None
        if not ok:
            # shut the endpoint down (DLSlime then never completes the stalled read) and never
            # hand out the run it targeted again
            self._drop_peer(p.engine_id)
            self.staging.quarantine(run)
            raise _Abandoned()

    def _ensure_peer(self, p: EncoderTransferParams, where: str) -> None:
        addr = (p.endpoint.get("host"), p.endpoint.get("port"))
        if self._peers.get(p.engine_id) == addr and self.transfer.is_connected(p.engine_id):
            return
        self.transfer.connect(p.engine_id, p.endpoint)
        try:
            ok = self.transfer.read(p.engine_id, "ec_meta_in", "ec_meta", [(0, 0, META_BYTES)]).wait(
                self.options.pull_timeout_s)
        except TransferError as e:
            self._drop_peer(p.engine_id)
            raise TransferError(f"cannot reach {where} (dead, or not listening): {e}") from None
        if not ok:
            self._drop_peer(p.engine_id)
            raise TransferError(f"handshake with {where} timed out after {self.options.pull_timeout_s}s")
        raw = bytes(self.meta_in.tolist())
        n = int.from_bytes(raw[:4], "little")
        try:
            record = json.loads(raw[4:4 + n].decode())
        except ValueError as e:
            self._drop_peer(p.engine_id)
            raise TransferError(f"bad handshake record from {where}: {e}") from None
        if record.get("engine_id") != p.engine_id or record.get("role") != "encode":
            self._drop_peer(p.engine_id)
            raise HandshakeError(f"ec_transfer_params name encoder engine {p.engine_id!r} but {addr[0]}:{addr[1]} is "
                                 f"{record.get('role')} engine {record.get('engine_id')!r}")
        if record.get("fingerprint") != self.fingerprint:
            self._peers[p.engine_id] = addr
            raise HandshakeError(f"handshake with {where} failed: model fingerprints differ (encoder "
                                 f"{record.get('fingerprint')}, this engine {self.fingerprint}); both must load the "
                                 "same checkpoint with the same dtype")
        self._peers[p.engine_id] = addr

    def _drop_peer(self, engine_id: str) -> None:
        self.transfer.disconnect(engine_id)
        self._peers.pop(engine_id, None)

    def _notify_done(self, p: EncoderTransferParams) -> None:
        """Tell the encoder it may free the request's run (one 8-byte one-sided write; best effort:
        its pin timeout frees the run otherwise)."""
        if not self.transfer.is_connected(p.engine_id):
            return
        self.scratch[0, 0] = p.nonce
        try:
            self.transfer.write(p.engine_id, "ec_scratch", "ec_ctrl",
                                [((DONE * p.num_slots + p.slot) * 8, 0, 8)]).wait(1.0)
        except TransferError:
            pass

    def describe(self) -> dict:
        return {"receive_bytes": self.staging.nbytes, "receive_free_bytes": self.staging.free_bytes,
                "quarantined_bytes": self.staging.num_quarantined_bytes,
                **self.counts}

    def close(self) -> None:
        self.transfer.close()


class _Abandoned(Exception):
    """A read passed its deadline (its run is quarantined, the endpoint dropped)."""
