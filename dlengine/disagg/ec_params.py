"""`ec_transfer_params`: what an encoder engine hands back for a request's images and videos, and
what a prefill (or hybrid) engine admits to pull their embeddings instead of encoding them.

A plain JSON-serialisable dict, like kv_transfer_params (params.py), so any router can carry it;
over HTTP it travels signed (serve/pd_auth.py). `EncoderTransferParams.from_dict` validates every
field, and `check_inputs` checks them against the request's own images and videos (content
hashes, token counts, the model's embedding shape) before anything is pulled.

Each visual input (an image, or a whole video: all its temporal patches) is one entry of
`images` or `videos` (its content hash, which also keys the prefill side's prefix cache; its
grid_thw; its token count; its byte offset), and one contiguous tensor [levels, num_tokens,
hidden] in `dtype` in the encoder's region "ec": level 0 the merged patch embeddings, levels 1..
the deepstack feature maps. The tensors lie back to back in one run, images first, then videos,
each list in the request's order: the order of the model's encoder cache
(MultimodalInputs.visual_inputs). `videos` may be absent (params of an encoder from before
videos): none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from dlengine.sampling_params import InvalidRequestError

EC_PARAMS_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class EncodedInput:
    """One image or video of a request, as encoded."""

    content_hash: str  # hex of its content hash (multimodal/processor.py): pixels and grid
    grid_thw: list[int]  # an image's (1, h, w) patches; a video's (temporal patches, h, w)
    num_tokens: int  # its tokens in the prompt (a video's: over all its temporal patches)
    offset: int  # byte offset of its [levels, num_tokens, hidden] tensor in the encoder's region "ec"

    def nbytes(self, levels: int, hidden: int, dtype: torch.dtype) -> int:
        return levels * self.num_tokens * hidden * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class EncoderTransferParams:
    engine_id: str  # the encoder engine
    endpoint: dict  # its transfer address: TransferEngine.local_info()
    request_id: str  # the request id on the encoder engine
    fingerprint: str  # model fingerprint of the encoder engine (same checkpoint and dtype as ours)
    dtype: str  # of the embeddings: "float32" | "bfloat16" | "float16"
    hidden_size: int  # the text model's hidden size (the mergers' output)
    num_levels: int  # 1 + deepstack feature maps
    images: list[EncodedInput]
    slot: int  # its pin/done slot for this request
    num_slots: int  # size of each row of its control region
    nonce: int  # written into the done slot to release the embeddings
    pin_timeout_s: float  # the encoder frees them this long after handing them off
    videos: list[EncodedInput] = field(default_factory=list)
    version: int = EC_PARAMS_VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def items(self) -> list[EncodedInput]:
        """The images, then the videos: the order of their tensors in the run."""
        return [*self.images, *self.videos]

    def item_nbytes(self, item: EncodedInput) -> int:
        return item.nbytes(self.num_levels, self.hidden_size, self.torch_dtype)

    @property
    def nbytes(self) -> int:
        return sum(self.item_nbytes(x) for x in self.items)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Any) -> "EncoderTransferParams":
        if isinstance(d, EncoderTransferParams):
            return d
        if not isinstance(d, dict):
            raise InvalidRequestError(f"ec_transfer_params must be a dict, not {type(d).__name__}")
        fields = EncoderTransferParams.__dataclass_fields__
        missing = [f for f in fields if f not in d and f not in ("version", "videos")]
        if missing:
            raise InvalidRequestError(f"ec_transfer_params is missing {missing}")
        if d.get("version", EC_PARAMS_VERSION) != EC_PARAMS_VERSION:
            raise InvalidRequestError(f"ec_transfer_params version {d.get('version')!r}; this engine reads version "
                                      f"{EC_PARAMS_VERSION}")
        positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
        checks = {
            "engine_id": lambda v: isinstance(v, str) and v,
            "endpoint": lambda v: isinstance(v, dict),
            "request_id": lambda v: isinstance(v, str),
            "fingerprint": lambda v: isinstance(v, str),
            "dtype": lambda v: v in DTYPES,
            "hidden_size": positive,
            "num_levels": positive,
            "images": lambda v: isinstance(v, list),
            "videos": lambda v: isinstance(v, list),
            "slot": lambda v: isinstance(v, int) and v >= 0,
            "num_slots": positive,
            "nonce": lambda v: isinstance(v, int) and v != 0,
            "pin_timeout_s": lambda v: isinstance(v, (int, float)) and v > 0,
        }
        d = {"videos": [], **d}
        for name, ok in checks.items():
            if not ok(d[name]):
                raise InvalidRequestError(f"ec_transfer_params[{name!r}] is invalid: {d[name]!r}")
        images, videos = _inputs(d["images"], "image"), _inputs(d["videos"], "video")
        if not images and not videos:
            raise InvalidRequestError("ec_transfer_params describe no image and no video")
        params = EncoderTransferParams(**{**{k: d[k] for k in fields if k in d}, "images": images, "videos": videos})
        _check_layout(params)
        return params


def _inputs(entries: list, kind: str) -> list[EncodedInput]:
    out = []
    for k, x in enumerate(entries):
        try:
            e = EncodedInput(str(x["content_hash"]), [int(v) for v in x["grid_thw"]], int(x["num_tokens"]),
                             int(x["offset"]))
        except (KeyError, TypeError, ValueError):
            raise InvalidRequestError(f"ec_transfer_params {kind} {k} needs content_hash, grid_thw [t, h, w], "
                                      f"num_tokens and offset; got {x!r}") from None
        if len(e.grid_thw) != 3 or min(e.grid_thw) <= 0 or e.num_tokens <= 0 or e.offset < 0:
            raise InvalidRequestError(f"ec_transfer_params {kind} {k} is invalid: {x!r}")
        out.append(e)
    return out


def _check_layout(p: EncoderTransferParams) -> None:
    """The tensors lie back to back (images, then videos), as the encoder stages them: a puller
    reads them into one run of `nbytes`, so a gap or an overlap would write outside it."""
    items = p.items
    for prev, nxt in zip(items, items[1:]):
        if nxt.offset != prev.offset + p.item_nbytes(prev):
            raise InvalidRequestError("ec_transfer_params: the embeddings of the images and videos are not back to "
                                      f"back in the encoder's region (offset {nxt.offset} follows "
                                      f"{prev.offset} + {p.item_nbytes(prev)} bytes)")


def check_inputs(params: EncoderTransferParams, multimodal, hidden_size: int, num_levels: int) -> None:
    """The params describe exactly the request's images and videos (same content, same order) in
    the shape this model takes; raises InvalidRequestError naming the mismatch before anything is
    pulled."""
    for kind, described, ours in (("image", params.images, multimodal.images if multimodal is not None else []),
                                  ("video", params.videos, multimodal.videos if multimodal is not None else [])):
        if len(described) != len(ours):
            raise InvalidRequestError(f"ec_transfer_params describe {len(described)} {kind}s but the request has "
                                      f"{len(ours)}; send the same images and videos to the encoder and to this "
                                      "engine")
        for k, (p, x) in enumerate(zip(described, ours)):
            if p.content_hash != x.content_hash.hex() or p.num_tokens != x.num_tokens:
                hint = " (and the same fps)" if kind == "video" else ""
                raise InvalidRequestError(f"ec_transfer_params {kind} {k} was encoded from another {kind} (content "
                                          f"hash or token count differs); send the same {kind}s{hint} in the same "
                                          "order")
    if params.hidden_size != hidden_size or params.num_levels != num_levels:
        raise InvalidRequestError(f"ec_transfer_params hold embeddings of [{params.num_levels} levels, hidden "
                                  f"{params.hidden_size}] but this model takes [{num_levels} levels, hidden "
                                  f"{hidden_size}]: the encoder runs another model")
