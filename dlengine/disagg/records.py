"""Handshake records: a small JSON dict in a registered byte region, which a peer reads with one
one-sided read when it first connects (prefill and encoder engines write theirs at start; decode
engines and encoder clients read them). Layout: 4 bytes little-endian length, then the UTF-8
JSON, the rest of the region zeros."""

from __future__ import annotations

import json

import torch


def write_record(region: torch.Tensor, record: dict) -> None:
    """Put `record` into `region` (uint8). ValueError when it does not fit."""
    data = json.dumps(record).encode()
    if 4 + len(data) > region.numel():
        raise ValueError(f"handshake record of {len(data)} bytes does not fit its {region.numel()}-byte region")
    region.zero_()
    region[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
    region[4:4 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)


def read_record(region: torch.Tensor) -> dict:
    """The record a peer's region held (as read into `region`). ValueError when malformed."""
    raw = bytes(region.tolist())
    n = int.from_bytes(raw[:4], "little")
    if not 0 < n <= len(raw) - 4:
        raise ValueError(f"record length {n} does not fit a {len(raw)}-byte region")
    record = json.loads(raw[4:4 + n].decode())
    if not isinstance(record, dict):
        raise ValueError("the record is not a JSON object")
    return record
