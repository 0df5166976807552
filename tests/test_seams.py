"""The engine's seams, each swapped in through the builder: a speculator test double (drafts
accepted and rejected, tokens equal to plain decoding), a scheduler policy object, an attention
backend object, a sampler and a block manager factory."""

import pytest

from dlengine import EngineBuilder, SamplingParams
from dlengine.cache.block_manager import BlockManager
from dlengine.config import ConfigError
from dlengine.engine.sampler import Sampler
from dlengine.kernels.attention.torch_backend import TorchAttentionBackend

from conftest import make_prompts

PROMPTS = make_prompts(6, lengths=(1, 5, 17, 31, 64, 100))
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


def reference(model="tiny-qwen3", sched=None, **cache):
    engine = EngineBuilder(model).dtype("float32").cache(**cache).scheduler(**(sched or {})).build()
    return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


class ScriptedSpeculator:
    """Proposes the reference continuation (accepted), with every third proposal corrupted from
    its second token on (rejected there): the engine must give plain decoding's tokens either way."""

    name = "scripted"

    def __init__(self, continuations: dict[tuple, list[int]], num_tokens: int = 3) -> None:
        self.continuations = continuations
        self.num_tokens = num_tokens
        self.calls = 0
        self.verified = []  # (drafts, accepted)

    def propose(self, requests):
        drafts = []
        for r in requests:
            self.calls += 1
            cont = self.continuations[tuple(r.prompt_token_ids)]
            n = r.num_output_tokens
            draft = list(cont[n : n + self.num_tokens])
            if self.calls % 3 == 0 and len(draft) > 1:
                draft[1:] = [(t + 1) % 512 for t in draft[1:]]
            drafts.append(draft)
        return drafts

    def on_verified(self, request, num_drafts, num_accepted):
        self.verified.append((num_drafts, num_accepted))


@pytest.mark.parametrize("cache,sched", [
    ({}, {}),
    # small pool and step budget: chunked prompts, preemption, prefix-cache hits with drafts around
    (dict(block_size=16, num_blocks=20), dict(max_num_batched_tokens=32, max_model_len=256)),
])
def test_speculator_double_gives_plain_tokens(cache, sched):
    ref = reference(sched=sched, **cache)
    spec = ScriptedSpeculator({tuple(p): r for p, r in zip(PROMPTS, ref)})
    engine = (EngineBuilder("tiny-qwen3").dtype("float32").cache(**cache).scheduler(**sched)
              .speculative(spec, num_tokens=3).build())
    outs = engine.generate(PROMPTS + PROMPTS[:2], GREEDY)
    assert [o.token_ids for o in outs] == ref + ref[:2]
    s = engine.stats
    assert s.num_draft_tokens > 0
    assert 0 < s.num_accepted_tokens < s.num_draft_tokens  # accepted and rejected both happened
    assert any(a == d for d, a in spec.verified) and any(a < d for d, a in spec.verified)
    assert s.mean_accepted_length > 1.0
    assert engine.describe()["speculative"] == {"method": "scripted", "num_tokens": 3}
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()


def test_speculator_respects_max_tokens_and_stop_tokens():
    ref = reference()
    spec = ScriptedSpeculator({tuple(p): r + [7] * 8 for p, r in zip(PROMPTS, ref)}, num_tokens=4)
    engine = EngineBuilder("tiny-qwen3").dtype("float32").speculative(spec, num_tokens=4).build()
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=0.0))
    assert [o.token_ids for o in outs] == [r[:5] for r in ref]
    stop_at = ref[4][2]
    [o] = engine.generate([PROMPTS[4]], SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[stop_at]))
    assert o.token_ids == ref[4][: ref[4].index(stop_at) + 1] and o.finish_reason == "stop"


def test_speculative_config_errors():
    with pytest.raises(ConfigError, match="not shipped yet"):
        EngineBuilder("tiny-qwen3").speculative("mtp", num_tokens=2).build()
    with pytest.raises(ConfigError, match="unknown speculative method"):
        EngineBuilder("tiny-qwen3").speculative("medusa", num_tokens=2).build()
    with pytest.raises(ConfigError, match="num_tokens"):
        EngineBuilder("tiny-qwen3").speculative(ScriptedSpeculator({}), num_tokens=0).build()


class ShortestFirst:
    name = "shortest-first"

    def admission_order(self, waiting):
        return sorted(waiting, key=lambda r: r.num_tokens)

    def preemption_victim(self, running):
        return max(running, key=lambda r: r.num_tokens)


