"""The encoder engine of encode-prefill-decode disaggregation (EPD): a vision model's vision tower
alone (no text model weights, no KV cache), which turns requests' images and videos into
embeddings and keeps them in registered host memory until a prefill (or hybrid) engine has pulled
them.

    encoder = EngineBuilder("tiny-qwen3-vl").role("encode").transfer("dlslime").build()
    ec = encoder.encode([image], videos=[frames])     # ec_transfer_params (disagg/ec_params.py)
    prefill.add_request({"prompt": p, "images": [image], "videos": [frames]}, params, ec_transfer_params=ec)

Images and videos are preprocessed as a hybrid engine's front does (frames sampled, grouped into
temporal patches, patched) and the vision tower runs once over all of a request's inputs, as a
hybrid engine's model does: the embeddings are the model's own, bit for bit in float32.

The hand-off follows the prefill role's KV hand-off (disagg/prefill.py), so the same failure
handling applies. Control traffic rides on DLSlime as one-sided reads and writes of small
registered regions of this engine, which stays passive:

- "ec": the staging region; a request's embeddings sit in one run of chunks (disagg/ec_staging.py),
  each image and each video one [1 + deepstack levels, tokens, hidden] tensor (a video's tokens
  are all its temporal patches', in order): the merged patch embeddings, then the deepstack
  feature maps the text model adds after its first decoder layers;
- "ec_meta": the handshake record (JSON: engine id, role, model fingerprint, architecture);
- "ec_ctrl": int64 [2, slots], the pin table's control region (disagg/pin_table.py). Row 0
  ("pin") holds a request's nonce while its embeddings are pinned and is cleared BEFORE they are
  freed; the puller re-reads it after its read, so a pull that raced a release is detected and
  discarded. Row 1 ("done") is where the puller writes the nonce when it has the embeddings (or
  gave up); `poll()` releases those runs.

A pinned run is released when the puller says so, after `pin_timeout_s` (the puller is dead or
never came), or by `release(request_id)` (the server's /ec/free).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from typing import Any, NamedTuple, Sequence

import torch

from dlengine.config import EngineConfig
from dlengine.disagg.ec_params import EncodedInput, EncoderTransferParams, dtype_name
from dlengine.disagg.ec_staging import ChunkedStaging
from dlengine.disagg.pin_table import Pin, PinTable
from dlengine.disagg.records import write_record
from dlengine.multimodal.processor import VisionPromptProcessor
from dlengine.sampling_params import InvalidRequestError

logger = logging.getLogger("dlengine.disagg")
META_BYTES = 4096
VISUAL_PREFIX = "model.visual."


class Embedded(NamedTuple):
    """One image's or video's embeddings, as the encoder computed them."""

    content_hash: bytes
    grid_thw: tuple[int, int, int]
    embeddings: torch.Tensor  # [1 + deepstack levels, tokens, hidden] on the device


class EncoderBusyError(RuntimeError):
    """The encoder's staging region or pin slots are full (pullers are slow or gone); retry later."""


def build_vision_tower(cfg: EngineConfig) -> torch.nn.Module:
    """The checkpoint's vision tower alone (its `model.visual.*` tensors; the text model's are never
    read), in the engine dtype on the engine device; dummy weights equal a whole model's."""
    from dlengine.config import ConfigError
    from dlengine.models.loader import init_dummy_weights, iter_safetensors_lazy
    from dlengine.models.vision.qwen3_vl_vision import Qwen3VLVisionModel

    vision_config = cfg.model.hf_config.get("vision_config")
    if not isinstance(vision_config, dict):
        raise ConfigError(f"{cfg.model.path}: config.json has no vision_config")
    prev = torch.get_default_dtype()
    torch.set_default_dtype(cfg.dtype)
    try:
        with torch.device(cfg.device):
            tower = Qwen3VLVisionModel(vision_config)
    finally:
        torch.set_default_dtype(prev)
    if cfg.load_format == "dummy":
        # the tower's parameters come first in the whole model, so the same seed gives the same values
        init_dummy_weights(tower, seed=cfg.seed)
        return tower.eval()
    params = dict(tower.named_parameters())
    loaded = set()
    for name, read in iter_safetensors_lazy(cfg.model.path, keep=lambda n: n.startswith(VISUAL_PREFIX)):
        target = name[len(VISUAL_PREFIX):]
        param = params.get(target)
        if param is None:
            raise ConfigError(f"checkpoint tensor {name!r} has no matching parameter in the vision tower")
        with torch.no_grad():
            param.weight_loader(param, read().to(param.dtype))
        loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ConfigError(f"checkpoint is missing {len(missing)} vision tower tensors: {', '.join(missing[:8])}")
    return tower.eval()


