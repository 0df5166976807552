"""DeepSeek-V4 under the parallel engines, on CPU with gloo and 2 processes, against the
single-process engine on the tiny V4 checkpoint (dlengine/testing/deepseek_v4.py: window 16, CSA
every 4 tokens, HCA every 16, hash- and learned-routed MoE; prompts up to 300 tokens cross the
window and many compression periods).

* tp=2: query heads, sinks and output groups split, the shared K=V head, compressors and indexer
  replicated; routed and shared experts split on their intermediate dim. Greedy tokens identical,
  float32 logits within 1e-4 relative (whole prompts, chunks that split compression windows,
  one token at a time = the decode path), every rank's cache bitwise the same.
* attention_dp=2 x ffn_ep=2: each rank routes its own tokens (hash layers by their own token ids)
  and dispatches them to the experts' ranks. Same checks, plus a rank idling.
* Shards that cannot be cut (o_groups, heads, intermediate size not divisible by tp) are
  ConfigErrors naming the numbers.
"""

import functools
import hashlib
import os

import pytest
import torch
import torch.distributed as dist

from dlengine import EngineBuilder, SamplingParams
from dlengine.config import ConfigError, ModelConfig
from dlengine.parallel import ParallelEngine, WorkerError, launch
from dlengine.parallel.state import ParallelState, parallel_state
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts
from hf_reference import relative_error

KIND = "deepseek-v4"
BLOCK = 16  # a multiple of both compress rates (4, 16)
PROMPTS = make_prompts()  # lengths 1 .. 300
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
HASH_LAYERS = ("layers.0.ffn.experts", "layers.1.ffn.experts")  # mlp_layer_types: hash_moe, hash_moe, moe, moe


def configured(**parallel) -> EngineBuilder:
    builder = EngineBuilder(tiny_checkpoint(KIND)).dtype("float32").cache(block_size=BLOCK)
    return builder.parallel(timeout_s=180, **parallel) if parallel else builder


@functools.lru_cache(maxsize=None)
def single_engine():
    return configured().build()


@functools.lru_cache(maxsize=None)
def reference_tokens() -> tuple:
    return tuple(tuple(o.token_ids) for o in single_engine().generate(PROMPTS, GREEDY))


def hash_routing_counts(outputs, prompts) -> torch.Tensor:
    """Per hash layer, the routed (token, expert) pairs the checkpoint's tid2eid table gives for
    every token the engine computed (the prompt and each generated token but the last)."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(tiny_checkpoint(KIND), "model.safetensors"))
    counts = []
    for layer in HASH_LAYERS:
        table = tensors[layer.replace("experts", "gate.tid2eid")]
        fed = torch.tensor([t for o, p in zip(outputs, prompts) for t in list(p) + list(o.token_ids[:-1])])
        counts.append(torch.bincount(table[fed].reshape(-1).long(), minlength=8))
    return torch.stack(counts)


def routed_counts(stats_before, stats_after) -> torch.Tensor:
    """The engine's per-expert counts of the hash layers in a window, summed over ranks."""
    return torch.stack([sum(torch.tensor(a["expert_token_counts"][layer]) - torch.tensor(b["expert_token_counts"][layer])
                            for a, b in zip(stats_after, stats_before)) for layer in HASH_LAYERS])


