"""BlockManager: reference counts, LRU eviction, prefix caching, all-or-nothing allocation.

The stateful test drives random admit / extend / compute / append / free / preempt-and-resume /
exhaust / reset sequences over requests drawn from a tiny alphabet (so prefixes collide and the
prefix cache is hit often) and checks the bookkeeping after every operation. Alongside it runs a
simulated KV cache: every slot a request computes receives a fingerprint of the exact token
prefix it ends, freshly taken blocks are poisoned, and every cache hit and every computed
position a request would attend to is checked against the request's own prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from dlengine.cache.block_manager import BlockManager, hash_block


@dataclass(eq=False)
class FakeRequest:
    """The BlockRequest protocol, plus test-side state (`pending`: slots allocated, not yet computed)."""

    all_token_ids: list[int]
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0
    pending: int = 0
    name: str = ""
    hog: bool = False


class TracingBlockManager(BlockManager):
    """Poisons the simulated KV of every block handed out fresh: its old content is overwritten."""

    def __init__(self, *args, kv: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kv = kv if kv is not None else {}

    def _take_free_block(self) -> int:
        block = super()._take_free_block()
        self.kv[block] = [None] * self.block_size
        return block


def fingerprint(tokens: list[int], pos: int) -> tuple[int, ...]:
    """What the KV at token position `pos` depends on: the whole prefix up to and including it."""
    return tuple(tokens[: pos + 1])


def snapshot(bm: BlockManager, *reqs: FakeRequest):
    return (
        list(bm.ref_counts),
        list(bm.free_queue.keys()),  # order matters (LRU)
        dict(bm.cached_blocks),
        list(bm.block_hash),
        [list(r.block_ids) for r in reqs],
        [r.num_computed_tokens for r in reqs],
    )


def prefill(bm: BlockManager, tokens: list[int], name: str = "") -> FakeRequest:
    """Admit a request, compute all its tokens and publish its full blocks (what a step does)."""
    req = FakeRequest(list(tokens), name=name)
    hits, num_cached = bm.find_cached_prefix(req)
    assert bm.allocate_slots(req, len(tokens) - num_cached, hits)
    req.num_computed_tokens = len(tokens)
    bm.cache_full_blocks(req)
    return req


# ====================================================================== stateful test
ALPHABET = st.integers(0, 1)
FRESH_TOKENS = st.lists(ALPHABET, min_size=0, max_size=12)


class BlockManagerMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 2, 3, 4]),
        num_blocks=st.integers(1, 24),
        prefix_caching=st.sampled_from([True, True, True, False]),
    )
    def setup(self, block_size, num_blocks, prefix_caching):
        self.kv: dict[int, list] = {}
        self.bm = TracingBlockManager(num_blocks, block_size, prefix_caching, kv=self.kv)
        self.bs = block_size
        self.live: list[FakeRequest] = []
        self.seen: list[list[int]] = []  # token lists of past requests, to build colliding prompts
        self.counter = 0
        self.hash_prefix: dict[bytes, tuple[int, ...]] = {}  # every block hash seen -> its token prefix

    # ---------------------------------------------------------------- helpers
    def _note_hashes(self, req: FakeRequest) -> None:
        bs = self.bs
        for i, h in enumerate(req.block_hashes):
            prefix = tuple(req.all_token_ids[: (i + 1) * bs])
            # the chained hash names exactly one prefix (no collisions in these tiny examples)
            assert self.hash_prefix.setdefault(h, prefix) == prefix

    def _check_hits(self, req: FakeRequest, hits: list[int], num_cached: int) -> None:
        bm, bs = self.bm, self.bs
        assert num_cached == len(hits) * bs
        assert num_cached <= len(req.all_token_ids) - 1, "at least one token must be left to compute"
        assert len(set(hits)) == len(hits)
        if not bm.enable_prefix_caching:
            assert hits == []
            return
        self._note_hashes(req)
        if hits:
            event("prefix cache hit")
        # longest prefix: the next block (if it could have been a hit) is not cached
        max_blocks = (len(req.all_token_ids) - 1) // bs
        if len(hits) < max_blocks:
            assert req.block_hashes[len(hits)] not in bm.cached_blocks
        # cache hits return identical KV: each hit block holds this request's own prefix
        for i, b in enumerate(hits):
            assert bm.block_hash[b] == req.block_hashes[i]
            for s in range(bs):
                assert self.kv[b][s] == fingerprint(req.all_token_ids, i * bs + s), (
                    f"cache hit block {b} (index {i}) holds KV of another prefix"
                )

    def _try_allocate(self, req: FakeRequest, n: int, hits: list[int]) -> bool:
        bm = self.bm
        expected_new = max(0, bm.blocks_needed(req.num_computed_tokens + len(hits) * self.bs + n)
                           - len(req.block_ids) - len(hits))
        available = bm.num_free_blocks - sum(1 for b in hits if bm.ref_counts[b] == 0)
        predicted = expected_new <= available
        assert bm.can_allocate(req, n, hits) == predicted
        before = snapshot(bm, req, *self.live)
        n_blocks_before = len(req.block_ids)
        ok = bm.allocate_slots(req, n, hits)
        assert ok == predicted
        if not ok:
            event("allocation refused")
            assert snapshot(bm, req, *self.live) == before, "failed allocate_slots changed state"
        else:
            assert req.block_ids[:n_blocks_before] == before[4][0]
            assert req.block_ids[n_blocks_before:n_blocks_before + len(hits)] == list(hits)
            assert len(req.block_ids) == n_blocks_before + len(hits) + expected_new
        return ok

    def _admit(self, req: FakeRequest, data) -> None:
        hits, num_cached = self.bm.find_cached_prefix(req)
        self._check_hits(req, hits, num_cached)
        remaining = len(req.all_token_ids) - num_cached
        n = data.draw(st.integers(1, remaining), label="n")
        if self._try_allocate(req, n, hits):
            req.num_computed_tokens = num_cached
            req.pending = n
            self.live.append(req)

    def _compute(self, req: FakeRequest) -> None:
        """The model runs the pending tokens: write their KV, advance, publish full blocks."""
        bm, bs = self.bm, self.bs
        c, n = req.num_computed_tokens, req.pending
        assert len(req.block_ids) * bs >= c + n
        for p in range(c, c + n):
            b = req.block_ids[p // bs]
            assert bm.ref_counts[b] == 1, f"writing into block {b} shared by {bm.ref_counts[b]} requests"
            assert bm.block_hash[b] is None, f"writing into published block {b}"
            self.kv[b][p % bs] = fingerprint(req.all_token_ids, p)
        req.num_computed_tokens += n
        req.pending = 0
        bm.cache_full_blocks(req)
        self._note_hashes(req)
        if bm.enable_prefix_caching:
            # every block that just became full is published, unless its content already is
            for i in range(c // bs, (c + n) // bs):
                b, h = req.block_ids[i], req.block_hashes[i]
                assert bm.block_hash[b] == h or (bm.block_hash[b] is None and h in bm.cached_blocks), (
                    f"newly full block {i} of {req.name} was not published"
                )

    def _pick(self, data, pred=lambda r: True) -> FakeRequest | None:
        cands = [r for r in self.live if not r.hog and pred(r)]
        return data.draw(st.sampled_from(cands), label="request") if cands else None

    # ---------------------------------------------------------------- rules
    def _admit_new(self, fresh, data):
        """A new request; half the time its prompt starts with part of an earlier one. Often it
        runs right away (its first chunk computed and published in the same step)."""
        tokens = list(fresh)
        if self.seen and data.draw(st.booleans(), label="reuse prefix"):
            base = data.draw(st.sampled_from(self.seen), label="base")
            tokens = base[: data.draw(st.integers(0, len(base)), label="cut")] + tokens
        if not tokens:
            tokens = [0]
        self.counter += 1
        self.seen.append(list(tokens))
        req = FakeRequest(tokens, name=f"r{self.counter}")
        self._admit(req, data)
        if req in self.live and data.draw(st.booleans(), label="compute now"):
            self._compute(req)

    def _extend(self, data):
        """Allocate more slots for a running request (a later prefill chunk or a decode)."""
        req = self._pick(data, lambda r: not r.pending and r.num_computed_tokens < len(r.all_token_ids))
        if req is None:
            return
        n = data.draw(st.integers(1, len(req.all_token_ids) - req.num_computed_tokens), label="n")
        if self._try_allocate(req, n, []):
            req.pending = n
            if data.draw(st.booleans(), label="compute now"):
                self._compute(req)

    # admission and extension are the interesting operations: give them more weight
    admit = rule(fresh=FRESH_TOKENS, data=st.data())(_admit_new)
    admit_more = rule(fresh=FRESH_TOKENS, data=st.data())(_admit_new)
    admit_even_more = rule(fresh=FRESH_TOKENS, data=st.data())(_admit_new)
    extend = rule(data=st.data())(_extend)
    extend_more = rule(data=st.data())(_extend)

    @rule(data=st.data())
    def compute_one(self, data):
        req = self._pick(data, lambda r: r.pending > 0)
        if req is not None:
            self._compute(req)

    @rule()
    def compute_all(self):
        """A model step: everything allocated so far is computed, then published."""
        for r in self.live:
            if r.pending and not r.hog:
                self._compute(r)

    @rule(data=st.data(), tokens=st.lists(ALPHABET, min_size=1, max_size=3))
    def append(self, data, tokens):
        """Sampled tokens join the request (once everything known is computed, as in the engine)."""
        req = self._pick(data, lambda r: not r.pending and r.num_computed_tokens == len(r.all_token_ids))
        if req is not None:
            req.all_token_ids.extend(tokens)
            self.seen.append(list(req.all_token_ids))

    def _free(self, data):
        req = self._pick(data)
        if req is not None:
            self.bm.free(req)
            assert req.block_ids == []
            self.live.remove(req)

    free = rule(data=st.data())(_free)
    free_more = rule(data=st.data())(_free)

    @rule(data=st.data())
    def preempt_and_resume(self, data):
        """What the scheduler does on preemption: free, forget progress, re-admit."""
        req = self._pick(data)
        if req is None:
            return
        self.bm.free(req)
        self.live.remove(req)
        req.num_computed_tokens = 0
        req.pending = 0
        self._admit(req, data)

    @rule(tokens=st.lists(ALPHABET, min_size=1, max_size=4))
    def exhaust(self, tokens):
        """Take every free block, check one more token does not fit, keep the hog alive."""
        bm = self.bm
        n_free = bm.num_free_blocks
        if n_free == 0:
            return
        self.counter += 1
        hog = FakeRequest(list(tokens) * 50, name=f"hog{self.counter}", hog=True)
        assert self._try_allocate(hog, n_free * self.bs, [])
        hog.pending = n_free * self.bs  # never computed: holds no KV, never publishes
        self.live.append(hog)
        assert bm.num_free_blocks == 0
        assert not self._try_allocate(hog, n_free * self.bs + 1, [])
        assert not self._try_allocate(FakeRequest([0]), 1, [])

    @rule()
    def free_hogs(self):
        for r in [r for r in self.live if r.hog]:
            self.bm.free(r)
            self.live.remove(r)

    @rule()
    def reset(self):
        bm = self.bm
        before = snapshot(bm, *self.live)
        if any(r.block_ids for r in self.live):
            assert bm.reset_prefix_cache() is False
            assert snapshot(bm, *self.live) == before
        else:
            assert bm.reset_prefix_cache() is True
            assert bm.cached_blocks == {}
            assert all(h is None for h in bm.block_hash)
            assert bm.num_free_blocks == bm.num_blocks

    @rule()
    def free_all(self):
        for r in list(self.live):
            self.bm.free(r)
        self.live.clear()
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(rc == 0 for rc in self.bm.ref_counts)

    # ---------------------------------------------------------------- invariants
    @invariant()
    def bookkeeping(self):
        if not hasattr(self, "bm"):
            return
        bm, bs = self.bm, self.bs
        bm.check_invariants()
        refs = [0] * bm.num_blocks
        for r in self.live:
            assert len(set(r.block_ids)) == len(r.block_ids), f"{r.name} holds a block twice"
            assert 0 <= r.num_cached_blocks <= min(r.num_computed_tokens // bs, len(r.block_ids))
            for i, b in enumerate(r.block_ids):  # a block a request holds never names another prefix
                assert bm.block_hash[b] is None or bm.block_hash[b] == r.block_hashes[i]
            assert len(r.block_ids) == bm.blocks_needed(r.num_computed_tokens + r.pending)
            for b in r.block_ids:
                refs[b] += 1
        assert bm.ref_counts == refs, "ref counts differ from the live requests' block lists"
        assert sum(bm.ref_counts) == sum(len(r.block_ids) for r in self.live)
        assert all(rc >= 0 for rc in bm.ref_counts)
        free = set(bm.free_queue)
        assert len(free) == bm.num_free_blocks
        assert not any(b in free for r in self.live for b in r.block_ids), "a block is both free and referenced"
        assert free | {b for r in self.live for b in r.block_ids} == set(range(bm.num_blocks))
        # every published block holds the KV its hash names
        assert len(set(bm.cached_blocks.values())) == len(bm.cached_blocks)
        for h, b in bm.cached_blocks.items():
            prefix = self.hash_prefix[h]
            for s in range(bs):
                assert self.kv[b][s] == prefix[: len(prefix) - bs + s + 1]
        # what every live request would attend to is its own prefix
        for r in self.live:
            for p in range(r.num_computed_tokens):
                assert self.kv[r.block_ids[p // bs]][p % bs] == fingerprint(r.all_token_ids, p)

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for r in list(self.live):
            self.bm.free(r)
        assert self.bm.num_free_blocks == self.bm.num_blocks
        assert all(rc == 0 for rc in self.bm.ref_counts)
        self.bm.check_invariants()


BlockManagerMachine.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestBlockManagerStateful = BlockManagerMachine.TestCase


# ====================================================================== unit tests
def test_hash_is_chained_and_stable():
    a = hash_block(None, [1, 2])
    assert a == hash_block(None, [1, 2])
    assert len(a) == 16
    assert hash_block(a, [3, 4]) != hash_block(None, [3, 4])
    assert hash_block(a, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])


def test_lru_evicts_least_recently_freed_cached_block_first():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = prefill(bm, [1, 1])
    b = prefill(bm, [2, 2])
    c = prefill(bm, [3, 3])
    blocks = {"a": a.block_ids[0], "b": b.block_ids[0], "c": c.block_ids[0]}
    assert len(bm.cached_blocks) == 3
    bm.free(b)
    bm.free(a)
    bm.free(c)  # LRU order: b, a, c
    assert list(bm.free_queue) == [blocks["b"], blocks["a"], blocks["c"]]

    d = FakeRequest([7, 7, 7])
    assert bm.allocate_slots(d, 1)
    assert d.block_ids == [blocks["b"]]
    assert bm.find_cached_prefix(FakeRequest([2, 2, 0]))[1] == 0  # evicted
    assert bm.find_cached_prefix(FakeRequest([1, 1, 0]))[0] == [blocks["a"]]
    assert bm.find_cached_prefix(FakeRequest([3, 3, 0]))[0] == [blocks["c"]]
    assert bm.allocate_slots(d, 3)
    assert d.block_ids == [blocks["b"], blocks["a"]]
    bm.check_invariants()


def test_cache_hit_refreshes_lru_position():
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = prefill(bm, [1, 1]), prefill(bm, [2, 2])
    ba, bb = a.block_ids[0], b.block_ids[0]
    bm.free(a)
    bm.free(b)  # LRU: (unused), a, b
    hit = FakeRequest([1, 1, 9])
    hits, n = bm.find_cached_prefix(hit)
    assert hits == [ba] and n == 2
    assert bm.allocate_slots(hit, 1, hits)  # takes the never-used block for the tail
    bm.free(hit)  # a is now most recently used: LRU is (tail, uncached, front), b, a
    assert list(bm.free_queue)[-2:] == [bb, ba]
    d = FakeRequest([8] * 4)
    assert bm.allocate_slots(d, 4)
    assert bb in d.block_ids and ba not in d.block_ids
    assert bm.find_cached_prefix(FakeRequest([1, 1, 0]))[0] == [ba]


def test_uncached_freed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = prefill(bm, [1, 1, 1])  # block 0 full (cached), block 1 partial (uncached)
    full, partial = a.block_ids
    assert bm.block_hash[full] is not None and bm.block_hash[partial] is None
    bm.free(a)
    assert list(bm.free_queue) == [partial, full]
    b = FakeRequest([5])
    assert bm.allocate_slots(b, 1)
    assert b.block_ids == [partial]  # the cached block survives
    hits, n = bm.find_cached_prefix(FakeRequest([1, 1, 1]))
    assert hits == [full] and n == 2


def test_freed_request_prefix_is_evicted_last():
    bm = BlockManager(num_blocks=3, block_size=1)
    a = prefill(bm, [1, 2, 3])  # three full, cached blocks
    blocks = list(a.block_ids)
    bm.free(a)
    # tail freed first: the first block (the most shareable prefix) is the last to be evicted
    assert list(bm.free_queue) == list(reversed(blocks))
    assert list(bm.free_queue)[-1] == bm.cached_blocks[hash_block(None, [1])]


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_block_aligned_prompt_leaves_one_token_to_compute(block_size):
    bm = BlockManager(num_blocks=16, block_size=block_size)
    prompt = list(range(2 * block_size))  # exactly two blocks
    bm.free(prefill(bm, prompt))
    again = FakeRequest(list(prompt))
    hits, num_cached = bm.find_cached_prefix(again)
    assert num_cached == len(prompt) - block_size  # the last block is recomputed ...
    assert len(prompt) - num_cached >= 1  # ... so at least one token produces logits
    assert len(hits) == 1
    longer = FakeRequest(prompt + [99])
    hits, num_cached = bm.find_cached_prefix(longer)
    assert num_cached == len(prompt) and len(hits) == 2
    one_block = FakeRequest(prompt[:block_size])
    assert bm.find_cached_prefix(one_block) == ([], 0)


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = prefill(bm, [1, 2, 3, 4, 5])
    cached = dict(bm.cached_blocks)
    assert len(cached) == 2
    assert bm.reset_prefix_cache() is False  # blocks still referenced: nothing changes
    assert bm.cached_blocks == cached
    bm.free(a)
    assert bm.find_cached_prefix(FakeRequest([1, 2, 3, 4, 5]))[1] == 4
    assert bm.reset_prefix_cache() is True
    assert bm.cached_blocks == {} and all(h is None for h in bm.block_hash)
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.find_cached_prefix(FakeRequest([1, 2, 3, 4, 5])) == ([], 0)
    bm.check_invariants()
    # the pool is fully usable afterwards
    big = FakeRequest([0] * 8)
    assert bm.allocate_slots(big, 8)
    assert bm.num_free_blocks == 0


def test_freeing_twice_raises():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = prefill(bm, [1, 2, 3])
    stale = FakeRequest(list(a.all_token_ids), block_ids=list(a.block_ids))  # a second handle on a's blocks
    bm.free(a)
    with pytest.raises(RuntimeError, match="freed more times"):
        bm.free(stale)
    # freeing the same request object again is a no-op: free() clears its block list, which is
    # what makes Scheduler.finish_request safe after a preemption already freed the blocks
    bm2 = BlockManager(num_blocks=4, block_size=2)
    b = prefill(bm2, [1, 2, 3])
    bm2.free(b)
    bm2.free(b)
    assert bm2.num_free_blocks == 4
    bm2.check_invariants()


def test_allocate_is_all_or_nothing_with_cache_hits_in_the_free_queue():
    bm = BlockManager(num_blocks=3, block_size=2)
    bm.free(prefill(bm, [1, 1, 2, 2, 3]))  # 3 blocks, the first two cached, all free now
    ok = FakeRequest([1, 1, 2, 2, 4])
    hits, n = bm.find_cached_prefix(ok)
    assert n == 4
    # the two hit blocks sit in the free queue: only one block is really available
    assert bm.can_allocate(ok, 1, hits)
    too_big = FakeRequest([1, 1, 2, 2, 5, 5, 6])
    hits2, n2 = bm.find_cached_prefix(too_big)
    assert hits2 == hits and n2 == 4
    before = snapshot(bm, too_big)
    assert not bm.can_allocate(too_big, 3, hits2)
    assert not bm.allocate_slots(too_big, 3, hits2)
    assert snapshot(bm, too_big) == before
    assert bm.allocate_slots(ok, 1, hits)
    assert ok.block_ids[:2] == hits and bm.num_free_blocks == 0
    bm.check_invariants()


def test_shared_prefix_blocks_are_ref_counted():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = prefill(bm, [1, 2, 3, 4, 5])
    b = prefill(bm, [1, 2, 3, 4, 6, 7])
    assert b.block_ids[:2] == a.block_ids[:2]
    assert [bm.ref_counts[x] for x in a.block_ids] == [2, 2, 1]
    bm.free(a)
    assert [bm.ref_counts[x] for x in b.block_ids] == [1, 1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def _two_copies_of_one_prefix(bm: BlockManager) -> tuple[FakeRequest, FakeRequest, bytes]:
    a, b = FakeRequest([1, 2, 3]), FakeRequest([1, 2, 4])
    for r in (a, b):  # both admitted in the same step, before either is cached
        assert bm.find_cached_prefix(r) == ([], 0)
        assert bm.allocate_slots(r, 3)
    for r in (a, b):
        r.num_computed_tokens = 3
        bm.cache_full_blocks(r)
    return a, b, hash_block(None, [1, 2])


def test_duplicate_content_is_published_once():
    """Two requests that computed the same prefix side by side: only one block is published."""
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b, h = _two_copies_of_one_prefix(bm)
    a0, b0 = a.block_ids[0], b.block_ids[0]
    assert bm.cached_blocks[h] == a0
    assert bm.block_hash[b0] is None
    bm.free(a)
    bm.free(b)
    assert bm.find_cached_prefix(FakeRequest([1, 2, 5]))[0] == [a0]
    bm.check_invariants()


def test_duplicate_block_is_published_when_the_original_is_evicted():
    """Two requests computed one prefix side by side: a's copy is published; when it is evicted
    while b still holds its copy, b's copy takes over, so the prefix stays cached."""
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b, h = _two_copies_of_one_prefix(bm)
    assert bm.duplicate_of == {b.block_ids[0]: h}
    bm.free(a)  # a's blocks go to the free queue; take them all to evict a's cached block
    assert bm.allocate_slots(FakeRequest([9] * 4), 4)
    assert bm.cached_blocks.get(h) == b.block_ids[0] and bm.block_hash[b.block_ids[0]] == h
    assert bm.duplicate_of == {}
    bm.check_invariants()
    b.all_token_ids.append(7)  # b decodes on, filling its second block
    assert bm.allocate_slots(b, 1)
    b.num_computed_tokens = 4
    bm.cache_full_blocks(b)
    assert bm.block_hash[b.block_ids[1]] is not None
    # a new request with the prefix hits b's copy
    c = FakeRequest([1, 2, 4, 7, 5])
    assert bm.find_cached_prefix(c) == (b.block_ids[:2], 4)
    bm.check_invariants()


def test_a_freed_duplicate_is_forgotten():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b, h = _two_copies_of_one_prefix(bm)
    bm.free(b)
    assert bm.duplicate_of == {} and bm.cached_blocks[h] == a.block_ids[0]
    bm.check_invariants()


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    bm.free(prefill(bm, [1, 2, 3]))
    assert bm.cached_blocks == {}
    assert bm.find_cached_prefix(FakeRequest([1, 2, 3])) == ([], 0)


def test_bad_num_blocks():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=2)
