"""Speculative decoding of the Gated DeltaNet hybrids (tiny Qwen3.5-MoE and Qwen3-Next): rejected
drafts are undone in the recurrent state from per-position snapshots (cache/state_rollback.py,
kernels/gdn/by_position.py), so greedy outputs are token-identical to plain decoding.

N-gram drafts and the rollback:

- n-gram drafts (k = 2, 3) on prompts of mixed lengths, two of which the tiny models continue by
  repeating a token for a while (drafts accepted, then rejected when the run breaks);
- a proposer that knows the plain engine's continuation and spoils one draft in a fixed pattern,
  so every accepted length 0..k occurs at every step position (the rollback's exhaustive check);
- the same through forced small prefill chunks (verify rows beside prompt chunks in one step),
  a pool small enough to preempt, and prefix-cache hits resuming state checkpoints;
- verify steps through the CUDA-graph runner, each replay run eagerly on its static buffers:
  padding drafts and requests leave every other state slot as it was;
- sampling (temperature > 0, fixed seeds) runs and stays within the vocabulary;
- what stays refused names its reason.

The MTP head (models/qwen3_next_mtp.py) on tiny checkpoints with a trained `mtp.*` head
(testing/hybrid_mtp.py):
- it computes what transformers' own decoder layer and norms compute with the same tensors;
- k = 1, 2: greedy tokens equal plain decoding, acceptance well above zero (and near zero once its
  weights are randomised), through small prefill chunks, preemption and prefix-cache hits;
- sampling runs; verify and draft graphs (replays run eagerly) give the plain tokens;
- prefill / decode roles both speculating, tensor parallelism, attention-DP x expert parallelism:
  the single engine's tokens;
- a hybrid checkpoint without the head is a ConfigError saying so.
"""

from __future__ import annotations

import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.config import ConfigError
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts

KINDS = ["qwen3.5-moe", "qwen3-next"]
# prompts the tiny models answer by repeating a token for a while (found by search; then the
# run breaks): n-gram drafts are accepted there and rejected where the run ends
REPEATING = {"qwen3.5-moe": [342] * 8, "qwen3-next": [17] * 12}
MAX_TOKENS = 20
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _prompts(kind: str) -> list[list[int]]:
    return [REPEATING[kind], [20, 21] * 4] + make_prompts(4, lengths=(1, 5, 17, 33), seed=7)


def _builder(kind: str, cache=None, sched=None) -> EngineBuilder:
    return (EngineBuilder(tiny_checkpoint(kind)).dtype("float32").cache(**(cache or {}))
            .scheduler(**(sched or {})))


_REFERENCE: dict[str, list[list[int]]] = {}


def _reference(kind: str) -> list[list[int]]:
    """Plain greedy tokens of _prompts(kind)."""
    if kind not in _REFERENCE:
        engine = _builder(kind).build()
        _REFERENCE[kind] = [o.token_ids for o in engine.generate(_prompts(kind), GREEDY)]
    return _REFERENCE[kind]


def _all_returned(engine) -> None:
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.state_slots.num_free == bm.state_slots.num_slots


# ---------------------------------------------------------------------------- n-gram
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [2, 3])
def test_ngram_greedy_equals_plain(kind, k):
    engine = _builder(kind).speculative("ngram", num_tokens=k).build()
    out = [o.token_ids for o in engine.generate(_prompts(kind), GREEDY)]
    assert out == _reference(kind)
    s = engine.stats
    assert s.num_accepted_tokens > 0 and s.acceptance_rate > 0
    assert s.num_accepted_tokens < s.num_draft_tokens  # rejections too: the state was rolled back
    assert engine.core.state_rollback.num_rollbacks > 0
    _all_returned(engine)


