"""`ec_transfer_params`: what an encoder engine hands back for a request's images, and what a
prefill (or hybrid) engine admits to pull them instead of encoding them.

A plain JSON-serialisable dict, like kv_transfer_params (params.py), so any router can carry it;
over HTTP it travels signed (serve/pd_auth.py). `EncoderTransferParams.from_dict` validates every
field, and `check_images` checks them against the request's own images (content hashes, token
counts, the model's embedding shape) before anything is pulled.

Per image the encoder's region "ec" holds one contiguous tensor [levels, num_tokens, hidden] in
`dtype`: level 0 the merged patch embeddings, levels 1.. the deepstack feature maps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from dlengine.sampling_params import InvalidRequestError

EC_PARAMS_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class EncodedImage:
    content_hash: str  # hex of the image's content hash (multimodal/processor.py)
    grid_thw: list[int]
    num_tokens: int
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
    images: list[EncodedImage]
    slot: int  # its pin/done slot for this request
    num_slots: int  # size of each row of its control region
    nonce: int  # written into the done slot to release the embeddings
    pin_timeout_s: float  # the encoder frees them this long after handing them off
    version: int = EC_PARAMS_VERSION

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return sum(im.nbytes(self.num_levels, self.hidden_size, self.torch_dtype) for im in self.images)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Any) -> "EncoderTransferParams":
        if isinstance(d, EncoderTransferParams):
            return d
        if not isinstance(d, dict):
            raise InvalidRequestError(f"ec_transfer_params must be a dict, not {type(d).__name__}")
        fields = EncoderTransferParams.__dataclass_fields__
        missing = [f for f in fields if f not in d and f != "version"]
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
            "images": lambda v: isinstance(v, list) and v,
            "slot": lambda v: isinstance(v, int) and v >= 0,
            "num_slots": positive,
            "nonce": lambda v: isinstance(v, int) and v != 0,
            "pin_timeout_s": lambda v: isinstance(v, (int, float)) and v > 0,
        }
        for name, ok in checks.items():
            if not ok(d[name]):
                raise InvalidRequestError(f"ec_transfer_params[{name!r}] is invalid: {d[name]!r}")
        images = []
        for k, im in enumerate(d["images"]):
            try:
                e = EncodedImage(str(im["content_hash"]), [int(x) for x in im["grid_thw"]], int(im["num_tokens"]),
                                 int(im["offset"]))
            except (KeyError, TypeError, ValueError):
                raise InvalidRequestError(f"ec_transfer_params image {k} needs content_hash, grid_thw [t, h, w], "
                                          f"num_tokens and offset; got {im!r}") from None
            if len(e.grid_thw) != 3 or e.num_tokens <= 0 or e.offset < 0:
                raise InvalidRequestError(f"ec_transfer_params image {k} is invalid: {im!r}")
            images.append(e)
        return EncoderTransferParams(**{**{k: d[k] for k in fields if k in d}, "images": images})


def check_images(params: EncoderTransferParams, multimodal, hidden_size: int, num_levels: int) -> None:
    """The params describe exactly the request's images (same content, same order) in the shape
    this model takes; raises InvalidRequestError naming the mismatch before anything is pulled."""
    images = multimodal.images if multimodal is not None else []
    if len(params.images) != len(images):
        raise InvalidRequestError(f"ec_transfer_params describe {len(params.images)} images but the request has "
                                  f"{len(images)}; send the same images to the encoder and to this engine")
    for k, (p, im) in enumerate(zip(params.images, images)):
        if p.content_hash != im.content_hash.hex() or p.num_tokens != im.num_tokens:
            raise InvalidRequestError(f"ec_transfer_params image {k} was encoded from another image (content hash "
                                      "or token count differs); send the same images in the same order")
    if params.hidden_size != hidden_size or params.num_levels != num_levels:
        raise InvalidRequestError(f"ec_transfer_params hold embeddings of [{params.num_levels} levels, hidden "
                                  f"{params.hidden_size}] but this model takes [{num_levels} levels, hidden "
                                  f"{hidden_size}]: the encoder runs another model")