class EncoderEngine:
    """A vision tower behind a DLSlime endpoint (see the module docstring)."""

    def __init__(self, config: EngineConfig, tower: torch.nn.Module, transfer, engine_id: str, fingerprint: str,
                 num_slots: int = 4096) -> None:
        self.config = config
        self.tower = tower
        self.transfer = transfer
        self.engine_id = engine_id
        self.fingerprint = fingerprint
        self.pin_timeout_s = config.transfer.pin_timeout_s if config.transfer is not None else 60.0
        self.vision = VisionPromptProcessor(config.model)  # the front's preprocessing
        vc = config.model.hf_config["vision_config"]
        self.hidden_size = int(vc["out_hidden_size"])
        self.num_levels = 1 + len(vc.get("deepstack_visual_indexes") or [])
        self.staging = ChunkedStaging(config.encoder_cache.staging_bytes)
        self.num_slots = num_slots
        # each pin holds a staging run; the table gives it back to staging once its pin entry is cleared
        self.pins: PinTable[tuple[int, int]] = PinTable(num_slots, self.pin_timeout_s, self.staging.release)
        self.meta = torch.zeros(META_BYTES, dtype=torch.uint8)
        write_record(self.meta, {"engine_id": engine_id, "role": "encode", "fingerprint": fingerprint,
                                 "architecture": config.model.architecture})
        transfer.register_region("ec", self.staging.tensor)
        transfer.register_region("ec_ctrl", self.pins.ctrl)
        transfer.register_region("ec_meta", self.meta)
        self._ids = 0
        self._lock = threading.Lock()  # encode() from a server's worker threads, poll() from its poller
        self.encoded_counts = {"images": 0, "image_tokens": 0, "videos": 0, "video_tokens": 0}

    # ------------------------------------------------------------------ encoding
    @torch.inference_mode()
    def embed(self, images: Sequence[Any], videos: Sequence[Any] = ()) -> list[Embedded]:
        """(content hash, grid, [levels, tokens, hidden] embeddings on the device) per image, then
        per video (all its temporal patches). Images and videos are preprocessed as a hybrid
        engine's front does (multimodal/processor.py) and the vision tower runs once over all of
        them, in the model's order (images, then videos), as a hybrid engine's model does."""
        processed = list(self.vision.process_images(images))  # (pixels, grid, content hash, tokens)
        for v in self.vision.process_videos(videos):
            processed.append((v.pixel_values, v.grid_thw, v.content_hash, v.grid_thw[0] * v.tokens_per_frame))
        if not processed:
            raise InvalidRequestError("nothing to encode: the request has no images and no videos")
        pixels = torch.cat([px for px, *_ in processed]).to(self.config.device)
        tokens, features = self.tower(pixels, [grid for _, grid, *_ in processed])
        stacked = torch.stack([tokens, *features])  # [levels, all tokens, hidden]
        out, row = [], 0
        for _, grid, content_hash, n in processed:
            out.append(Embedded(content_hash, tuple(grid), stacked[:, row:row + n]))
            row += n
        return out

    def encode(self, images: Sequence[Any] = (), request_id: str | None = None, videos: Sequence[Any] = ()) -> dict:
        """Encode a request's images and videos (each as `Engine.add_request` takes them, in the
        prompt's order) and pin the embeddings for a puller: returns its ec_transfer_params.
        Raises InvalidRequestError for bad images or videos, EncoderBusyError when staging (or
        every pin slot) is full."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not isinstance(videos, (list, tuple)):
            raise InvalidRequestError("videos is a list of videos (each a list of frames, a [T, H, W, C] array, a "
                                      f"dict with 'frames' and 'fps', or a video file), not {type(videos).__name__}")
        embedded = self.embed(images, videos)
        dtype = self.config.dtype
        itemsize = torch.empty((), dtype=dtype).element_size()
        sizes = [e.embeddings.numel() * itemsize for e in embedded]
        with self._lock:
            self._poll_locked()
            run = self.staging.allocate(sum(sizes))
            if run is None or not self.pins.has_free_slot:
                if run is not None:
                    self.staging.release(run)
                raise EncoderBusyError(f"encoder engine {self.engine_id} has no free staging ({sum(sizes)} bytes "
                                       f"needed, {self.staging.free_bytes} of {self.staging.nbytes} free) or pin slot; "
                                       "retry later")
            self._ids += 1
            request_id = request_id or f"enc-{self._ids}"
            offset, encoded = run[0], []
            for e, size in zip(embedded, sizes):  # back to back, images first (ec_params.py)
                self.staging.view(offset, dtype, tuple(e.embeddings.shape)).copy_(e.embeddings)
                encoded.append(EncodedInput(e.content_hash.hex(), list(e.grid_thw), int(e.embeddings.shape[1]), offset))
                offset += size
            pin = self.pins.pin(request_id, run)
            encoded_images, encoded_videos = encoded[:len(images)], encoded[len(images):]
            self.encoded_counts["images"] += len(encoded_images)
            self.encoded_counts["image_tokens"] += sum(e.num_tokens for e in encoded_images)
            self.encoded_counts["videos"] += len(encoded_videos)
            self.encoded_counts["video_tokens"] += sum(e.num_tokens for e in encoded_videos)
        return EncoderTransferParams(
            engine_id=self.engine_id, endpoint=self.transfer.local_info(), request_id=request_id,
            fingerprint=self.fingerprint, dtype=dtype_name(dtype), hidden_size=self.hidden_size,
            num_levels=self.num_levels, images=encoded_images, videos=encoded_videos, slot=pin.slot,
            num_slots=self.num_slots, nonce=pin.nonce, pin_timeout_s=self.pin_timeout_s).to_dict()

    # ------------------------------------------------------------------ pins
    def poll(self) -> None:
        """Release embeddings pullers are done with, or whose pin expired. Call it often (a server
        runs it on a timer, a worker between commands)."""
        with self._lock:
            self._poll_locked()

    def _poll_locked(self) -> None:
        for pin, why in self.pins.poll():
            if why == "timeout":
                logger.warning("encoder %s: the embeddings of %s were not pulled within %.1fs; freeing them",
                               self.engine_id, pin.request_id, self.pin_timeout_s)

    def release(self, request_id: str) -> bool:
        """Free a request's pinned embeddings now (False: not pinned, e.g. already pulled)."""
        with self._lock:
            return self.pins.release_request(request_id)

    @property
    def pinned(self) -> dict[int, Pin[tuple[int, int]]]:
        """The pins held, by slot (disagg/pin_table.py, Pin; `held` is the staging run)."""
        return self.pins.pinned

    @property
    def num_pinned(self) -> int:
        return len(self.pins)

    @property
    def counts(self) -> dict[str, int]:
        """Hand-offs and releases (the pin table's), then images, videos and their tokens encoded."""
        return {**self.pins.counts, **self.encoded_counts}

    @property
    def events(self) -> deque[tuple[str, str]]:
        """(request id, why its embeddings were freed) of the latest releases."""
        return self.pins.events

    # ------------------------------------------------------------------ facts
    def describe(self) -> dict:
        return {"role": "encode", "model": self.config.model.architecture, "path": self.config.model.path,
                "device": str(self.config.device), "dtype": dtype_name(self.config.dtype),
                "vision_params": sum(p.numel() for p in self.tower.parameters()),
                "ec_transfer": {"engine_id": self.engine_id, "transfer_backend": self.transfer.backend,
                                "transfer_transport": self.transfer.transport,
                                "staging_bytes": self.staging.nbytes, "staging_free_bytes": self.staging.free_bytes,
                                "pinned_requests": len(self.pins), **self.counts}}

    def __repr__(self) -> str:
        c = self.config
        return (f"EncoderEngine(model={c.model.architecture} @ {c.model.path}, role=encode, device={c.device}, "
                f"dtype={dtype_name(c.dtype)}, transfer={self.transfer.backend}/{self.transfer.transport}, "
                f"staging={self.staging.nbytes >> 20} MiB)")

    def close(self) -> None:
        with self._lock:
            self.pins.release_all()
        self.transfer.close()

    def __enter__(self) -> "EncoderEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_encoder_engine(cfg: EngineConfig) -> EncoderEngine:
    """The encoder engine `cfg` (role "encode") describes, listening on its transfer address."""
    from dlengine.parallel.transfer import make_transfer_engine, model_fingerprint

    tower = build_vision_tower(cfg)
    t = cfg.transfer
    te = make_transfer_engine(t.backend, transport=t.transport, host=t.host, port=t.port)
    try:
        return EncoderEngine(cfg, tower, te, t.engine_id or f"encode-{uuid.uuid4().hex[:8]}",
                             model_fingerprint(cfg.model, cfg.dtype, cfg.load_format, cfg.seed))
    except BaseException:
        te.close()
        raise