# ---------------------------------------------------------------------------- every accepted length
class SpoilingOracle:
    """Drafts the plain engine's continuation with draft j spoiled on the (j+1)-th of every k + 1
    proposals (j = k: none spoiled), so a request keeps 0, 1, ..., k drafts in turn. It knows the
    continuation by the request's prompt (the references are plain greedy outputs)."""

    name = "spoiling-oracle"

    def __init__(self, prompts, references, num_tokens: int, vocab: int = 512) -> None:
        self.num_tokens, self.vocab = num_tokens, vocab
        self.full = {tuple(p): list(p) + list(r) for p, r in zip(prompts, references)}
        self.calls = 0
        self.accepted: list[int] = []  # per verification of k drafts: how many were kept

    def propose(self, requests):
        out = []
        for r in requests:
            seq = self.full[tuple(r.prompt_token_ids)]
            drafts = seq[r.num_tokens:r.num_tokens + self.num_tokens]
            spoil = self.calls % (self.num_tokens + 1)
            self.calls += 1
            if spoil < len(drafts):
                drafts[spoil] = (drafts[spoil] + 1) % self.vocab
            out.append(drafts)
        return out

    def on_verified(self, request, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == self.num_tokens:
            self.accepted.append(num_accepted)


@pytest.mark.parametrize("kind", KINDS)
def test_every_accepted_length_rolls_back_exactly(kind):
    k = 3
    prompts, reference = _prompts(kind), _reference(kind)
    oracle = SpoilingOracle(prompts, reference, k)
    engine = _builder(kind).speculative(oracle, num_tokens=k).build()
    out = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    assert out == reference
    assert set(oracle.accepted) == set(range(k + 1))  # every accepted length, including none and all
    _all_returned(engine)


# ---------------------------------------------------------------------------- chunks, preemption, prefix cache
@pytest.fixture
def mixed_steps(monkeypatch):
    """Counts steps with drafts whose state layers also ran prompt chunks (varlen) beside the
    verify rows, and those of them saving a prefix-cache checkpoint inside a chunk."""
    from dlengine.engine.runner import ModelRunner

    counts = {"mixed": 0, "checkpoint": 0}
    lay_out = ModelRunner._state_positions

    def counting(self, *args, **kwargs):
        plan = lay_out(self, *args, **kwargs)
        counts["mixed"] += plan.varlen_rows is not None
        counts["checkpoint"] += plan.varlen_checkpoint_slots is not None
        return plan

    monkeypatch.setattr(ModelRunner, "_state_positions", counting)
    return counts


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cache,sched", [
    # prompts in chunks of at most 6 tokens: verify rows and prompt chunks share steps (the state
    # layers run the chunks varlen beside the verify rows' positions)
    (dict(block_size=4), dict(max_num_batched_tokens=6)),
    # a pool too small for every request at once: preemption and recompute with drafts around
    (dict(block_size=4, num_blocks=24), dict(max_num_batched_tokens=64, max_model_len=64)),
])
def test_ngram_chunked_and_preempted(kind, cache, sched, mixed_steps):
    engine = _builder(kind, cache, sched).speculative("ngram", num_tokens=3).build()
    out = [o.token_ids for o in engine.generate(_prompts(kind), GREEDY)]
    assert out == _reference(kind)
    assert engine.stats.num_accepted_tokens > 0
    if "num_blocks" in cache:
        assert engine.stats.num_preemptions > 0
    else:
        assert mixed_steps["mixed"] > 0
    _all_returned(engine)


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_cache_hits_resume_checkpoints_while_speculating(kind, mixed_steps):
    """The same prompts twice through one engine in steps of 10 tokens (prompt chunks beside
    verify rows, some saving their state checkpoint inside the chunk): the second round resumes
    every prompt's last full block from its state checkpoint."""
    prompts, reference = _prompts(kind), _reference(kind)
    k = 3
    engine = _builder(kind, dict(block_size=4), dict(max_num_batched_tokens=10)).speculative(
        SpoilingOracle(prompts, reference, k), num_tokens=k).build()
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == reference
    engine.stats.reset()
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == reference
    assert engine.stats.num_cached_tokens > 0 and engine.stats.num_accepted_tokens > 0
    assert mixed_steps["checkpoint"] > 0
    bm = engine.block_manager
    _all_returned(engine)
    assert bm.checkpoints.num_pending == 0 and bm.checkpoints.num_published > 0


# ---------------------------------------------------------------------------- sampling
def test_sampling_runs_within_the_vocabulary():
    kind = "qwen3.5-moe"
    prompts = _prompts(kind)
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    engine = _builder(kind).speculative("ngram", num_tokens=2).build()
    first = [o.token_ids for o in engine.generate(prompts, params)]
    assert all(len(t) == MAX_TOKENS and all(0 <= x < 512 for x in t) for t in first)
    assert engine.stats.num_draft_tokens > 0
    again = [o.token_ids for o in engine.generate(prompts, params)]
    assert again == first  # per-request seeds: reproducible
    _all_returned(engine)


