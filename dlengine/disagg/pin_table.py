"""The pin table: what a passive engine keeps about the data it has handed off and holds in
registered memory until a peer has pulled it. The prefill side's KV connector (disagg/prefill.py,
KV blocks) and the encoder engine (disagg/encoder.py, embedding runs) each own one; each keeps
its own data and frees it in the `free` callback it passes in, the table does the rest: slots,
nonces, the control region, release on done / timeout / abort, counts.

The control region is `ctrl`, int64 [2, slots], which the owner registers with its transfer
engine; the puller reads and writes single 8-byte entries of it with one-sided ops
(`ctrl_offset` gives their byte offsets):

- row PIN (0) holds a request's nonce while its data is pinned, 0 otherwise. It is cleared
  BEFORE the data is freed, and the puller re-reads it after its data read: a pull that raced a
  release sees 0 (or a later request's nonce) and discards its copy, never uses it.
- row DONE (1) is where the puller writes the nonce when it no longer needs the data (pulled,
  or gave up); `poll()` releases those pins. Pinning a slot clears its done entry first, so a
  late write for the slot's previous request (an old nonce) releases nothing.

Nonces are random 62-bit numbers plus one (never 0, the empty pin entry). A pin not done after
`pin_timeout_s` is released as "timeout" (the puller is dead or never came); `release_request`
releases one as "abort", `release_all` every one (at close).

Not thread-safe: an owner used from several threads holds its own lock around every call.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import torch

PIN, DONE = 0, 1
RELEASE_REASONS = ("done", "timeout", "abort")
_PER_SLOT_READS = 8  # up to this many pins, poll reads their done entries one by one, else the whole row

T = TypeVar("T")


def ctrl_offset(row: int, slot: int, num_slots: int) -> int:
    """Byte offset of entry [row, slot] in a peer's ctrl region of `num_slots` columns."""
    return (row * num_slots + slot) * 8


class PinSlotsFullError(RuntimeError):
    """Every pin slot holds a request; owners check `has_free_slot` before staging their data."""


@dataclass
class Pin(Generic[T]):
    """One handed-off request: its slot in `ctrl`, the nonce it holds there, when it expires, and
    what the owner keeps pinned for it (given back to the owner's `free` on release)."""

    request_id: str
    slot: int
    nonce: int
    deadline: float
    held: T


class PinTable(Generic[T]):
    def __init__(self, num_slots: int, pin_timeout_s: float, free: Callable[[T], None], *,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self.pin_timeout_s = pin_timeout_s
        self.ctrl = torch.zeros((2, num_slots), dtype=torch.int64)
        self._free = free
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._free_slots = deque(range(num_slots))
        self.pinned: dict[int, Pin[T]] = {}
        self._slot_of: dict[str, int] = {}
        self.counts = {"handed_off": 0, **{f"released_{why}": 0 for why in RELEASE_REASONS}}
        self.events: deque[tuple[str, str]] = deque(maxlen=1000)  # (request id, why it was released)

    def __len__(self) -> int:
        return len(self.pinned)

    @property
    def has_free_slot(self) -> bool:
        return bool(self._free_slots)

    def pin(self, request_id: str, held: T) -> Pin[T]:
        """Pin `held` (already staged) for a puller: take a slot, draw a nonce, publish it in the
        pin row. Raises PinSlotsFullError when no slot is free."""
        if not self._free_slots:
            raise PinSlotsFullError(f"all {self.num_slots} pin slots hold a request")
        slot = self._free_slots.popleft()
        nonce = self._rng.getrandbits(62) + 1
        pin = Pin(request_id, slot, nonce, self._clock() + self.pin_timeout_s, held)
        self.ctrl[DONE, slot] = 0  # before the pin: an old request's late done write must not match
        self.ctrl[PIN, slot] = nonce
        self.pinned[slot] = pin
        self._slot_of[request_id] = slot
        self.counts["handed_off"] += 1
        return pin

    def poll(self) -> list[tuple[Pin[T], str]]:
        """Release the pins whose puller wrote its nonce into the done row ("done") and those past
        their deadline ("timeout"); returns each released pin with why (owners log timeouts)."""
        if not self.pinned:
            return []
        now = self._clock()
        done = self.ctrl[DONE].tolist() if len(self.pinned) > _PER_SLOT_READS else None
        released = []
        for slot, pin in list(self.pinned.items()):
            d = done[slot] if done is not None else int(self.ctrl[DONE, slot])
            if d == pin.nonce:
                released.append((self._release(slot, "done"), "done"))
            elif now > pin.deadline:
                released.append((self._release(slot, "timeout"), "timeout"))
        return released

    def release_request(self, request_id: str) -> bool:
        """Release a request's pin now ("abort"); False when it holds none (e.g. already done)."""
        slot = self._slot_of.get(request_id)
        if slot is None:
            return False
        self._release(slot, "abort")
        return True

    def release_all(self) -> None:
        """Release every pin ("abort"): the owner is closing."""
        for slot in list(self.pinned):
            self._release(slot, "abort")

    def _release(self, slot: int, why: str) -> Pin[T]:
        pin = self.pinned.pop(slot)
        self.ctrl[PIN, slot] = 0  # first: a pull still in flight re-reads it and discards its copy
        self._free(pin.held)
        self._slot_of.pop(pin.request_id, None)
        self._free_slots.append(slot)
        self.counts[f"released_{why}"] += 1
        self.events.append((pin.request_id, why))
        return pin
