"""Scheduler + BlockManager driven by a fake model.

No torch model: after `schedule()` the test plays the model. It writes a fingerprint of the exact
token prefix into a simulated KV cache for every token a request computes (and checks that every
position a request attends to holds its own prefix), calls `update_after_step`, then appends one
token to every request scheduled with `sample=True`. The "model" is deterministic: the next token
is a function of the whole sequence, like greedy decoding, so a request's final tokens must not
depend on how it was batched, chunked, cached or preempted.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from dlengine.cache.block_manager import BlockManager
from dlengine.config import SchedulerConfig
from dlengine.engine.request import Request, RequestStatus
from dlengine.engine.scheduler import Scheduler
from dlengine.sampling_params import SamplingParams


def next_token(tokens: list[int], vocab: int = 3) -> int:
    """The fake model: a deterministic function of the whole sequence (ints hash stably)."""
    return hash(tuple(tokens)) % vocab


def rollout(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens


class TracingBlockManager(BlockManager):
    """Poisons the simulated KV of every block handed out fresh: its old content is overwritten."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kv: dict[int, list] = {}

    def _take_free_block(self) -> int:
        block = super()._take_free_block()
        self.kv[block] = [None] * self.block_size
        return block


def note(what: str) -> None:
    """hypothesis.event, also usable from the deterministic tests."""
    if currently_in_test_context():
        event(what)


def make_request(i: int, prompt: list[int], max_tokens: int) -> Request:
    return Request(f"r{i}", list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_time=float(i))


@dataclass
class Spec:
    prompt: list[int]
    max_tokens: int
    arrival: int  # step at which it is added
    abort: tuple[int, bool] | None  # (steps after arrival, mid-step?) or never


@dataclass
class Workload:
    specs: list[Spec]
    block_size: int
    num_blocks: int
    max_num_batched_tokens: int
    max_num_seqs: int
    chunked_prefill: bool
    prefix_caching: bool


