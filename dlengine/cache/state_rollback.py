"""Rolling a recurrent state back to the accepted drafts (speculative decoding of hybrid models).

A verify step feeds a request its last token and d drafts. The KV of rejected drafts is simply
never read again (the core moves num_computed_tokens past the accepted ones only), but a recurrent
state (Gated DeltaNet's conv window and delta-rule state) is updated in place by every token fed.
So the state layers run such a step position by position (kernels/gdn/by_position.py) and copy the
state after each position j < d into a snapshot slot; once the core knows how many drafts were
accepted (a), `rollback` copies snapshot a into the request's slot (a = d: the slot already holds
the state after every draft). This is SGLang's and vLLM's approach for Qwen3-Next.

Snapshot slots are extra state slots of the same storage (one copy kernel serves both), after the
running requests' slots and the prefix-cache checkpoints: `max_drafts` per running slot, at
`first_slot + state_slot * max_drafts + j`. A fixed map, so staging a step (eager or a CUDA graph)
needs no allocation, and a slot's snapshots are only ever written and read within one step of the
request holding it. The cost: max_num_seqs * k more state slots (docs/gdn.md gives the numbers).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dlengine.kernels.context import PAD_STATE_SLOT


class StateSnapshots:
    """The snapshot slots of a cache's state groups and the rollback the core asks for (the
    engine's StateRollback seam, engine/seams.py).

    kv_cache: the engine's KVCache (its state groups are copied); first_slot: the first snapshot
    slot; num_request_slots: the running requests' slots [0, num_request_slots); max_drafts: k,
    the most drafts a request verifies in one step (the core never proposes more)."""

    def __init__(self, kv_cache, first_slot: int, num_request_slots: int, max_drafts: int) -> None:
        if max_drafts < 1:
            raise ValueError(f"state snapshots need max_drafts >= 1, got {max_drafts}")
        end = first_slot + num_request_slots * max_drafts
        if end > kv_cache.num_state_slots:
            raise ValueError(f"snapshot slots [{first_slot}, {end}) exceed the cache's {kv_cache.num_state_slots} "
                             "state slots")
        self.kv_cache = kv_cache
        self.first_slot, self.num_request_slots, self.max_drafts = first_slot, num_request_slots, max_drafts
        self.num_rollbacks = 0  # slots restored from a snapshot (a draft was rejected)

    @property
    def num_slots(self) -> int:
        return self.num_request_slots * self.max_drafts

    def snapshot_slot(self, state_slot: int, position: int) -> int:
        """Where the state of the request in `state_slot` after its step's position `position`
        (0: its last token; j: j drafts after it) is kept, for position < max_drafts."""
        if not (0 <= state_slot < self.num_request_slots and 0 <= position < self.max_drafts):
            raise ValueError(f"no snapshot slot for state slot {state_slot}, position {position}")
        return self.first_slot + state_slot * self.max_drafts + position

    def layout(self, state_slots: Sequence[int], num_drafts: Sequence[int], width: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """Per position j < width and request i: (the slot row j of request i reads and writes,
        PAD_STATE_SLOT past its 1 + num_drafts[i] rows; the snapshot slot its state goes to after
        row j, -1 unless j < num_drafts[i]), both [width, n] int64."""
        slots = np.asarray(state_slots, dtype=np.int64)
        drafts = np.asarray(num_drafts, dtype=np.int64)
        if len(drafts) and drafts.max() > self.max_drafts:
            raise ValueError(f"a request verifies {int(drafts.max())} drafts; state snapshots hold {self.max_drafts}")
        j = np.arange(width, dtype=np.int64)[:, None]
        rows = np.where(j <= drafts[None, :], slots[None, :], PAD_STATE_SLOT)
        snaps = np.where(j < drafts[None, :], self.first_slot + slots[None, :] * self.max_drafts + j, -1)
        return rows, snaps

    def rollback(self, request, num_drafts: int, num_accepted: int) -> None:
        """After a verify step: make `request`'s slot hold the state after its last token and its
        first `num_accepted` drafts (stream-ordered copies, no host sync)."""
        if num_accepted >= num_drafts:
            return  # the slot already holds the state after every draft
        src = self.snapshot_slot(request.state_slot, num_accepted)
        for g in self.kv_cache.state_groups:
            g.storage[request.state_slot].copy_(g.storage[src])
        self.num_rollbacks += 1