# ---------------------------------------------------------------------------- CUDA-graph verify steps
def test_verify_graphs_with_padding_leave_other_slots_alone():
    """The graph runner of a speculating hybrid with each replay run eagerly (attention on the
    Triton kernels under the interpreter, the GDN references): 3 requests replay the graph of 4
    (a padding request) with proposals shorter than k (padding drafts); tokens equal plain
    decoding, verify graphs replayed, and no replay changed a state slot outside its requests'
    own slots and their draft snapshots."""
    pytest.importorskip("triton")
    from dlengine.engine.cuda_graph import CUDAGraphRunner

    kind, k = "qwen3.5-moe", 3

    class EagerReplay(CUDAGraphRunner):
        untouched_ok = True
        live: list[int] = []

        def stage(self, batch, **kwargs):
            n = len(batch.first_rows)
            live = set(batch.state_slots[:n].tolist())
            if batch.snapshot_slots is not None:
                live |= set(batch.snapshot_slots[:, :n].ravel().tolist()) - {-1}
            self.live = sorted(live)
            super().stage(batch, **kwargs)

        def replay(self, choice):
            before = [g.storage.clone() for g in self.kv_cache.state_groups]
            with torch.inference_mode():
                self.forward(choice)
            others = [s for s in range(self.kv_cache.num_state_slots) if s not in self.live]
            for b, g in zip(before, self.kv_cache.state_groups):
                self.untouched_ok &= torch.equal(b[others], g.storage[others])

    prompts = [REPEATING[kind], [20, 21] * 4, [7, 8, 9]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = _builder(kind).build()
    reference = [o.token_ids for o in plain.generate(prompts, params)]
    engine = _builder(kind).attention("triton").speculative(SpoilingOracle(prompts, reference, k), num_tokens=k).build()
    r = engine.runner
    assert r.state_rollback is not None
    r.graph_runner = EagerReplay(r.model, r.kv_cache, r.backend, 4, engine.config.max_model_len,
                                 torch.device("cpu"), batch_sizes=[1, 2, 4], num_spec_tokens=k,
                                 state_rollback=r.state_rollback)
    assert [o.token_ids for o in engine.generate(prompts, params)] == reference
    g = r.graph_runner
    assert g.num_verify_replays > 0 and g.untouched_ok
    assert engine.stats.num_accepted_tokens > 0
    _all_returned(engine)


def test_graph_layout_of_state_positions():
    """Per position: the request's slot up to its last real row, PAD_STATE_SLOT after; snapshot
    slots only before its last real row; padding requests touch nothing."""
    from types import SimpleNamespace

    from dlengine.cache.state_rollback import StateSnapshots
    from dlengine.engine.graph_layout import GraphChoice, padded_layout
    from dlengine.kernels.context import PAD_STATE_SLOT as P

    snaps = StateSnapshots(SimpleNamespace(num_state_slots=40, state_groups=[]), first_slot=10,
                           num_request_slots=8, max_drafts=3)
    reqs = [SimpleNamespace(all_token_ids=list(range(10)), num_computed_tokens=9, block_ids=[0, 1, 2, 3],
                            spec_token_ids=[1, 2, 3], state_slot=s) for s in (5, 0)]
    batch = padded_layout(reqs, [3, 1], GraphChoice(4, 4), block_size=4, max_model_len=64, with_state=True,
                          state_rollback=snaps)
    assert batch.position_slots.tolist() == [[5, 0, P, P], [5, 0, P, P], [5, P, P, P], [5, P, P, P]]
    assert batch.snapshot_slots.tolist() == [[25, 10, -1, -1], [26, -1, -1, -1], [27, -1, -1, -1], [-1] * 4]
    with pytest.raises(ValueError, match="state rollback"):
        padded_layout(reqs, [3, 1], GraphChoice(4, 4), 4, 64, with_state=True)
    with pytest.raises(ValueError, match="snapshots hold 3"):
        snaps.layout([1], [4], 5)


# ---------------------------------------------------------------------------- memory and refusals
def test_memory_plan_counts_draft_snapshots():
    kind = "qwen3.5-moe"
    engine = _builder(kind, sched=dict(max_num_seqs=4)).speculative("ngram", num_tokens=3).build()
    plan = engine.core.memory_plan
    assert plan.num_snapshot_slots == 4 * 3
    assert engine.kv_cache.num_state_slots == plan.num_state_slots + plan.num_checkpoint_slots + 12
    assert "12 draft snapshots" in plan.describe(engine.kv_cache.block_size)
    plain = _builder(kind, sched=dict(max_num_seqs=4)).build()
    assert plain.core.memory_plan.num_snapshot_slots == 0 and plain.core.state_rollback is None


def test_what_stays_refused_names_its_reason():
    # a state kind whose layers keep no per-position snapshots (DeepSeek-V4's rings)
    with pytest.raises(ConfigError, match="cannot roll rejected drafts back"):
        EngineBuilder(tiny_checkpoint("deepseek-v4")).dtype("float32").speculative("ngram", num_tokens=2).build()


def test_drafts_are_capped_at_the_snapshots_per_request():
    """A proposer object offering more drafts than its num_tokens gets them cut to k for a state
    model (there are k snapshots per request)."""
    kind = "qwen3.5-moe"

    class Greedy:
        name, num_tokens = "too-many", 2

        def __init__(self):
            self.seen = []

        def propose(self, requests):
            return [[5] * 6 for _ in requests]

        def on_verified(self, request, num_drafts, num_accepted):
            self.seen.append(num_drafts)

    proposer = Greedy()
    engine = _builder(kind).speculative(proposer, num_tokens=2).build()
    out = [o.token_ids for o in engine.generate(_prompts(kind)[:3], GREEDY)]
    assert out == _reference(kind)[:3]
    assert proposer.seen and max(proposer.seen) == 2


# ============================================================================ the MTP head (mtp.*)
MTP_KINDS = {"qwen3.5-moe": "qwen3.5-moe-mtp", "qwen3-next": "qwen3-next-mtp"}


def _mtp_prompts() -> list[list[int]]:
    from dlengine.testing.mtp import mtp_training_prompts

    # prompts the head was trained on (drafts mostly accepted) and unseen ones (mostly rejected)
    return mtp_training_prompts()[:6] + make_prompts(2, lengths=(3, 21), seed=9)


_MTP_REFERENCE: dict[str, list[list[int]]] = {}


def _mtp_reference(kind: str) -> list[list[int]]:
    if kind not in _MTP_REFERENCE:
        engine = _builder(kind).build()
        _MTP_REFERENCE[kind] = [o.token_ids for o in engine.generate(_mtp_prompts(), GREEDY)]
    return _MTP_REFERENCE[kind]


def _mtp_builder(kind: str, k: int, cache=None, sched=None) -> EngineBuilder:
    b = EngineBuilder(tiny_checkpoint(MTP_KINDS[kind])).dtype("float32").cache(**(cache or {}))
    return b.scheduler(**(sched or {})).speculative("mtp", num_tokens=k)


def test_mtp_head_matches_transformers_layers():
    """The engine's MTP head against one assembled from transformers' own decoder layer and
    zero-centred norms holding the checkpoint's mtp.* tensors, at every position of a trained
    sequence (both fed the target's final hidden states): the names, the concat order, the norms
    and the residual are as released."""
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file

    from dlengine.kernels.context import AttentionMetadata, ForwardContext
    from dlengine.testing.mtp import mtp_training_prompts

    path = tiny_checkpoint("qwen3.5-moe-mtp")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    text, cfg = hf.model, hf.config
    mtp = {k[len("mtp."):]: v for k, v in load_file(f"{path}/model.safetensors").items() if k.startswith("mtp.")}
    full = list(cfg.layer_types).index("full_attention")
    block = type(text.layers[full])(cfg, layer_idx=full).eval()
    block.load_state_dict({k[len("layers.0."):]: v for k, v in mtp.items() if k.startswith("layers.0.")})
    norm = type(text.norm)

    def zc_norm(name):
        n = norm(cfg.hidden_size, cfg.rms_norm_eps)
        n.weight.data.copy_(mtp[f"{name}.weight"])
        return n

    seq = mtp_training_prompts()[0]
    T = len(seq) - 1  # positions 0 .. T - 1, each fed the token after it
    ids = torch.tensor([seq])
    positions = torch.arange(T)
    with torch.no_grad():
        h = text(ids[:, :T]).last_hidden_state[0]
        e = text.embed_tokens(ids[0, 1:T + 1])
        x = torch.nn.functional.linear(torch.cat([zc_norm("pre_fc_norm_embedding")(e),
                                                  zc_norm("pre_fc_norm_hidden")(h)], -1), mtp["fc.weight"])
        rope = text.rotary_emb(x[None], positions[None, None].expand(3, 1, T))
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        y = block(x[None], position_embeddings=rope, attention_mask=mask, position_ids=positions[None])
        expected = hf.lm_head(zc_norm("norm")(y[0] if isinstance(y, tuple) else y)[0])

    engine = _mtp_builder("qwen3.5-moe", 1, cache=dict(block_size=16)).build()
    spec, kv = engine.speculator, engine.kv_cache
    blocks = -(-T // 16)  # an idle engine: its first blocks are free to write
    meta = AttentionMetadata(query_start_loc=torch.tensor([0, T], dtype=torch.int32),
                             seq_lens=torch.tensor([T], dtype=torch.int32),
                             block_tables=torch.arange(blocks, dtype=torch.int32)[None], slot_mapping=positions,
                             max_query_len=T, max_seq_len=T, query_lens_cpu=[T], seq_lens_cpu=[T])
    ctx = ForwardContext(meta, kv.layers, [kv.caches_of_layer(i) for i in range(len(kv.layers))])
    with torch.inference_mode():
        got = spec.mtp.compute_logits(spec.mtp(positions, spec.embed(ids[0, 1:T + 1]), h, ctx))
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4


@pytest.mark.parametrize("kind", list(MTP_KINDS))
@pytest.mark.parametrize("k", [1, 2])
def test_mtp_greedy_equals_plain(kind, k):
    engine = _mtp_builder(kind, k).build()
    assert [o.token_ids for o in engine.generate(_mtp_prompts(), GREEDY)] == _mtp_reference(kind)
    s = engine.stats
    assert s.acceptance_rate > 0.4, s.acceptance_rate
    assert s.num_accepted_tokens < s.num_draft_tokens  # the unseen prompts' drafts were rejected
    _all_returned(engine)


def test_trained_mtp_head_accepts_and_random_does_not():
    from dlengine.testing.mtp import mtp_training_prompts

    engine = _mtp_builder("qwen3.5-moe", 1).build()
    prompts = mtp_training_prompts()[:6]
    engine.generate(prompts, GREEDY)
    assert engine.stats.acceptance_rate > 0.6
    # the head's own weights replaced by random ones (the shared LM head and embedding kept):
    # drafts then rarely match, so the rate above needs the trained head to run as trained
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in engine.speculator.mtp.layer.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    engine.stats.reset()
    engine.generate(prompts, GREEDY)
    assert engine.stats.acceptance_rate < 0.2, engine.stats.acceptance_rate


@pytest.mark.parametrize("cache,sched", [
    (dict(block_size=4), dict(max_num_batched_tokens=10)),  # prompt chunks beside verify rows
    (dict(block_size=4, num_blocks=40), dict(max_num_batched_tokens=64, max_model_len=64)),  # preemption
])
def test_mtp_chunked_and_preempted(cache, sched):
    kind = "qwen3.5-moe"
    engine = _mtp_builder(kind, 2, cache, sched).build()
    assert [o.token_ids for o in engine.generate(_mtp_prompts(), GREEDY)] == _mtp_reference(kind)
    assert engine.stats.acceptance_rate > 0.3
    if "num_blocks" in cache:
        assert engine.stats.num_preemptions > 0
    _all_returned(engine)


def test_mtp_with_prefix_cache_hits():
    """A second round of the same prompts resumes their cached prefixes (the state from its
    checkpoint, the MTP layer's KV from the cached blocks): same tokens, drafts as good."""
    kind = "qwen3.5-moe"
    engine = _mtp_builder(kind, 2, dict(block_size=4)).build()
    assert [o.token_ids for o in engine.generate(_mtp_prompts(), GREEDY)] == _mtp_reference(kind)
    engine.stats.reset()
    assert [o.token_ids for o in engine.generate(_mtp_prompts(), GREEDY)] == _mtp_reference(kind)
    assert engine.stats.num_cached_tokens > 0 and engine.stats.acceptance_rate > 0.3
    _all_returned(engine)


def test_mtp_sampling_runs_within_the_vocabulary():
    engine = _mtp_builder("qwen3.5-moe", 2).build()
    params = [SamplingParams(max_tokens=12, temperature=0.7, seed=i, ignore_eos=True) for i in range(4)]
    first = [o.token_ids for o in engine.generate(_mtp_prompts()[:4], params)]
    assert all(len(t) == 12 and all(0 <= x < 512 for x in t) for t in first)
    assert engine.stats.num_draft_tokens > 0
    assert [o.token_ids for o in engine.generate(_mtp_prompts()[:4], params)] == first
    _all_returned(engine)


def test_mtp_draft_and_verify_graphs_give_the_eager_tokens():
    """Target verify graphs (state by position) and the MTP draft graphs on their static hidden
    states, each replay run eagerly: plain tokens, drafts accepted, both kinds of graph replayed."""
    pytest.importorskip("triton")
    from dlengine.engine.cuda_graph import CUDAGraphRunner
    from dlengine.speculative.mtp_graphs import MTPGraphRunner

    class EagerReplay(CUDAGraphRunner):
        def replay(self, choice):
            with torch.inference_mode():
                self.forward(choice)

    class EagerDraftReplay(MTPGraphRunner):
        def replay(self, choice):
            with torch.inference_mode():
                self.forward(choice)

    kind, k = "qwen3.5-moe", 2
    prompts, params = _mtp_prompts()[:3], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    reference = [o.token_ids for o in _builder(kind).build().generate(prompts, params)]
    engine = _mtp_builder(kind, k).attention("triton").build()
    r, spec = engine.runner, engine.speculator
    r.graph_runner = EagerReplay(r.model, r.kv_cache, r.backend, 4, engine.config.max_model_len, torch.device("cpu"),
                                 batch_sizes=[1, 2, 4], num_spec_tokens=k, keep_hidden_states=True,
                                 state_rollback=r.state_rollback)
    spec.graphs = EagerDraftReplay(spec.mtp, spec.embed, r.graph_runner, k)
    assert [o.token_ids for o in engine.generate(prompts, params)] == reference
    assert r.graph_runner.num_verify_replays > 0 and spec.graphs.num_replays[1 + k] > 0
    assert engine.stats.num_accepted_tokens > 0
    _all_returned(engine)


def test_mtp_prefill_decode_roles_match_hybrid():
    """Both roles with speculative("mtp"): the prefill engine writes the MTP layer's KV of the
    prompt into the blocks it hands over beside the state; the decode engine drafts from its
    second step on."""
    pytest.importorskip("dlslime")
    from dlengine.disagg import PDRouter

    kind = "qwen3.5-moe"
    prefill = _mtp_builder(kind, 2).role("prefill").transfer("dlslime", transport="tcp").build()
    decode = _mtp_builder(kind, 2).role("decode").transfer("dlslime", transport="tcp").build()
    try:
        outs = PDRouter(prefill, decode).generate(_mtp_prompts(), GREEDY)
        assert [o.error for o in outs] == [None] * len(outs)
        assert [o.token_ids for o in outs] == _mtp_reference(kind)
        assert decode.stats.acceptance_rate > 0.3
        _all_returned(decode)
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("parallel", [dict(tp=2), dict(attention_dp=2, ffn_ep=2)])
def test_mtp_on_parallel_engines(parallel):
    """Two processes over gloo: tensor parallelism (each rank rolls back its own heads' state
    slots) and attention-DP x expert parallelism (each rank drafts for its own requests; the MTP
    layer's MoE joins the expert exchanges a fixed number of times a step)."""
    kind = "qwen3.5-moe"
    engine = _mtp_builder(kind, 2).parallel(**parallel, timeout_s=300).build()
    try:
        assert [o.token_ids for o in engine.generate(_mtp_prompts(), GREEDY)] == _mtp_reference(kind)
        stats = engine.stats()
        assert all(s["num_accepted_tokens"] > 0 for s in stats)
    finally:
        engine.close()


def test_mtp_config_errors():
    # a hybrid checkpoint without the head's tensors (transformers writes none)
    with pytest.raises(ConfigError, match="no mtp.layers.0.. tensors"):
        _builder("qwen3.5-moe").speculative("mtp", num_tokens=1).build()