@st.composite
def workloads(draw, max_requests: int = 7, max_new_tokens: int = 6) -> Workload:
    block_size = draw(st.sampled_from([1, 2, 3, 4]))
    vocab = draw(st.integers(1, 3))
    tok = st.integers(0, vocab - 1)
    base = draw(st.lists(tok, max_size=10))  # prompts share prefixes of this, so the cache hits
    specs = []
    for _ in range(draw(st.integers(1, max_requests))):
        prompt = base[: draw(st.integers(0, len(base)))] + draw(st.lists(tok, max_size=7))
        specs.append(Spec(
            prompt=prompt or [0],
            max_tokens=draw(st.integers(1, max_new_tokens)),
            arrival=draw(st.integers(0, 6)),
            abort=draw(st.one_of(st.none(), st.none(), st.tuples(st.integers(0, 20), st.booleans()))),
        ))
    # KV a request can ever need: its last sampled token is never fed back
    max_len = max(len(s.prompt) + s.max_tokens - 1 for s in specs)
    min_blocks = -(-max_len // block_size)  # the pool always holds one longest request
    num_blocks = draw(st.one_of(st.just(min_blocks), st.integers(min_blocks, min_blocks + 12)))
    chunked = draw(st.booleans())
    if chunked:
        budget = draw(st.integers(1, 12))
    else:  # a whole (re)computed request must fit in one step
        budget = draw(st.one_of(st.just(max_len), st.integers(max_len, max_len + 8)))
    return Workload(
        specs=specs,
        block_size=block_size,
        num_blocks=num_blocks,
        max_num_batched_tokens=budget,
        max_num_seqs=draw(st.integers(1, 5)),
        chunked_prefill=chunked,
        prefix_caching=draw(st.booleans()),
    )


class Harness:
    """Runs a scheduler against the fake model and checks its invariants after every step."""

    def __init__(self, w: Workload) -> None:
        self.w = w
        self.bm = TracingBlockManager(w.num_blocks, w.block_size, w.prefix_caching)
        self.config = SchedulerConfig(
            max_num_batched_tokens=w.max_num_batched_tokens,
            max_num_seqs=w.max_num_seqs,
            chunked_prefill=w.chunked_prefill,
        )
        self.sched = Scheduler(self.config, self.bm)
        self.requests: list[Request] = []
        self.expected: dict[int, list[int]] = {}
        self.aborted: set[int] = set()
        self.ever_run: set[int] = set()

    # ---------------------------------------------------------------- driving
    def add(self, req: Request, max_tokens: int) -> None:
        self.requests.append(req)
        self.expected[id(req)] = rollout(req.prompt_token_ids, max_tokens)
        self.sched.add_request(req)
        self.check_waiting_order()

    def abort(self, req: Request) -> None:
        was_finished = req.is_finished
        free_before = self.bm.num_free_blocks
        self.sched.finish_request(req)
        assert req.is_finished and req.block_ids == []
        assert req not in self.sched.running and req not in self.sched.waiting
        if was_finished:
            assert self.bm.num_free_blocks == free_before  # finishing twice is harmless
        else:
            note("abort")
            self.aborted.add(id(req))

    def step(self, mid_step_aborts=()):
        sched, bm, bs = self.sched, self.bm, self.w.block_size
        had_work = sched.has_unfinished()
        pre_running = list(sched.running)
        pre_waiting = list(sched.waiting)
        pre_tokens = {id(r): list(r.all_token_ids) for r in pre_running + pre_waiting}

        out = sched.schedule()
        scheduled = [s.request for s in out.scheduled]

        # progress: with work pending, every step runs something
        if had_work:
            assert out.scheduled, "a step with unfinished requests scheduled nothing"
        # budgets
        assert out.num_batched_tokens <= self.config.max_num_batched_tokens
        assert len(sched.running) <= self.config.max_num_seqs
        assert len({id(r) for r in scheduled}) == len(scheduled), "a request was scheduled twice in one step"

        # preemption: the newest running requests, newest first, and never the oldest one
        k = len(out.preempted)
        assert out.preempted == list(reversed(pre_running))[:k], "preemption did not pick the newest running request"
        if pre_running:  # it alone always fits the pool, and it preempts only newer requests
            assert all(r is not pre_running[0] for r in out.preempted), "the oldest running request was preempted"
        for r in out.preempted:
            assert r.status == RequestStatus.PREEMPTED
            assert r in sched.waiting and r not in sched.running
            assert r.block_ids == [] and r.num_computed_tokens == 0
            assert r.all_token_ids == pre_tokens[id(r)], "preemption changed a request's tokens"
            assert all(r is not s for s in scheduled)
        if k:
            note("preemption")
            assert all(r in pre_running for r in scheduled), "admitted new work in a step that preempted"
            # preempted requests wait at the front, oldest (in running order) first
            assert list(sched.waiting)[:k] == list(reversed(out.preempted))

        # admission is first come first served from the front of the waiting queue
        admitted = [r for r in scheduled if not any(r is p for p in pre_running)]
        if out.num_cached_tokens:
            note("prefix cache hit")
        if any(id(r) in self.ever_run for r in admitted):
            note("preempted request resumed")
        assert admitted == pre_waiting[: len(admitted)]
        kept = [r for r in pre_running if not any(r is p for p in out.preempted)]
        assert sched.running == kept + admitted
        # running requests are served oldest first: the scheduled ones are a prefix of `running`
        assert [s.request for s in out.scheduled] == sched.running[: len(out.scheduled)]

        decode = prefill = False
        for s in out.scheduled:
            r, n = s.request, s.num_new_tokens
            c = r.num_computed_tokens
            assert r.status == RequestStatus.RUNNING
            assert n >= 1 and c + n <= r.num_tokens
            assert s.sample == (c + n == r.num_tokens)
            if not self.config.chunked_prefill:
                assert c + n == r.num_tokens, "without chunked prefill a request runs whole"
            assert len(r.block_ids) * bs >= c + n, "blocks do not cover the scheduled tokens"
            assert len(r.block_ids) == bm.blocks_needed(c + n), "over-allocated blocks"
            if r in admitted:
                assert c % bs == 0 and c == r.metrics.num_cached_tokens
                if not self.w.prefix_caching:
                    assert c == 0
            if n == 1 and s.sample and r.num_output_tokens > 0 and c == r.num_tokens - 1:
                decode = True
            else:
                prefill = True
            # the model attends to positions [0, c): they must hold this request's own prefix
            # (prefix-cache hits included), and writes [c, c + n) into blocks only it holds
            for p in range(c):
                assert bm.kv[r.block_ids[p // bs]][p % bs] == tuple(r.all_token_ids[: p + 1]), (
                    f"{r.request_id} position {p} attends to KV of another prefix"
                )
            for p in range(c, c + n):
                b = r.block_ids[p // bs]
                assert bm.ref_counts[b] == 1 and bm.block_hash[b] is None, f"writing into shared block {b}"
                bm.kv[b][p % bs] = tuple(r.all_token_ids[: p + 1])
        if decode and prefill:
            note("decode and prefill in one step")
        self.ever_run.update(id(r) for r in scheduled)

        for r in mid_step_aborts:
            self.abort(r)

        sched.update_after_step(out)

        for s in out.scheduled:
            r = s.request
            if not s.sample or r.is_finished:
                continue
            r.append_token(next_token(r.all_token_ids))
            if r.num_output_tokens >= r.params.max_tokens:
                assert r.all_token_ids == self.expected[id(r)], "tokens depend on scheduling"
                sched.finish_request(r)
        self.check_state()
        return out

    # ---------------------------------------------------------------- invariants
    def check_waiting_order(self) -> None:
        """Requests that already ran (preempted ones) wait ahead of every never-run request."""
        flags = [id(r) in self.ever_run for r in self.sched.waiting]
        assert flags == sorted(flags, reverse=True), "a never-run request waits ahead of a preempted one"

    def check_state(self) -> None:
        sched, bm = self.sched, self.bm
        bm.check_invariants()
        self.check_waiting_order()
        refs = [0] * bm.num_blocks
        for r in sched.running:
            assert r.status == RequestStatus.RUNNING
            assert len(r.block_ids) == bm.blocks_needed(r.num_computed_tokens)
            assert len(set(r.block_ids)) == len(r.block_ids)
            assert r.num_computed_tokens <= r.num_tokens
            for b in r.block_ids:
                refs[b] += 1
        for r in sched.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert r.block_ids == [] and r.num_computed_tokens == 0, "a waiting request holds KV"
            assert (r.status == RequestStatus.PREEMPTED) == (id(r) in self.ever_run)
        assert bm.ref_counts == refs, "block references leak or are missing"
        assert set(bm.free_queue) == {b for b in range(bm.num_blocks) if refs[b] == 0}
        live = {id(r) for r in list(sched.running) + list(sched.waiting)}
        assert len(live) == len(sched.running) + len(sched.waiting)
        for r in self.requests:
            if id(r) not in live:
                assert r.is_finished and r.block_ids == []


def run_workload(w: Workload) -> Harness:
    h = Harness(w)
    specs = sorted(enumerate(w.specs), key=lambda t: t[1].arrival)
    reqs = {i: make_request(i, s.prompt, s.max_tokens) for i, s in specs}
    max_len = max(len(s.prompt) + s.max_tokens - 1 for s in w.specs)
    last_arrival = max(s.arrival for s in w.specs)
    # liveness bound: the oldest running request is never preempted and advances >= 1 token a
    # step, so each request, once oldest, needs at most (recompute + decodes) <= 2 * max_len steps
    bound = last_arrival + len(w.specs) * (2 * max_len + 1) + 2
    step = 0
    while True:
        for i, s in specs:
            if s.arrival == step:
                h.add(reqs[i], s.max_tokens)
        mid = []
        for i, s in specs:
            if s.abort is not None and s.arrival + s.abort[0] == step:
                if s.abort[1]:
                    mid.append(reqs[i])
                else:
                    h.abort(reqs[i])
        if step > last_arrival and not h.sched.has_unfinished():
            break
        assert step <= bound, f"no termination after {step} steps"
        h.step(mid)
        step += 1

    # everything finished, every block back in the pool
    bm = h.bm
    assert bm.num_free_blocks == bm.num_blocks
    assert all(rc == 0 for rc in bm.ref_counts)
    bm.check_invariants()
    for i, r in reqs.items():
        assert r.is_finished
        if id(r) not in h.aborted:
            assert r.num_output_tokens == w.specs[i].max_tokens
            assert r.all_token_ids == h.expected[id(r)]
    assert h.sched.num_preemptions == sum(r.metrics.num_preemptions for r in reqs.values())
    return h


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_scheduler_invariants_random_workloads(w):
    run_workload(w)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads().map(lambda w: Workload(**{**w.__dict__, "num_blocks": -(-max(
    len(s.prompt) + s.max_tokens - 1 for s in w.specs) // w.block_size), "max_num_seqs": 5})))
def test_scheduler_invariants_tight_pool(w):
    """The smallest legal pool and many concurrent requests: preemption on almost every step."""
    run_workload(w)


# ====================================================================== deterministic tests
def cfg(budget=16, seqs=8, chunked=True) -> SchedulerConfig:
    return SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=seqs, chunked_prefill=chunked)


def test_preemption_with_tiny_pool():
    w = Workload(specs=[], block_size=2, num_blocks=4, max_num_batched_tokens=16, max_num_seqs=8,
                 chunked_prefill=True, prefix_caching=False)
    h = Harness(w)
    a, b, c = make_request(0, [1, 2, 3], 5), make_request(1, [4, 5, 6], 5), make_request(2, [7], 2)
    h.add(a, 5)
    h.add(b, 5)
    h.step()  # both prompts: 2 blocks each, the pool is full
    assert h.sched.running == [a, b] and h.bm.num_free_blocks == 0
    h.step()  # both decode within their second block
    assert a.num_tokens == b.num_tokens == 5
    b_tokens = list(b.all_token_ids)

    sched = h.sched
    out = h.step()  # a needs a third block: b, the newest, is preempted
    assert out.preempted == [b]
    assert [s.request for s in out.scheduled] == [a]
    assert b.status == RequestStatus.PREEMPTED and b.block_ids == [] and b.num_computed_tokens == 0
    assert b.all_token_ids == b_tokens and b.metrics.num_preemptions == 1
    assert list(sched.waiting) == [b]

    h.add(c, 2)  # never ran: queues behind the preempted b
    assert list(sched.waiting) == [b, c]
    h.step()  # b needs 3 blocks, 1 is free: b waits, and c must not overtake it
    assert c.status == RequestStatus.WAITING and list(sched.waiting) == [b, c]
    h.step()  # a reaches max_tokens and finishes
    assert a.is_finished and a.all_token_ids == rollout([1, 2, 3], 5)
    h.step()  # b resumes (recomputing prompt + its generated tokens), then c
    assert sched.running == [b, c]
    while sched.has_unfinished():
        h.step()
    assert b.all_token_ids == rollout([4, 5, 6], 5)
    assert c.all_token_ids == rollout([7], 2)
    assert sched.num_preemptions == 1
    assert h.bm.num_free_blocks == 4


def test_preemption_picks_newest_of_three():
    bm = BlockManager(num_blocks=6, block_size=2, enable_prefix_caching=False)
    sched = Scheduler(cfg(), bm)
    reqs = [make_request(i, [i, i], 10) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    assert len(out.scheduled) == 3 and bm.num_free_blocks == 3
    for _ in range(4):  # decode until the pool runs dry
        sched.update_after_step(out)
        for s in out.scheduled:
            s.request.append_token(next_token(s.request.all_token_ids))
        out = sched.schedule()
        if out.preempted:
            break
    assert out.preempted == [reqs[2]]
    assert sched.running == reqs[:2]


def test_decode_and_prefill_chunk_share_a_step():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(cfg(budget=4), bm)
    a, b = make_request(0, [1, 2], 3), make_request(1, list(range(10)), 1)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert [(s.request, s.num_new_tokens, s.sample) for s in out.scheduled] == [(a, 2, True), (b, 2, False)]
    sched.update_after_step(out)
    a.append_token(7)
    out = sched.schedule()  # a decodes while b's prompt advances by a chunk
    assert [(s.request, s.num_new_tokens, s.sample) for s in out.scheduled] == [(a, 1, True), (b, 3, False)]
    assert out.num_batched_tokens == 4


def test_decode_and_whole_prompt_share_a_step_without_chunking():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(cfg(budget=8, chunked=False), bm)
    a = make_request(0, [1, 2], 3)
    sched.add_request(a)
    out = sched.schedule()
    sched.update_after_step(out)
    a.append_token(7)
    b, c = make_request(1, list(range(6)), 1), make_request(2, list(range(5)), 1)
    sched.add_request(b)
    sched.add_request(c)
    out = sched.schedule()  # a's decode + b's whole prompt; c does not fit the last token whole
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 6)]
    assert list(sched.waiting) == [c]


def test_prefix_cache_hit_counts_as_computed_at_admission():
    bm = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(cfg(), bm)
    prompt = list(range(10))
    a = make_request(0, prompt, 1)
    sched.add_request(a)
    out = sched.schedule()
    sched.update_after_step(out)
    sched.finish_request(a)
    b = make_request(1, prompt + [3], 2)
    sched.add_request(b)
    out = sched.schedule()
    assert out.num_cached_tokens == 8 and b.metrics.num_cached_tokens == 8
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(b, 3)]


def test_finish_request_is_safe_anywhere():
    bm = BlockManager(num_blocks=8, block_size=2)
    sched = Scheduler(cfg(budget=3), bm)
    a, b, c = make_request(0, [1, 2, 3, 4, 5], 2), make_request(1, [1, 2], 2), make_request(2, [9], 1)
    for r in (a, b, c):
        sched.add_request(r)
    out = sched.schedule()  # a: a 3-token chunk, b and c wait (budget)
    sched.update_after_step(out)
    sched.finish_request(b)  # waiting
    sched.finish_request(a)  # running, mid-prefill
    sched.finish_request(a)  # already finished
    assert bm.num_free_blocks == 8
    out = sched.schedule()
    assert [s.request for s in out.scheduled] == [c]
    sched.finish_request(c)  # scheduled but not yet run: the engine may abort between steps
    sched.update_after_step(out)
    assert not sched.has_unfinished() and bm.num_free_blocks == 8
    bm.check_invariants()


def test_max_num_seqs_caps_running():
    bm = BlockManager(num_blocks=32, block_size=2)
    sched = Scheduler(cfg(budget=64, seqs=2), bm)
    reqs = [make_request(i, [i], 3) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    assert [s.request for s in out.scheduled] == reqs[:2]
    assert list(sched.waiting) == reqs[2:]


@pytest.mark.parametrize("chunked", [True, False])
def test_preempted_request_resumes_from_its_own_cached_prefix(chunked):
    w = Workload(specs=[], block_size=2, num_blocks=6, max_num_batched_tokens=16, max_num_seqs=8,
                 chunked_prefill=chunked, prefix_caching=True)
    h = Harness(w)
    a, b = make_request(0, [1, 1, 1, 1, 1], 6), make_request(1, [2, 2, 2, 2], 6)
    h.add(a, 6)
    h.add(b, 6)
    while h.sched.has_unfinished():
        h.step()
    assert b.metrics.num_preemptions == 1
    # its last admission (the resumption) reused KV it had computed before being preempted,
    # and the harness checked that KV holds b's own prefix
    assert b.metrics.num_cached_tokens > 0
    assert a.all_token_ids == rollout([1, 1, 1, 1, 1], 6)
    assert b.all_token_ids == rollout([2, 2, 2, 2], 6)
    assert h.bm.num_free_blocks == h.bm.num_blocks


# ------------------------------------------------------------------ shared prefixes admitted together
def test_requests_sharing_a_prefix_in_one_step_compute_it_once():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(cfg(budget=64, seqs=8), bm)
    prefix = list(range(12))  # three full blocks
    reqs = [make_request(i, prefix + [20 + i, 30 + i], 2) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()  # the first computes the prefix; the others wait one step for it
    assert [s.request for s in out.scheduled] == reqs[:1] and list(sched.waiting) == reqs[1:]
    sched.update_after_step(out)
    reqs[0].append_token(1)
    out = sched.schedule()
    assert [s.request for s in out.scheduled] == reqs
    assert out.num_cached_tokens == 3 * 12 and all(r.metrics.num_cached_tokens == 12 for r in reqs[1:])
    assert [s.num_new_tokens for s in out.scheduled] == [1, 2, 2, 2]


def test_unrelated_prompts_are_not_held():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(cfg(budget=64, seqs=8), bm)
    reqs = [make_request(i, [i] * 9, 2) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    assert [s.request for s in sched.schedule().scheduled] == reqs


def test_held_request_runs_when_the_request_filling_its_prefix_is_aborted():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(cfg(budget=64, seqs=8), bm)
    a, b = make_request(0, list(range(10)), 2), make_request(1, list(range(10)) + [5], 2)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert [s.request for s in out.scheduled] == [a]
    sched.finish_request(a)  # aborted while its step runs: its blocks are never published
    sched.update_after_step(out)
    out = sched.schedule()
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(b, 11)] and out.num_cached_tokens == 0
    bm.check_invariants()


def test_held_request_follows_a_chunked_prefill_block_by_block():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(cfg(budget=6, seqs=8), bm)  # a's 16-token prompt takes three steps
    prompt = list(range(16))
    a, b = make_request(0, prompt, 1), make_request(1, prompt + [99], 1)
    sched.add_request(a)
    sched.add_request(b)
    cached = []
    while b.status != RequestStatus.RUNNING:
        out = sched.schedule()
        cached.append(out.num_cached_tokens)
        sched.update_after_step(out)
    assert b.metrics.num_cached_tokens == 16 and cached[-1] == 16  # all of a's prompt, computed once
    assert len(cached) == 4  # b waited while a computed its three chunks
