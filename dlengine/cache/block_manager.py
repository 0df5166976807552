"""Paged KV block manager with reference counts and prefix caching.

A request's KV lives in fixed-size blocks (`block_size` tokens each) named by integer ids into the
per-layer cache tensors (see kv_cache.py). Full blocks are identified by a chained hash
(hash of the parent block's hash + this block's token ids), so two requests that share a prefix
share the same physical blocks and the prefix is computed once.

Invariants (checked by the hypothesis tests in tests/test_block_manager.py):
- a block is either free (ref count 0, in the free queue) or referenced (ref count > 0), never both;
- ref counts are never negative;
- freeing every request returns the free queue to `num_blocks` entries;
- a cache hit returns blocks whose KV was computed from exactly the same token prefix.

Eviction is LRU over unreferenced blocks: the free queue is ordered, blocks are taken from its
front, and a freed block that holds cached KV goes to the back (most recently used). A freed
block with no cached content goes to the front, since keeping it around saves nothing.

Cache specs (specs.py): every paged group of the cache shares one block table per request (block
id b indexes every paged group), so the pool's blocks are counted once and each costs the sum of
the paged specs' page bytes. State specs get a per-sequence slot (`request.state_slot`, from a
StateSlotPool) taken together with the blocks at admission and given back by `free`. Without
specs (the tests) the manager behaves as a plain full-attention pool.

Prefix caching with state specs (hybrid models) needs checkpoints of the state (`num_checkpoint_
slots` > 0, a StateCheckpointPool): a hit may only end at a block whose prefix has a checkpoint,
which the request's state slot is restored from (`request.state_restore` = (checkpoint slot,
position), read by the runner before the step). One checkpoint per prompt is planned, at its last
full block boundary (`request.state_checkpoint` = (slot, position): the runner saves the state
there during the step that crosses it) and published under that block's hash when the step is
done; evicting the block drops its checkpoint. Why only there: docs/gdn.md (a checkpoint of
Qwen3.5-MoE is ~50x the KV of a 64-token block).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

from dlengine.cache.state_slots import StateCheckpointPool, StateSlotPool

if TYPE_CHECKING:  # specs import torch; the block manager (and the scheduler above it) does not
    from dlengine.cache.specs import CacheSpec

DROPPED_BLOCK = -1  # a block table entry freed because it left every sliding window


class BlockRequest(Protocol):
    """What the block manager needs from a request (dlengine.engine.request.Request has it)."""

    all_token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]
    block_hashes: list[bytes]
    num_cached_blocks: int  # leading blocks already published (or found) in the prefix cache
    # optional: `block_extra_key(block_index, block_size) -> bytes`, hashed with the block's tokens
    # (a request with images returns the content hashes of the images in that block)


def hash_block(parent: bytes | None, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    """Chained hash of one full block. 16-byte BLAKE2b: collisions are not a practical concern,
    unlike Python's 64-bit `hash`, and it is stable across processes (needed for KV transfer)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    h.update(extra)
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 specs: Sequence["CacheSpec"] = (), num_state_slots: int = 0, num_checkpoint_slots: int = 0) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.specs = list(specs)
        has_state = any(not s.paged for s in self.specs)
        if has_state and num_state_slots <= 0:
            raise ValueError("state cache specs need num_state_slots > 0 (one per running sequence)")
        self.state_slots: StateSlotPool | None = StateSlotPool(num_state_slots) if has_state else None
        # checkpoint slots follow the running ones in the state storage
        self.checkpoints: StateCheckpointPool | None = (
            StateCheckpointPool(num_state_slots, num_checkpoint_slots)
            if has_state and enable_prefix_caching and num_checkpoint_slots > 0
            and all(getattr(s, "checkpointable", False) for s in self.specs if not s.paged) else None)
        # the first spec whose content a prefix hit cannot restore turns hits off (find_cached_prefix);
        # state specs can be restored from checkpoints when there are any
        self.prefix_cache_blocker: str | None = next(
            (s.describe() for s in self.specs if not s.prefix_cacheable and not (s.paged is False and self.checkpoints)),
            None)
        paged = [s for s in self.specs if s.paged]
        # blocks may leave a request's table once outside its window only if EVERY paged group
        # is windowed: the table is shared, and a full-attention group still reads them
        windows = [getattr(s, "window", 0) for s in paged]
        self.window: int | None = max(windows) if paged and all(windows) else None
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached_blocks: dict[bytes, int] = {}
        # in-use blocks whose content equals a published block's (two requests computed the same
        # prefix in one step): published in its place when that block is evicted
        self.duplicate_of: dict[int, bytes] = {}
        self._duplicates_by_hash: dict[bytes, dict[int, None]] = {}  # the same, indexed by hash (eviction path)

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def bytes_per_block(self) -> int:
        """Cache bytes behind one block id (every paged spec holds it); 0 without specs."""
        return sum(s.page_bytes(self.block_size) for s in self.specs if s.paged)

    @property
    def prefix_caching_active(self) -> bool:
        return self.enable_prefix_caching and self.prefix_cache_blocker is None

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_block_hashes(self, request: BlockRequest) -> None:
        """Extend `request.block_hashes` to cover every full block of its tokens."""
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        # a request with images keys their blocks by the images' content too (Request.block_extra_key)
        extra_key = getattr(request, "block_extra_key", None)
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            extra = extra_key(i, bs) if extra_key is not None else b""
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs], extra))

    def find_cached_prefix(self, request: BlockRequest) -> tuple[list[int], int]:
        """Blocks already holding this request's longest cached prefix, and how many tokens they
        cover. At least one token is always left to compute, because the step that computes it is
        the one that produces logits to sample from.

        No hits at all when a spec cannot be prefix-cached (`prefix_cache_blocker`, e.g. a
        recurrent layer's state without checkpoints): the paged blocks of a prefix would be
        there, but the state after that prefix is not, and resuming needs both."""
        if not self.prefix_caching_active:
            return [], 0
        self.update_block_hashes(request)
        max_blocks = (len(request.all_token_ids) - 1) // self.block_size
        hits: list[int] = []
        for h in request.block_hashes[:max_blocks]:
            block = self.cached_blocks.get(h)
            if block is None:
                break
            hits.append(block)
        if self.checkpoints is not None:
            # a hit must end where a state checkpoint was taken: the state is resumed from there
            while hits and not self.checkpoints.has(request.block_hashes[len(hits) - 1]):
                hits.pop()
            self._plan_checkpoint(request, len(hits))
        return hits, len(hits) * self.block_size

    def _plan_checkpoint(self, request: BlockRequest, num_hit_blocks: int) -> None:
        """Plan the request's checkpoint at its last full block boundary that a later request can
        resume from: m blocks with m * block_size < its length (a hit always leaves one token).
        The slot is reserved when the request is admitted (allocate_slots)."""
        planned = getattr(request, "state_checkpoint", None)
        if planned is not None and planned[0] >= 0:
            return  # already reserved (cannot happen for a waiting request; kept safe)
        m = (len(request.all_token_ids) - 1) // self.block_size
        wanted = m > num_hit_blocks and not self.checkpoints.has(request.block_hashes[m - 1])
        request.state_checkpoint = (-1, m * self.block_size) if wanted else None

    # ------------------------------------------------------------------ allocation
    def can_allocate(self, request: BlockRequest, num_new_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        if not self._state_slot_available(request):
            return False
        return self._num_new_blocks(request, num_new_tokens, cached_blocks) <= self._available(cached_blocks)

    def _state_slot_available(self, request: BlockRequest) -> bool:
        pool = self.state_slots
        return pool is None or not pool.needs_slot(request) or pool.num_free > 0

    def _num_new_blocks(self, request: BlockRequest, num_new_tokens: int, cached_blocks: Sequence[int]) -> int:
        total_tokens = request.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        return max(0, self.blocks_needed(total_tokens) - len(request.block_ids) - len(cached_blocks))

    def _available(self, cached_blocks: Sequence[int]) -> int:
        # cached blocks that nobody references sit in the free queue; taking them shrinks it
        return self.num_free_blocks - sum(1 for b in cached_blocks if self.ref_counts[b] == 0)

    def allocate_slots(self, request: BlockRequest, num_new_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens after the request's computed ones (and after
        `cached_blocks`, the prefix hits found at admission). All-or-nothing: returns False and
        changes nothing when the pool cannot hold them. A request of a model with state specs
        also takes its state slot here (the first time), all-or-nothing with the blocks."""
        n_new = self._num_new_blocks(request, num_new_tokens, cached_blocks)
        if n_new > self._available(cached_blocks) or not self._state_slot_available(request):
            return False
        if self.state_slots is not None:
            self.state_slots.allocate(request)
        if self.checkpoints is not None:
            self._attach_checkpoints(request, cached_blocks)
        for b in cached_blocks:
            self._touch(b)
        request.block_ids.extend(cached_blocks)
        for _ in range(n_new):
            request.block_ids.append(self._take_free_block())
        return True

    def _attach_checkpoints(self, request: BlockRequest, cached_blocks: Sequence[int]) -> None:
        """At admission: the checkpoint a prefix hit resumes from, and a slot for the planned one."""
        if cached_blocks:
            n = len(cached_blocks)
            slot = self.checkpoints.lookup(request.block_hashes[n - 1])
            if slot is None:
                raise RuntimeError("a prefix hit ends at a block without a state checkpoint")
            request.state_restore = (slot, n * self.block_size)
        planned = getattr(request, "state_checkpoint", None)
        if planned is not None and planned[0] < 0:
            slot = self.checkpoints.reserve(request)
            request.state_checkpoint = None if slot is None else (slot, planned[1])

    def _publish_checkpoint(self, request: BlockRequest) -> None:
        """Once the request's computed tokens passed its checkpoint, publish it under the hash of
        the block that ends there (or give the slot back if that block is not cached)."""
        planned = getattr(request, "state_checkpoint", None)
        if planned is None or planned[0] < 0 or request.num_computed_tokens < planned[1]:
            return
        slot, pos = planned
        self.update_block_hashes(request)
        h = request.block_hashes[pos // self.block_size - 1]
        if h in self.cached_blocks:
            self.checkpoints.publish(h, slot)
        else:
            self.checkpoints.release(slot)
        request.state_checkpoint = None

    def _touch(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _take_free_block(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict: its content is about to be overwritten
            if self.cached_blocks.get(h) == block:
                del self.cached_blocks[h]
                self._promote_duplicate(h)
                if self.checkpoints is not None and h not in self.cached_blocks:
                    self.checkpoints.drop(h)  # the prefix it resumes is gone
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def _promote_duplicate(self, h: bytes) -> None:
        """The published block of `h` is gone: publish an in-use copy of the same content, if any
        (an index lookup: this runs on the allocation path, and a batch of same-prefix prompts
        computed together can leave thousands of copies)."""
        copies = self._duplicates_by_hash.get(h)
        if copies:
            block = next(iter(copies))
            self._drop_duplicate(block)
            self.block_hash[block] = h
            self.cached_blocks[h] = block

    def _drop_duplicate(self, block: int) -> None:
        h = self.duplicate_of.pop(block, None)
        if h is not None:
            copies = self._duplicates_by_hash[h]
            del copies[block]
            if not copies:
                del self._duplicates_by_hash[h]

    def cache_full_blocks(self, request: BlockRequest) -> None:
        """Publish the request's computed full blocks in the prefix cache."""
        if not self.prefix_caching_active:
            return  # nothing could ever hit (find_cached_prefix)
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if num_full <= request.num_cached_blocks:
            return  # the common decode step: no block became full
        self.update_block_hashes(request)
        for i in range(request.num_cached_blocks, num_full):
            block = request.block_ids[i]
            if block == DROPPED_BLOCK or self.block_hash[block] is not None:
                continue
            h = request.block_hashes[i]
            if h in self.cached_blocks:
                # the same content already lives in another block: keep that one published and
                # remember this copy, which takes over if that block is evicted first
                self.duplicate_of[block] = h
                self._duplicates_by_hash.setdefault(h, {})[block] = None
                continue
            self.block_hash[block] = h
            self.cached_blocks[h] = block
        request.num_cached_blocks = num_full
        if self.checkpoints is not None:
            self._publish_checkpoint(request)

    def free(self, request: BlockRequest) -> None:
        """Drop the request's references. Tail blocks are freed first so that, among a request's
        blocks, the prefix (most likely to be shared) is evicted last. Its state slot, if any,
        is given back too."""
        for block in reversed(request.block_ids):
            if block != DROPPED_BLOCK:
                self._release(block)
        request.block_ids = []
        request.num_cached_blocks = 0
        if self.state_slots is not None:
            self.state_slots.free(request)
        if self.checkpoints is not None:
            planned = getattr(request, "state_checkpoint", None)
            if planned is not None and planned[0] >= 0:
                self.checkpoints.release(planned[0])
            request.state_checkpoint = request.state_restore = None

    def free_blocks_after(self, request: BlockRequest, num_tokens: int) -> int:
        """Release the request's tail blocks past the first `num_tokens` positions (speculative
        rollback: rejected drafts' and look-ahead slots hold nothing that is read again). Blocks
        that hold computed positions are never among them, so no published or shared block is
        touched. Returns how many blocks were freed."""
        if num_tokens < request.num_computed_tokens:
            raise ValueError(f"free_blocks_after({num_tokens}) would free computed KV "
                             f"({request.num_computed_tokens} tokens computed)")
        keep = self.blocks_needed(num_tokens)
        freed = 0
        while len(request.block_ids) > keep:
            block = request.block_ids.pop()
            if block != DROPPED_BLOCK:
                self._release(block)
                freed += 1
        request.num_cached_blocks = min(request.num_cached_blocks, len(request.block_ids))
        return freed

    def drop_blocks_outside_window(self, request: BlockRequest) -> int:
        """Free the request's leading blocks that no future query reads because they lie wholly
        before every sliding window (only when every paged spec is a SlidingWindowSpec; else a
        no-op). Their table entries become DROPPED_BLOCK so entry i still means tokens
        [i * block_size, (i + 1) * block_size); a sliding-window kernel never reads them. A
        dropped block keeps its published prefix-cache content until evicted. Returns how many
        blocks were freed. Meant to run after a step advanced num_computed_tokens (no caller
        yet: no model uses sliding-window specs)."""
        if self.window is None:
            return 0
        n_out = min(max(0, request.num_computed_tokens - self.window + 1) // self.block_size, len(request.block_ids))
        freed = 0
        for i in range(n_out - 1, -1, -1):  # later blocks first, as in free(): the prefix stays cached longest
            block = request.block_ids[i]
            if block != DROPPED_BLOCK:
                self._release(block)
                request.block_ids[i] = DROPPED_BLOCK
                freed += 1
        return freed

    def _release(self, block: int) -> None:
        rc = self.ref_counts[block] - 1
        if rc < 0:
            raise RuntimeError(f"block {block} freed more times than it was referenced")
        self.ref_counts[block] = rc
        if rc == 0:
            self.free_queue[block] = None
            self._drop_duplicate(block)  # a free copy is just a free block
            if self.block_hash[block] is None:
                self.free_queue.move_to_end(block, last=False)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block that no request references. Returns False (and does nothing)
        while any block is still referenced, since the hashes of live blocks must stay valid."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self.cached_blocks.clear()
        self.duplicate_of.clear()
        self._duplicates_by_hash.clear()
        self.block_hash = [None] * self.num_blocks
        if self.checkpoints is not None:
            self.checkpoints.clear()
        return True

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (used by tests and debug runs)."""
        for b in range(self.num_blocks):
            rc = self.ref_counts[b]
            assert rc >= 0, f"block {b} has negative ref count {rc}"
            assert (rc == 0) == (b in self.free_queue), f"block {b}: ref count {rc} but free={b in self.free_queue}"
        for h, b in self.cached_blocks.items():
            assert self.block_hash[b] == h, f"cached block {b} lost its hash"
        for b, h in self.duplicate_of.items():
            assert self.ref_counts[b] > 0, f"duplicate block {b} is free"
            assert self.block_hash[b] is None, f"duplicate block {b} is also published"
            assert self.cached_blocks.get(h) not in (None, b), f"duplicate block {b} of an unpublished hash"
            assert b in self._duplicates_by_hash.get(h, {}), f"duplicate block {b} missing from the hash index"
        assert sum(map(len, self._duplicates_by_hash.values())) == len(self.duplicate_of), "stale hash index"
        if self.state_slots is not None:
            self.state_slots.check_invariants()
        if self.checkpoints is not None:
            self.checkpoints.check_invariants()
            for h in self.checkpoints.published_hashes():
                assert h in self.cached_blocks, "a state checkpoint outlived its cached block"