def check_engine(engine: ParallelEngine, routed_on: int) -> None:
    """Greedy tokens, uneven batches and float32 logits against the single-process engine; each
    token is routed on `routed_on` ranks (tp: every rank routes every token; dp x ep: its own)."""
    ref = reference_tokens()
    before = engine.stats()
    outs = engine.generate(PROMPTS, GREEDY)
    assert [tuple(o.token_ids) for o in outs] == list(ref)
    # hash routing saw the token ids of the tokens it routed, on whichever rank ran them
    assert torch.equal(routed_counts(before, engine.stats()), routed_on * hash_routing_counts(outs, PROMPTS))
    # one request alone (under attention DP the other rank only joins the MoE exchanges), then uneven work
    [one] = engine.generate([PROMPTS[9]], GREEDY)
    assert tuple(one.token_ids) == ref[9]
    outs = engine.generate([PROMPTS[0], PROMPTS[8], PROMPTS[2]],
                           [SamplingParams(max_tokens=2, temperature=0.0), GREEDY,
                            SamplingParams(max_tokens=3, temperature=0.0)])
    assert [tuple(o.token_ids) for o in outs] == [ref[0][:2], ref[8], ref[2][:3]]
    # logits at every position: the whole 300-token prompt, chunks of 7 (split CSA / HCA windows),
    # and one token at a time (the batched decode path) over 36 tokens (past 2 HCA windows)
    single = single_engine()
    for prompt, chunk in ((PROMPTS[9], None), (PROMPTS[7], 7), (PROMPTS[9][:36], 1)):
        kwargs = {"chunk_size": chunk} if chunk else {}
        assert relative_error(engine.prompt_logits(prompt, **kwargs), single.prompt_logits(prompt, **kwargs)) < 1e-4


def test_tensor_parallel_matches_single_process():
    engine = configured(tp=2).build()
    procs = engine.processes
    try:
        check_engine(engine, routed_on=2)
        # random sampling: the first TP rank's tokens are broadcast, the ranks stay in step
        sampled = engine.generate(PROMPTS[:3], SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9))
        assert all(o.token_ids for o in sampled)
        stats = engine.stats()
        assert stats[0]["num_steps"] == stats[1]["num_steps"] > 0
        # the cache is replicated: a rank's block costs what the single-process engine's does
        single = single_engine()
        info = engine.rank_info[0]
        assert info["kv_cache_gib"] * 2**30 / info["num_kv_blocks"] == pytest.approx(
            single.kv_cache.nbytes / single.kv_cache.num_blocks, rel=0.01)
    finally:
        engine.close()
    for p in procs:
        p.join(10)
    assert [p.exitcode for p in procs] == [0, 0]


def test_attention_dp_expert_parallel_matches_single_process():
    engine = configured(attention_dp=2, ffn_ep=2, expert_placement="round_robin").build()
    procs = engine.processes
    try:
        before = engine.stats()
        check_engine(engine, routed_on=1)
        stats = engine.stats()
        assert max(s["idle_steps"] - b["idle_steps"] for s, b in zip(stats, before)) > 0, "no rank ever idled"
    finally:
        engine.close()
    for p in procs:
        p.join(10)
    assert [p.exitcode for p in procs] == [0, 0]


def rank_cache_digests(path: str, prompts: list, max_tokens: int) -> dict:
    """One tp=2 rank (inside `launch`): generate, then digest every cache group of this rank
    (the window rings, compressor rings, compressed entries and indexer keys) and report the
    shard sizes of its first attention layer."""
    engine = EngineBuilder(path).dtype("float32").cache(block_size=BLOCK, num_blocks=64).parallel(tp=2).build()
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    outs = engine.generate(prompts if dist.get_rank() == 0 else None, params)
    rank_core = engine.core.rank_core
    kv = rank_core.core.kv_cache
    digests = {g.spec.name: hashlib.sha256(kv.buffer[g.offset:g.offset + g.nbytes].numpy().tobytes()).hexdigest()
               for g in kv.groups}
    written = int(kv.buffer.count_nonzero())
    attn = rank_core.core.model.layers[0].attn
    shards = (attn.num_heads, attn.o_groups, tuple(attn.attn_sink.shape), tuple(attn.indexer.wq_b.weight.shape))
    engine.close()
    return {"tokens": [o.token_ids for o in outs], "digests": digests, "written": written, "shards": shards}


