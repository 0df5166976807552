"""Per-sequence state slots: the block manager's companion for state cache specs.

A recurrent layer (StateSpec) keeps a fixed amount of state per running sequence, not per token,
so it needs no blocks: a request takes one slot index at admission (`request.state_slot`),
keeps it while it runs, and gives it back when it finishes or is preempted (a preempted request
recomputes from scratch, state included). Slot i indexes row i of every state group's tensors.
"""

from __future__ import annotations

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