def test_scheduler_policy_object():
    engine = (EngineBuilder("tiny-qwen3").dtype("float32").scheduler(policy=ShortestFirst(), max_num_seqs=1)
              .build())
    assert engine.describe()["scheduler_policy"] == "shortest-first"
    lengths = [100, 5, 40, 1]
    rids = [engine.add_request(make_prompts(1, lengths=(n,), seed=n)[0], SamplingParams(max_tokens=2, temperature=0.0))
            for n in lengths]
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    by_length = [rid for _, rid in sorted(zip(lengths, rids))]
    assert finished == by_length
    with pytest.raises(ConfigError, match="admission_order"):
        EngineBuilder("tiny-qwen3").scheduler(policy=object()).build()


class CountingBackend(TorchAttentionBackend):
    """A user backend: the torch reference, counting its calls."""

    name = "counting-torch"

    def __init__(self):
        self.writes = self.attends = 0

    def write_kv(self, *args):
        self.writes += 1
        return super().write_kv(*args)

    def attend(self, *args):
        self.attends += 1
        return super().attend(*args)


def test_attention_backend_object():
    backend = CountingBackend()
    engine = EngineBuilder("tiny-qwen3").dtype("float32").attention(backend).build()
    assert engine.describe()["attention_backend"] == "counting-torch"
    assert [o.token_ids for o in engine.generate(PROMPTS[:3], GREEDY)] == reference()[:3]
    assert backend.writes > 0 and backend.attends > 0
    with pytest.raises(ConfigError, match="write_kv"):
        EngineBuilder("tiny-qwen3").attention(object()).build()


class CountingSampler(Sampler):
    def __init__(self):
        super().__init__(seed=0)
        self.rows = 0

    def __call__(self, logits, tensors):
        self.rows += logits.shape[0]
        return super().__call__(logits, tensors)


class TracingBlockManager(BlockManager):
    allocations = 0

    def allocate_slots(self, request, num_new_tokens, cached_blocks=()):
        TracingBlockManager.allocations += 1
        return super().allocate_slots(request, num_new_tokens, cached_blocks)


def test_sampler_and_block_manager_objects():
    sampler = CountingSampler()
    engine = (EngineBuilder("tiny-qwen3").dtype("float32").sampler(sampler).block_manager(TracingBlockManager)
              .build())
    assert isinstance(engine.block_manager, TracingBlockManager)
    outs = engine.generate(PROMPTS[:2], GREEDY)
    assert [o.token_ids for o in outs] == reference()[:2]
    assert sampler.rows == 2 * GREEDY.max_tokens
    assert TracingBlockManager.allocations > 0


class RepeatLastSpeculator:
    """Drafts the request's last token again (a weak n-gram guess): some accepted, most not."""

    name = "repeat-last"
    num_tokens = 2

    def propose(self, requests):
        return [[r.all_token_ids[-1]] * 2 for r in requests]


def test_bench_reports_acceptance():
    from dlengine.bench import format_report, run_throughput

    engine = EngineBuilder("tiny-qwen3").dtype("float32").speculative(RepeatLastSpeculator(), num_tokens=2).build()
    result = run_throughput(engine=engine, num_prompts=8, input_len=16, output_len=24, progress=False)
    assert result["spec_draft_tokens"] > 0
    assert 0.0 <= result["spec_acceptance_rate"] <= 1.0
    assert result["spec_mean_accepted_length"] >= 1.0
    report = format_report(result)
    assert "Draft tokens accepted" in report and "Mean accepted length" in report


def test_ngram_lookup():
    from dlengine.speculative import NgramProposer

    p = NgramProposer(num_tokens=3, min_n=1, max_n=3)
    assert p.lookup([1, 2, 3, 4, 9, 1, 2, 3]) == [4, 9, 1]  # "1 2 3" seen before: what followed
    assert p.lookup([1, 2, 3, 4, 5, 6, 7, 4]) == [5, 6, 7]  # only the 1-gram "4" matches
    assert p.lookup([5, 6, 7, 8]) == []  # nothing repeats
    assert p.lookup([7]) == []
    assert p.lookup([3, 3, 3]) == [3]  # the latest earlier copy is followed by one token only


def test_ngram_speculation_gives_plain_tokens():
    prompts = PROMPTS + [[5, 6, 7, 8] * 10, list(range(2, 40)) * 3]
    plain = EngineBuilder("tiny-qwen3").dtype("float32").build()
    ref = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    engine = EngineBuilder("tiny-qwen3").dtype("float32").speculative("ngram", num_tokens=4).build()
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == ref
    s = engine.stats
    assert s.num_accepted_tokens > 0 and s.mean_accepted_length > 1.0
    assert engine.describe()["speculative"] == {"method": "ngram", "num_tokens": 4}
    # seeded sampling runs through verification too (distribution-preserving, not token-equal)
    outs = engine.generate(prompts[:3], SamplingParams(max_tokens=8, temperature=0.8, seed=3))
    assert all(len(o.token_ids) == 8 or o.finish_reason == "stop" for o in outs)