def test_replicated_caches_are_identical_on_every_tp_rank():
    """Each TP rank computes the shared K=V head, the compressors and the indexer itself: the
    caches they write must agree bit for bit, or the ranks' attention would silently diverge."""
    prompts = [PROMPTS[9], PROMPTS[7], PROMPTS[4]]
    results = launch(rank_cache_digests, 2, tiny_checkpoint(KIND), prompts, 8, timeout=300)
    ref = [list(t[:8]) for t in (reference_tokens()[9], reference_tokens()[7], reference_tokens()[4])]
    assert results[0]["tokens"] == results[1]["tokens"] == ref
    assert results[0]["digests"] == results[1]["digests"]
    assert len(results[0]["digests"]) == 6 and results[0]["written"] > 0  # csa_kv, csa_index_k, hca_kv, 3 states
    # 4 query heads and 2 output groups split over 2 ranks; the indexer's 16 heads of 16 whole
    assert results[0]["shards"] == results[1]["shards"] == (2, 1, (2,), (16 * 16, 32))


def test_rank_shards_sum_to_the_full_layers():
    """Simulated ranks in this process (no process group): each rank's attention output
    projection and MoE give a partial sum; the partials add up to the single-process layer."""
    from dlengine.models.deepseek_v4 import DeepseekV4ForCausalLM
    from dlengine.models.loader import load_weights

    path = tiny_checkpoint(KIND)
    cfg = ModelConfig.from_pretrained(path)

    def model_on(state: ParallelState):
        with parallel_state(state):
            model = DeepseekV4ForCausalLM(cfg, 64)
        load_weights(model, path)
        return model

    full = model_on(ParallelState())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, cfg.hidden_size, generator=g)
    ids = torch.randint(2, cfg.vocab_size, (5,), generator=g)
    heads_out = torch.randn(5, 4 * 32, generator=g)  # the attention output of the 4 heads, before wo_a
    attn_parts, moe_parts = [], []
    for r in range(2):
        # without a group the row-parallel wo_b returns its partial (no all-reduce)
        attn = model_on(ParallelState(world_size=2, rank=r, tp_size=2, tp_rank=r)).layers[0].attn
        assert torch.equal(attn.attn_sink, full.layers[0].attn.attn_sink[2 * r:2 * r + 2])
        attn_parts.append(attn._grouped_output(heads_out[:, 64 * r:64 * (r + 1)]))
        # the experts take their tp mode from a group; forward_routed(reduce=False) and the shared
        # expert (its w2 never reduces) run no collective
        model = model_on(ParallelState(world_size=2, rank=r, tp_size=2, tp_rank=r, tp_group=object()))
        for layer in (0, 2):  # hash-routed, learned-routed
            ffn = model.layers[layer].ffn
            weights, chosen = ffn.gate(x, ids)
            moe_parts.append((layer, ffn.experts.forward_routed(x, weights, chosen, reduce=False) + ffn.shared_experts(x)))
    torch.testing.assert_close(sum(attn_parts), full.layers[0].attn._grouped_output(heads_out))
    for layer in (0, 2):
        torch.testing.assert_close(sum(p for i, p in moe_parts if i == layer), full.layers[layer].ffn(x, ids))


@pytest.mark.parametrize("tp, message", [(4, "o_groups=2 is not divisible by tp=4"),
                                         (3, "num_attention_heads=4 is not divisible by tp=3")])
def test_shards_that_cannot_be_cut_are_config_errors(tp, message):
    from dlengine.models.deepseek_v4 import DeepseekV4ForCausalLM

    cfg = ModelConfig.from_pretrained(tiny_checkpoint(KIND))
    with pytest.raises(ConfigError, match=message):
        DeepseekV4ForCausalLM.cache_specs(cfg, dtype=torch.float32, tp_size=tp)
    with pytest.raises(ConfigError, match=message):
        with parallel_state(ParallelState(world_size=tp, tp_size=tp)):
            DeepseekV4ForCausalLM(cfg, 64)


def test_engine_build_names_the_impossible_shard():
    """o_groups=1 cannot be split over 2 ranks (wo_a is one block per group): the workers refuse
    to build and the caller gets the ConfigError's message."""
    with pytest.raises((ConfigError, WorkerError), match="o_groups=1 is not divisible by tp=2"):
        configured(tp=2).hf_overrides(o_groups=1).build()
