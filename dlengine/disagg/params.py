"""`kv_transfer_params`: what a prefill engine hands back and a decode engine admits.

A plain JSON-serialisable dict so that any router (in-process, HTTP, a queue) can carry it.
`KVTransferParams.from_dict` validates every field: malformed params are rejected with
InvalidRequestError before anything is allocated. A tensor-parallel prefill engine's params are
rank 0's with `tp_size` and the other ranks' params under `shards` (`check_shards`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from dlengine.sampling_params import InvalidRequestError

PARAMS_VERSION = 1
_OPTIONAL = ("version", "state_slot")  # fields older prefill engines do not send


def prompt_hash(token_ids: Sequence[int]) -> str:
    """Names the prompt the KV was computed from, so a decode engine given another prompt (or
    another tokenisation of it) refuses the KV instead of decoding garbage."""
    return hashlib.blake2b(np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class KVTransferParams:
    engine_id: str  # the prefill engine
    endpoint: dict  # its transfer address: TransferEngine.local_info()
    request_id: str  # the request id on the prefill engine
    block_ids: list[int]  # region blocks holding the prompt's KV, in order
    num_computed_tokens: int  # tokens whose KV is in those blocks (the prompt)
    first_token: int  # sampled by the prefill engine from the prompt's last logits
    prompt_hash: str
    fingerprint: str  # model fingerprint of the prefill engine
    layout: dict  # KVLayout.to_dict() of its region
    slot: int  # its pin/done slot for this request
    nonce: int  # written into the done slot to release the blocks
    pin_timeout_s: float  # the prefill engine frees the blocks this long after handing them off
    # staging state slot holding the request's recurrent state after the prompt (models with
    # state specs, e.g. Gated DeltaNet hybrids); -1: the model keeps no state
    state_slot: int = -1
    version: int = PARAMS_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: Any) -> "KVTransferParams":
        if isinstance(d, KVTransferParams):
            return d
        if not isinstance(d, dict):
            raise InvalidRequestError(f"kv_transfer_params must be a dict, not {type(d).__name__}")
        missing = [f for f in KVTransferParams.__dataclass_fields__ if f not in d and f not in _OPTIONAL]
        if missing:
            raise InvalidRequestError(f"kv_transfer_params is missing {missing}")
        if d.get("version", PARAMS_VERSION) != PARAMS_VERSION:
            raise InvalidRequestError(f"kv_transfer_params version {d.get('version')!r}; this engine reads "
                                      f"version {PARAMS_VERSION}")
        checks = {
            "engine_id": lambda v: isinstance(v, str) and v,
            "endpoint": lambda v: isinstance(v, dict),
            "request_id": lambda v: isinstance(v, str),
            "block_ids": lambda v: isinstance(v, list) and v and all(isinstance(b, int) and b >= 0 for b in v),
            "num_computed_tokens": lambda v: isinstance(v, int) and v > 0,
            "first_token": lambda v: isinstance(v, int) and v >= 0,
            "prompt_hash": lambda v: isinstance(v, str),
            "fingerprint": lambda v: isinstance(v, str),
            "layout": lambda v: isinstance(v, dict),
            "slot": lambda v: isinstance(v, int) and v >= 0,
            "nonce": lambda v: isinstance(v, int) and v != 0,
            "pin_timeout_s": lambda v: isinstance(v, (int, float)) and v > 0,
            "state_slot": lambda v: isinstance(v, int) and v >= -1,
        }
        for name, ok in checks.items():
            if name in d and not ok(d[name]):
                raise InvalidRequestError(f"kv_transfer_params[{name!r}] is invalid: {d[name]!r}")
        return KVTransferParams(**{k: d[k] for k in KVTransferParams.__dataclass_fields__ if k in d})


def check_transfer_params(kv_transfer_params: Any, request, vocab_size: int) -> KVTransferParams:
    """A decode engine's admission check of a prefill engine's params against the request it
    came with: well-formed, the same prompt, a first token in the vocabulary, a readable KV
    layout. Raises InvalidRequestError naming the problem before anything is allocated."""
    from dlengine.parallel.transfer.base import KVLayout

    p = KVTransferParams.from_dict(kv_transfer_params)
    if p.num_computed_tokens != request.num_prompt_tokens:
        raise InvalidRequestError(
            f"kv_transfer_params cover {p.num_computed_tokens} tokens but the prompt has "
            f"{request.num_prompt_tokens}; pass the same prompt to both engines")
    if p.prompt_hash != prompt_hash(request.prompt_token_ids):
        raise InvalidRequestError("kv_transfer_params were computed for another prompt (prompt hash differs)")
    if p.first_token >= vocab_size:
        raise InvalidRequestError(f"kv_transfer_params first_token {p.first_token} is outside the vocabulary")
    KVLayout.from_dict(p.layout)  # malformed layout: HandshakeError now, not mid-pull
    for shard in check_shards(kv_transfer_params, p):
        KVLayout.from_dict(shard.layout)
    return p


def check_shards(raw: dict, p: KVTransferParams) -> list[KVTransferParams]:
    """The other ranks' params of sharded kv_transfer_params (rank 0's are `p`), validated against
    rank 0's; [] for unsharded params. Raises InvalidRequestError naming the problem."""
    if not isinstance(raw, dict) or "shards" not in raw:
        return []
    shards, tp = raw["shards"], raw.get("tp_size")
    if not isinstance(shards, list) or not isinstance(tp, int) or tp != len(shards) + 1:
        raise InvalidRequestError(f"kv_transfer_params of a tensor-parallel prefill engine need 'shards' (a list of "
                                  f"the other ranks' params) and 'tp_size' = 1 + len(shards); got tp_size={tp!r} and "
                                  f"{type(shards).__name__} shards")
    out = []
    for i, d in enumerate(shards, start=1):
        try:
            s = KVTransferParams.from_dict(d)
        except InvalidRequestError as e:
            raise InvalidRequestError(f"kv_transfer_params shard {i}: {e}") from None
        for name in ("num_computed_tokens", "prompt_hash", "fingerprint", "first_token"):
            if getattr(s, name) != getattr(p, name):
                raise InvalidRequestError(f"kv_transfer_params shard {i} has another {name} than rank 0's "
                                          f"({getattr(s, name)!r} vs {getattr(p, name)!r})")
        if len(s.block_ids) != len(p.block_ids):
            raise InvalidRequestError(f"kv_transfer_params shard {i} lists {len(s.block_ids)} blocks, rank 0 "
                                      f"{len(p.block_ids)}")
        out.append(s)
    ids = [p.engine_id] + [s.engine_id for s in out]
    if len(set(ids)) != len(ids):
        raise InvalidRequestError(f"kv_transfer_params shards name the same prefill engine twice: {ids}")
    return out
