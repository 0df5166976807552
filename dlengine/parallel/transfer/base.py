"""What a KV transfer engine is, and how blocks become byte ranges.

A `TransferEngine` moves bytes between registered memory regions of two engines: it registers
local regions, connects to a peer (whose address and region table it gets as a plain dict), and
issues batched one-sided reads or writes of (remote offset, local offset, length) segments that
complete through a `TransferFuture`. The KV specifics live in `KVLayout`: where a token of a layer
sits inside a region, so a list of (remote block, local block) pairs becomes a short list of
coalesced byte segments, also when the two sides use different block sizes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

import torch


class TransferError(RuntimeError):
    """A KV transfer (or the connection/handshake it needs) failed; the message says why."""


class HandshakeError(TransferError):
    """The two engines cannot exchange KV: different model, cache layout or dtype."""


Segment = tuple[int, int, int]  # (remote byte offset, local byte offset, length)


class TransferFuture(Protocol):
    def done(self) -> bool:
        """True once finished (successfully or not); never blocks."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block up to `timeout` seconds. True when finished OK, False on timeout; raises
        TransferError when the transfer failed."""


class TransferEngine(Protocol):
    """The protocol the prefill/decode roles use; DLSlimeTransferEngine implements it."""

    backend: str
    transport: str

    def register_region(self, name: str, tensor: torch.Tensor) -> None: ...

    def local_info(self) -> dict: ...

    def connect(self, peer_id: str, info: dict) -> None: ...

    def is_connected(self, peer_id: str) -> bool: ...

    def read(self, peer_id: str, local_region: str, remote_region: str, segments: Sequence[Segment]) -> TransferFuture: ...

    def write(self, peer_id: str, local_region: str, remote_region: str, segments: Sequence[Segment]) -> TransferFuture: ...

    def disconnect(self, peer_id: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class KVLayout:
    """Where KV bytes live in a transfer region. Plane-major (the KV cache itself):
    [num_layers * parts planes][num_blocks][block_size][token_bytes]. Block-major (staging
    buffers): [num_blocks][num_layers * parts planes][block_size][token_bytes], so a request's
    blocks staged side by side are ONE contiguous range. parts is 2 (K, V) for GQA/MHA caches and
    1 for MLA's latent cache. `kind`, `token_bytes` and `dtype` must match between peers;
    `block_size`, `num_blocks` and the ordering may differ (copies are cut at both sides' block
    boundaries)."""

    kind: str  # "gqa" or "mla"
    num_layers: int
    parts: int
    heads: int
    head_dim: int
    dtype: str
    token_bytes: int  # bytes of one token of one layer of one part
    block_size: int
    num_blocks: int  # blocks in the region (the cache itself, or a staging buffer)
    block_major: bool = False

    @property
    def plane_bytes(self) -> int:
        return self.num_blocks * self.block_size * self.token_bytes

    def offset(self, plane: int, block: int, token: int) -> int:
        """Byte offset of `token` (inside `block`) of plane `plane` (layer * parts + part)."""
        run = self.block_size * self.token_bytes
        if self.block_major:
            return (block * self.num_layers * self.parts + plane) * run + token * self.token_bytes
        return plane * self.plane_bytes + block * run + token * self.token_bytes

    @property
    def nbytes(self) -> int:
        return self.num_layers * self.parts * self.plane_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "KVLayout":
        try:
            return KVLayout(**{k: d[k] for k in KVLayout.__dataclass_fields__ if k in d})
        except (KeyError, TypeError) as e:
            raise HandshakeError(f"malformed KV layout {d!r}: {e}") from None

    def check_compatible(self, remote: "KVLayout") -> None:
        """Raise HandshakeError naming the first difference that makes the bytes meaningless."""
        for name in ("kind", "num_layers", "parts", "heads", "head_dim", "dtype", "token_bytes"):
            a, b = getattr(self, name), getattr(remote, name)
            if a != b:
                raise HandshakeError(
                    f"KV cache layouts differ in {name}: this engine has {a!r}, the peer has {b!r}; "
                    "both sides need the same model, cache dtype and tensor-parallel split"
                )

    def segments_from(self, remote: "KVLayout", remote_blocks: Sequence[int], local_blocks: Sequence[int],
                      num_tokens: int) -> list[Segment]:
        """Byte segments copying the first `num_tokens` tokens of a sequence stored in
        `remote_blocks` (remote layout) into `local_blocks` (this layout), every layer and part.
        Runs are cut wherever either side crosses a block boundary and merged when both sides
        stay contiguous: consecutive blocks of two block-major staging buffers with the same block
        size give ONE segment for the whole request; two caches give one per plane at best."""
        if num_tokens > len(remote_blocks) * remote.block_size:
            raise TransferError(f"{num_tokens} tokens do not fit in {len(remote_blocks)} remote blocks")
        if num_tokens > len(local_blocks) * self.block_size:
            raise TransferError(f"{num_tokens} tokens do not fit in {len(local_blocks)} local blocks")
        tb = self.token_bytes
        if remote.block_size == self.block_size:
            # move whole blocks: the tail of a partial last block is junk that the receiver never
            # reads (it writes those positions before attending to them), and whole blocks keep a
            # block-major request one contiguous range instead of one piece per layer and part
            num_tokens = -(-num_tokens // self.block_size) * self.block_size
        runs = []  # (remote block, offset in it, local block, offset in it, tokens)
        t = 0
        while t < num_tokens:
            rb, ro = divmod(t, remote.block_size)
            lb, lo = divmod(t, self.block_size)
            n = min(remote.block_size - ro, self.block_size - lo, num_tokens - t)
            runs.append((remote_blocks[rb], ro, local_blocks[lb], lo, n))
            t += n
        pieces = sorted((remote.offset(plane, rb, ro), self.offset(plane, lb, lo), n * tb)
                        for rb, ro, lb, lo, n in runs for plane in range(self.num_layers * self.parts))
        segments: list[list[int]] = []
        for r, l, n in pieces:
            if segments and segments[-1][0] + segments[-1][2] == r and segments[-1][1] + segments[-1][2] == l:
                segments[-1][2] += n
            else:
                segments.append([r, l, n])
        return [tuple(x) for x in segments]


def kv_layout(kv_cache, model_config, num_blocks: int | None = None, block_major: bool = False) -> KVLayout:
    """The layout of a dlengine KVCache, or (num_blocks, block_major) of a staging buffer for it."""
    heads, k_dim, v_dim = model_config.kv_cache_geometry
    elem = torch.empty((), dtype=kv_cache.dtype).element_size()
    return KVLayout(
        kind="mla" if v_dim == 0 else "gqa",
        num_layers=model_config.num_hidden_layers,
        parts=1 if v_dim == 0 else 2,
        heads=heads,
        head_dim=k_dim,
        dtype=str(kv_cache.dtype).replace("torch.", ""),
        token_bytes=heads * k_dim * elem,
        block_size=kv_cache.block_size,
        num_blocks=kv_cache.num_blocks if num_blocks is None else num_blocks,
        block_major=block_major,
    )


def model_fingerprint(model_config, dtype: torch.dtype, load_format: str = "auto", seed: int = 0) -> str:
    """A short hash naming "the same model computed the same way": config.json, the weight files'
    names and sizes (hashing the weights themselves would take minutes on real checkpoints), and
    the compute dtype. Dummy weights depend on the seed too."""
    h = hashlib.sha256()
    h.update(json.dumps(model_config.hf_config, sort_keys=True).encode())
    path = model_config.path
    if load_format != "dummy" and os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors") or name.endswith(".bin"):
                h.update(f"{name}:{os.path.getsize(os.path.join(path, name))}".encode())
    else:
        h.update(f"dummy:{seed}".encode())
    h.update(str(dtype).encode())
    return h.hexdigest()[:16]
