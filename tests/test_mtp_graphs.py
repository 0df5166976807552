"""The MTP proposer's drafting from CUDA graphs (dlengine/speculative/mtp_graphs.py), on CPU.

The host half is checked directly: the layout of a graph step's drafting (kept rows with their
next tokens and KV slots, rejected and padding rows writing nothing, the last kept row of each
request, chained positions with and without a look-ahead slot, padding requests). Then engines
whose target graphs and draft graphs are both replayed eagerly (no CUDA here: the very forwards
the graphs capture, on the same static buffers, through the Triton kernels under
TRITON_INTERPRET) are compared with the eager engine on the tiny DeepSeek-V3 with its trained MTP
layer: the same drafts proposal by proposal, the same accepted counts and tokens, over decode
and verify steps, partial acceptance (real and forced), padding requests, requests whose chain
has no look-ahead slot and preemption. The captures run in tests/test_gpu_spec_graphs.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.engine.graph_layout import PAD_TOKEN, GraphChoice
from dlengine.engine.request import Request
from dlengine.speculative.mtp_graphs import MTPGraphRunner, draft_graph_layout
from dlengine.testing.mtp import mtp_training_prompts

from test_cuda_graph_verify import LADDER, EagerReplay, triton_ops  # noqa: F401 (fixture)


def _request(rid: str, num_tokens: int, blocks: list[int]) -> Request:
    r = Request(rid, list(range(10, 10 + num_tokens)), SamplingParams(max_tokens=16))
    r.block_ids = list(blocks)
    return r


# ---------------------------------------------------------------------------- layout
def test_layout_of_a_verify_step():
    """k = 3 (4 rows a request), block size 4, a batch of 3 padded to 4:
    A (start 5) kept 2 of 3 drafts; its blocks reach position 11, so its chain has room for all;
    B (start 9) kept none; its blocks end at position 11: chained positions 10 and 11 have slots;
    C (start 2) kept 1 draft but its blocks end at 3: its chain has no look-ahead slot."""
    a = _request("a", 9, [7, 3, 9])  # positions 0-11
    b = _request("b", 11, [2, 5, 6])  # positions 0-11
    c = _request("c", 4, [4])  # positions 0-3
    gained = [[11, 12, 99], [21], [31, 32]]
    batch = draft_graph_layout([a, b, c], [5, 9, 2], gained, GraphChoice(4, 4), num_tokens=3, block_size=4,
                               max_model_len=64)
    P = PAD_TOKEN
    # kept rows feed the token after their position; rejected and padding rows the pad token
    np.testing.assert_array_equal(batch.next_ids, [11, 12, 99, P, 21, P, P, P, 31, 32, P, P, P, P, P, P])
    # kept rows write their MTP KV (A: 5-7 in block 3 -> 13-15; B: 9 in block 5; C: 2-3 in block 4)
    np.testing.assert_array_equal(batch.slot_mapping, [13, 14, 15, -1, 25, -1, -1, -1, 18, 19, -1, -1,
                                                       -1, -1, -1, -1])
    np.testing.assert_array_equal(batch.last_rows, [2, 4, 9, 12])  # each request's last kept row
    # chained passes at A: 8, 9; B: 10, 11; C: 4, 5 (no slot: context 0, slot -1)
    np.testing.assert_array_equal(batch.chain_positions, [[8, 10, 4, 0], [9, 11, 5, 0]])
    np.testing.assert_array_equal(batch.chain_slots, [[36, 26, -1, -1], [37, 27, -1, -1]])
    np.testing.assert_array_equal(batch.chain_seq_lens, [[9, 11, 0, 0], [10, 12, 0, 0]])
    np.testing.assert_array_equal(batch.num_drafts, [3, 3, 1])


def test_layout_of_a_decode_step_with_a_finished_request_and_a_cut_chain():
    a = _request("a", 6, [1, 2])  # start 5, positions 0-7: chained 6, 7 both fit
    b = _request("b", 8, [3, 4])  # start 7: chained 8 and 9 have no slot
    c = _request("c", 3, [5])  # finished meanwhile: nothing kept, nothing drafted
    batch = draft_graph_layout([a, b, c], [5, 7, 2], [[40], [41], None], GraphChoice(1, 4), num_tokens=3,
                               block_size=4, max_model_len=9)
    np.testing.assert_array_equal(batch.next_ids, [40, 41, PAD_TOKEN, PAD_TOKEN])
    np.testing.assert_array_equal(batch.slot_mapping, [9, 19, -1, -1])
    np.testing.assert_array_equal(batch.last_rows, [0, 1, 2, 3])
    # B's chained positions are clamped below max_model_len for RoPE; they write nothing
    np.testing.assert_array_equal(batch.chain_positions[:, :2], [[6, 8], [7, 8]])
    np.testing.assert_array_equal(batch.chain_slots[:, :2], [[10, -1], [11, -1]])
    np.testing.assert_array_equal(batch.chain_seq_lens, [[7, 0, 0, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(batch.num_drafts, [3, 1, 0])


def test_layout_with_one_draft_has_no_chain():
    batch = draft_graph_layout([_request("a", 3, [0])], [2], [[5]], GraphChoice(1, 1), num_tokens=1,
                               block_size=4, max_model_len=16)
    assert batch.chain_positions.shape == (0, 1)
    np.testing.assert_array_equal(batch.num_drafts, [1])


def test_layout_refuses_what_does_not_fit():
    reqs = [_request("a", 3, [0]), _request("b", 3, [1])]
    with pytest.raises(ValueError, match="do not fit"):
        draft_graph_layout(reqs, [2, 2], [[1], [2]], GraphChoice(1, 1), 2, 4, 16)
    with pytest.raises(ValueError, match="do not fit"):
        draft_graph_layout(reqs[:1], [2], [[1, 2, 3]], GraphChoice(2, 1), 2, 4, 16)


# ---------------------------------------------------------------------------- which engines capture
def test_a_backend_planning_decode_on_the_host_keeps_the_drafts_eager():
    """FlashInfer's MLA decode is planned before each replay for that step's lengths: chained
    passes of other lengths cannot sit in a graph, so the proposer captures nothing."""
    from dlengine.kernels.attention.triton_backend import TritonAttentionBackend
    from dlengine.speculative.mtp import MTPProposer

    assert TritonAttentionBackend(mla_decode="flashinfer").plans_decode_on_host
    assert not TritonAttentionBackend(mla_decode="triton").plans_decode_on_host
    proposer = MTPProposer(torch.nn.Identity(), torch.nn.Identity(), 2, 4, torch.device("cpu"))
    target = SimpleNamespace(backend=TritonAttentionBackend(mla_decode="flashinfer"))
    proposer.capture_cuda_graphs(target)  # returns before any CUDA call
    assert proposer.graphs is None


def test_draft_graphs_need_the_target_graphs_hidden_states():
    with pytest.raises(ValueError, match="keep_hidden_states"):
        MTPGraphRunner(torch.nn.Identity(), torch.nn.Identity(), SimpleNamespace(keep_hidden_states=False), 2)


# ---------------------------------------------------------------------------- end to end (eager replays)
class EagerDraftReplay(MTPGraphRunner):
    """An MTPGraphRunner whose replays run the forward a graph captures, eagerly (CPU tests)."""

    def replay(self, choice: GraphChoice) -> None:
        self.forward(choice)


def _engine(k: int, graphs: bool, forced: float | None = None, cache: dict | None = None,
            sched: dict | None = None):
    engine = (EngineBuilder("tiny-deepseek-v3-mtp").device("cpu").dtype("float32").attention("triton")
              .cache(**(cache or {})).scheduler(**(sched or {}))
              .speculative("mtp", num_tokens=k, forced_acceptance=forced).seed(0).build())
    if graphs:
        r, spec = engine.runner, engine.speculator
        r.graph_runner = EagerReplay(r.model, r.kv_cache, r.backend, LADDER[-1], engine.config.max_model_len,
                                     torch.device("cpu"), batch_sizes=LADDER, num_spec_tokens=k,
                                     keep_hidden_states=True)
        spec.graphs = EagerDraftReplay(spec.mtp, spec.embed, r.graph_runner, k)
    return engine


def _run(engine, prompts, max_tokens):
    """Tokens, (drafts, accepted, verify steps), and every proposal: (request, length, drafts)."""
    proposals, propose = [], engine.speculator.propose

    def recording(requests):
        drafts = propose(requests)
        proposals.extend((r.request_id, r.num_tokens, list(d)) for r, d in zip(requests, drafts))
        return drafts

    engine.speculator.propose = recording
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    tokens = [o.token_ids for o in engine.generate(prompts, params)]
    s = engine.stats
    return tokens, (s.num_draft_tokens, s.num_accepted_tokens, s.num_spec_verifications), proposals


def _check(graphed, eager_result, graphed_result, query_lens: tuple[int, ...]) -> None:
    """Same counts, drafts and tokens; draft graphs of each of `query_lens` replayed."""
    assert graphed_result[1:] == eager_result[1:]  # counts, then every proposal's drafts
    assert graphed_result[0] == eager_result[0]  # tokens
    drafts = graphed.speculator.graphs
    assert all(drafts.num_replays[q] > 0 for q in query_lens), drafts.num_replays
    # every graph step drafted from a graph; prompt steps stayed eager
    assert sum(drafts.num_replays.values()) == graphed.runner.num_graph_steps < graphed.stats.num_steps
    bm = graphed.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()


PROMPTS = mtp_training_prompts()[:3] + [[7, 8, 9], mtp_training_prompts()[5][:4]]
MAX_TOKENS = [14, 9, 12, 7, 10]  # 5 requests: padded to 8, then other sizes as they finish


def test_draft_graphs_give_the_eager_drafts_and_the_plain_tokens(triton_ops):
    """k = 3, exact-match acceptance: trained prompts (drafts mostly accepted) and unseen ones
    (mostly rejected), so verify steps keep 0..3 drafts; greedy tokens equal plain decoding."""
    k = 3
    plain = EngineBuilder("tiny-deepseek-v3-mtp").device("cpu").dtype("float32").attention("triton").build()
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in MAX_TOKENS]
    reference = [o.token_ids for o in plain.generate(PROMPTS, params)]
    eager = _run(_engine(k, False), PROMPTS, MAX_TOKENS)
    graphed = _engine(k, True)
    result = _run(graphed, PROMPTS, MAX_TOKENS)
    _check(graphed, eager, result, (1, 1 + k))  # decode and verify steps
    assert result[0] == reference
    drafts, accepted, verifications = result[1]
    assert 0 < accepted < drafts  # partial acceptance


def test_draft_graphs_under_forced_partial_acceptance(triton_ops):
    """Forced acceptance 0.5 (k = 2): every verify step keeps a random number of drafts, and
    the chain continues from the kept ones; the drafts are made by the graph either way."""
    k = 2
    eager = _run(_engine(k, False, forced=0.5), PROMPTS, MAX_TOKENS)
    graphed = _engine(k, True, forced=0.5)
    result = _run(graphed, PROMPTS, MAX_TOKENS)
    _check(graphed, eager, result, (1, 1 + k))
    drafts, accepted, _ = result[1]
    assert 0.2 * drafts < accepted < 0.8 * drafts


def test_draft_graphs_with_preemption_and_chains_without_look_ahead(triton_ops):
    """A pool of 4-token blocks too small for every request's look-ahead and then for all the
    requests at once: chains stop where a request's blocks end (fewer than k drafts, from the
    graph's slot -1 rows dropped on the host) and requests are preempted and recomputed."""
    k = 3
    prompts = mtp_training_prompts()[:6]
    max_tokens = [20] * 6
    cache, sched = dict(block_size=4, num_blocks=26), dict(max_num_batched_tokens=64, max_model_len=64)
    eager = _run(_engine(k, False, cache=cache, sched=sched), prompts, max_tokens)
    graphed = _engine(k, True, cache=cache, sched=sched)
    graph_drafts, run = [], graphed.speculator.graphs.run

    def recording(batch):
        graph_drafts.extend(batch.num_drafts.tolist())
        return run(batch)

    graphed.speculator.graphs.run = recording
    result = _run(graphed, prompts, max_tokens)
    _check(graphed, eager, result, (1 + k,))
    assert graphed.stats.num_preemptions > 0
    # graph steps whose chains reached a position without a slot: fewer than k drafts kept
    assert any(0 < d < k for d in graph_drafts), graph_drafts
