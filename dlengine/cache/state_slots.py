"""Per-sequence state slots: the block manager's companion for state cache specs.

A recurrent layer (StateSpec) keeps a fixed amount of state per running sequence, not per token,
so it needs no blocks: a request takes one slot index at admission (`request.state_slot`),
keeps it while it runs, and gives it back when it finishes or is preempted (a preempted request
recomputes from scratch, state included). Slot i indexes row i of every state group's tensors.

With prefix caching, `StateCheckpointPool` keeps copies of states at block boundaries in further
slots of the same storage (after the running requests' ones).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


class StateSlotPool:
    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # a stack: pop() gives the lowest
        self._owner: dict[int, Any] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def needs_slot(self, request: Any) -> bool:
        return getattr(request, "state_slot", None) is None

    def allocate(self, request: Any) -> bool:
        """Give `request` a slot unless it has one. False (nothing changed) when none is free."""
        if not self.needs_slot(request):
            return True
        if not self._free:
            return False
        slot = self._free.pop()
        self._owner[slot] = request
        request.state_slot = slot
        return True

    def free(self, request: Any) -> None:
        slot = getattr(request, "state_slot", None)
        if slot is None:
            return
        if self._owner.get(slot) is not request:
            raise RuntimeError(f"state slot {slot} freed by a request that does not hold it")
        del self._owner[slot]
        self._free.append(slot)
        request.state_slot = None

    def check_invariants(self) -> None:
        assert len(self._free) + len(self._owner) == self.num_slots, "state slots lost or duplicated"
        assert not set(self._free) & set(self._owner), "a state slot is both free and held"
        for slot, req in self._owner.items():
            assert req.state_slot == slot, f"state slot {slot}'s holder names slot {req.state_slot}"


class StateCheckpointPool:
    """Copies of recurrent states at block boundaries, for prefix caching of hybrid models.

    The state after a prefix summarises all of it in place, so a cached prefix can be resumed only
    from a copy of the state taken when a request crossed that prefix's last block boundary. Each
    copy lives in a checkpoint slot: slots [first_slot, first_slot + num_slots) of the same state
    storage as the running requests' slots (so one copy kernel / slot-indexed kernel serves both).

    A slot is free, pending (reserved by a request whose step will write it: `reserve`) or
    published under the hash of the block that ends the prefix (`publish`). Published checkpoints
    are kept in LRU order; `reserve` evicts the oldest when none is free. A published checkpoint
    lives at most as long as its block: the block manager `drop`s it when that block is evicted.
    """

    def __init__(self, first_slot: int, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.first_slot, self.num_slots = first_slot, num_slots
        self._free: list[int] = list(range(first_slot + num_slots - 1, first_slot - 1, -1))
        self._published: OrderedDict[bytes, int] = OrderedDict()  # block hash -> slot, oldest first
        self._pending: dict[int, Any] = {}  # slot -> the request that will write it
        self.num_evicted = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_published(self) -> int:
        return len(self._published)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def has(self, block_hash: bytes) -> bool:
        return block_hash in self._published

    def lookup(self, block_hash: bytes) -> int | None:
        """The checkpoint slot of the prefix ending with `block_hash`, marked most recently used."""
        slot = self._published.get(block_hash)
        if slot is not None:
            self._published.move_to_end(block_hash)
        return slot

    def reserve(self, request: Any) -> int | None:
        """A slot for `request` to write a checkpoint into: a free one, else the least recently
        used published one (evicted). None when every slot is pending."""
        if self._free:
            slot = self._free.pop()
        elif self._published:
            _, slot = self._published.popitem(last=False)
            self.num_evicted += 1
        else:
            return None
        self._pending[slot] = request
        return slot

    def publish(self, block_hash: bytes, slot: int) -> None:
        """The pending `slot` now holds the state after the prefix ending with `block_hash`."""
        del self._pending[slot]
        if block_hash in self._published:  # two requests checkpointed the same prefix: keep one
            self._free.append(slot)
        else:
            self._published[block_hash] = slot

    def release(self, slot: int) -> None:
        """Give back a pending slot that was never published (its request ended first)."""
        del self._pending[slot]
        self._free.append(slot)

    def drop(self, block_hash: bytes) -> None:
        """Forget the checkpoint of a prefix whose block left the cache."""
        slot = self._published.pop(block_hash, None)
        if slot is not None:
            self._free.append(slot)

    def clear(self) -> None:
        for slot in self._published.values():
            self._free.append(slot)
        self._published.clear()

    def published_hashes(self) -> list[bytes]:
        return list(self._published)

    def check_invariants(self) -> None:
        held = list(self._free) + list(self._published.values()) + list(self._pending)
        assert len(held) == self.num_slots and len(set(held)) == self.num_slots, "checkpoint slots lost or duplicated"
        assert all(self.first_slot <= s < self.first_slot + self.num_slots for s in held), "foreign checkpoint slot"
