"""Speculative verify steps in CUDA graphs (engine/graph_layout.py, engine/cuda_graph.py), on CPU.

The graph-independent half is checked directly: which graph a step replays (or none), the padded
static-buffer layout of 1 + k rows per request, and that padding drafts are never sampled, so
never accepted. Then the graph runner is driven end to end with its replays run eagerly (no CUDA
here: `EagerReplay` runs the very forward a graph captures, on the same static buffers, through
the Triton kernels under TRITON_INTERPRET): tiny-qwen3 with n-gram drafts and the tiny
DeepSeek-V3 with its trained MTP layer give the eager engine's greedy tokens and the same drafts
and acceptances (the MTP drafts read the graph's static hidden states). The captures themselves
run in tests/test_gpu_spec_graphs.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.engine.cuda_graph import CUDAGraphRunner
from dlengine.engine.graph_layout import PAD_TOKEN, GraphChoice, choose_graph, padded_layout
from dlengine.engine.request import Request
from dlengine.engine.runner import StepHandle
from dlengine.engine.scheduler import ScheduledRequest

LADDER = [1, 2, 4, 8]


def _request(rid: str, tokens: list[int], computed: int, blocks: list[int], drafts: list[int] = ()) -> Request:
    r = Request(rid, tokens, SamplingParams(max_tokens=16))
    r.num_computed_tokens = computed
    r.block_ids = list(blocks)
    r.spec_token_ids = list(drafts)
    return r


def _image_row_inputs():
    """M-RoPE inputs of a 10-token prompt whose last token (the row `_scheduled` computes) is an
    image token: its three axes differ, so no 1-D position expresses it."""
    from dlengine.multimodal.inputs import MultimodalInputs

    pos = np.tile(np.arange(10, dtype=np.int64), (3, 1))
    pos[1, 9], pos[2, 9] = 8, 10
    return MultimodalInputs(images=[], mrope_positions=pos, mrope_delta=0)


def _scheduled(num_new: int = 1, drafts: int = 0, sample: bool = True, multimodal=None) -> ScheduledRequest:
    r = _request("r", list(range(2, 12)), 9, [0], [5] * drafts)
    r.multimodal = multimodal
    return ScheduledRequest(r, num_new, sample, drafts)


# ---------------------------------------------------------------------------- graph or eager
def test_decode_steps_replay_the_one_token_graph_at_the_padded_batch_size():
    assert choose_graph([_scheduled()] * 3, (1, 4), LADDER) == GraphChoice(1, 4)
    assert choose_graph([_scheduled()] * 8, (1,), LADDER) == GraphChoice(1, 8)
    assert choose_graph([_scheduled()], (1, 4), LADDER).num_rows == 1


def test_steps_with_drafts_replay_the_verify_graph_even_with_short_proposals():
    # drafts of 3, 1 and 0 tokens (k = 3): one graph of 4 rows a request, short proposals padded
    step = [_scheduled(4, 3), _scheduled(2, 1), _scheduled()]
    assert choose_graph(step, (1, 4), LADDER) == GraphChoice(4, 4)
    assert choose_graph(step, (1, 4), LADDER).num_rows == 16


@pytest.mark.parametrize("step, query_lens", [
    ([], (1, 4)),
    ([_scheduled(2, 1)], (1,)),  # drafts, but no verify graphs (backend without multi-token capture)
    ([_scheduled(5, 4)], (1, 4)),  # more drafts than the graphs' k (a proposer ignoring num_tokens)
    ([_scheduled(), _scheduled(7)], (1, 4)),  # a prompt chunk
    ([_scheduled(1, sample=False)], (1, 4)),  # a request that samples nothing (scoring, chunked prompt)
    ([_scheduled(multimodal=_image_row_inputs())], (1, 4)),  # its row is an image token (M-RoPE axes differ)
    ([_scheduled()] * 9, (1, 4)),  # more requests than the largest graph
])
def test_steps_a_graph_cannot_express_run_eagerly(step, query_lens):
    assert choose_graph(step, query_lens, LADDER) is None


# ---------------------------------------------------------------------------- padded layout
def _three_requests():
    """A verifies 3 drafts (k = 3), B one, C none; block size 4."""
    a = _request("a", list(range(100, 106)), 5, [7, 3, 9], [11, 12, 13])
    b = _request("b", list(range(200, 210)), 9, [2, 5, 6], [21])
    c = _request("c", [300, 301, 302], 2, [4])
    return [a, b, c]


def test_padded_layout_of_verify_rows():
    reqs = _three_requests()
    batch = padded_layout(reqs, [3, 1, 0], GraphChoice(4, 4), block_size=4, max_model_len=64)
    P = PAD_TOKEN
    np.testing.assert_array_equal(batch.input_ids, [105, 11, 12, 13, 209, 21, P, P, 302, P, P, P, P, P, P, P])
    np.testing.assert_array_equal(batch.positions, [5, 6, 7, 8, 9, 10, 11, 12, 2, 3, 4, 5, 0, 0, 0, 0])
    # real rows write their KV (A: positions 5-7 in block 3, 8 in block 9); padding rows write none
    np.testing.assert_array_equal(batch.slot_mapping, [13, 14, 15, 36, 25, 26, -1, -1, 18, -1, -1, -1, -1, -1, -1, -1])
    # each request's context ends with its 4 query rows; the padding request has none
    np.testing.assert_array_equal(batch.seq_lens, [9, 13, 6, 0])
    np.testing.assert_array_equal(batch.block_tables, [[7, 3, 9], [2, 5, 6], [4, 0, 0]])
    np.testing.assert_array_equal(batch.first_rows, [0, 4, 8])
    np.testing.assert_array_equal(batch.sample_rows, [0, 1, 2, 3, 4, 5, 8])  # 1 + d rows each, no padding
    assert batch.num_drafts == [3, 1, 0]


def test_padded_layout_of_decode_rows_is_the_plain_decode_batch():
    reqs = _three_requests()
    batch = padded_layout(reqs, [0, 0, 0], GraphChoice(1, 4), block_size=4, max_model_len=64)
    np.testing.assert_array_equal(batch.input_ids, [105, 209, 302, PAD_TOKEN])
    np.testing.assert_array_equal(batch.positions, [5, 9, 2, 0])
    np.testing.assert_array_equal(batch.slot_mapping, [13, 25, 18, -1])
    np.testing.assert_array_equal(batch.seq_lens, [6, 10, 3, 0])
    np.testing.assert_array_equal(batch.sample_rows, [0, 1, 2])


def test_padding_draft_positions_stay_below_max_model_len():
    # B's context may not pass 12 tokens: its padding drafts would sit at 11 and 12; RoPE tables
    # have max_model_len rows, so they are clamped (their outputs are dropped anyway)
    reqs = _three_requests()
    batch = padded_layout(reqs, [3, 1, 0], GraphChoice(4, 4), block_size=4, max_model_len=12)
    np.testing.assert_array_equal(batch.positions[4:8], [9, 10, 11, 11])
    np.testing.assert_array_equal(batch.positions[:4], [5, 6, 7, 8])  # real rows never move


def test_padded_layout_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="do not fit"):
        padded_layout(_three_requests(), [3, 1, 0], GraphChoice(4, 2), 4, 64)
    with pytest.raises(ValueError, match="do not fit"):
        padded_layout(_three_requests(), [3, 1, 0], GraphChoice(2, 4), 4, 64)


def test_padding_drafts_are_never_sampled_so_never_accepted():
    """The graph's logits rows of padding drafts agree with the pad token, as if the target
    confirmed it: a rule that treated them as drafts would accept them. Only the 1 + d sampled
    rows of each request reach the acceptance, so B gains its draft and the target's token."""
    reqs = _three_requests()
    batch = padded_layout(reqs, [3, 1, 0], GraphChoice(4, 4), block_size=4, max_model_len=64)
    vocab = 400
    argmax = {0: 11, 1: 12, 2: 99, 3: 50,  # A: drafts 11, 12 accepted, 13 rejected (target 99)
              4: 21, 5: PAD_TOKEN, 6: PAD_TOKEN, 7: PAD_TOKEN,  # B: 21 accepted, then the target says PAD
              8: 33}  # C: no drafts
    logits = torch.zeros(16, vocab)
    for row, tok in argmax.items():
        logits[row, tok] = 1.0
    sampled = logits[torch.from_numpy(batch.sample_rows)].argmax(-1)
    handle = StepHandle(reqs, host_tokens=sampled, num_drafts=batch.num_drafts)
    assert handle.accepted_tokens() == [[11, 12, 99], [21, PAD_TOKEN], [33]]


# ---------------------------------------------------------------------------- per engine
def test_verify_graphs_need_a_backend_that_captures_multi_token_queries():
    from dlengine.assemble import _graph_verify_tokens

    cfg = SimpleNamespace(speculative_tokens=3)
    spec = SimpleNamespace(num_tokens=3)
    verify = SimpleNamespace(name="v", supports_cuda_graphs=True, supports_cuda_graph_verify=True)
    decode_only = SimpleNamespace(name="d", supports_cuda_graphs=True)
    assert _graph_verify_tokens(cfg, verify, spec) == 3
    assert _graph_verify_tokens(cfg, decode_only, spec) == 0  # verify steps eager, decode steps graphed
    assert _graph_verify_tokens(cfg, verify, None) == 0


# ---------------------------------------------------------------------------- end to end (eager replays)
class EagerReplay(CUDAGraphRunner):
    """A CUDAGraphRunner whose replays run the forward a graph captures, eagerly (CPU tests)."""

    def replay(self, choice: GraphChoice) -> None:
        self.forward(choice)


@pytest.fixture
def triton_ops(monkeypatch):
    """The Triton fused ops on CPU (interpreter): their KV write skips slot -1 as on GPUs (the
    torch reference write does not take negative slots)."""
    from dlengine.kernels import selection

    select = selection.select_ops
    monkeypatch.setattr(selection, "select_ops", lambda device, use_triton=True: select("cuda", use_triton))


def _engine(model: str, method: str, k: int, graphs: bool):
    engine = (EngineBuilder(model).device("cpu").dtype("float32").attention("triton")
              .speculative(method, num_tokens=k).build())
    if graphs:
        r = engine.runner
        r.graph_runner = EagerReplay(r.model, r.kv_cache, r.backend, LADDER[-1], engine.config.max_model_len,
                                     torch.device("cpu"), batch_sizes=LADDER, num_spec_tokens=k,
                                     keep_hidden_states=r.keep_hidden_states)
    return engine


def _run(engine, prompts, max_tokens):
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    tokens = [o.token_ids for o in engine.generate(prompts, params)]
    s = engine.stats
    return tokens, (s.num_draft_tokens, s.num_accepted_tokens, s.num_spec_verifications)


def _check_graph_run(graphed, eager_result, graphed_result):
    assert graphed_result == eager_result  # tokens, drafts, accepted drafts, verify steps
    g = graphed.runner.graph_runner
    assert g.num_verify_replays > 0
    assert graphed.runner.num_graph_steps == sum(g.num_replays.values())
    assert graphed.stats.num_steps > graphed.runner.num_graph_steps  # prompt steps stayed eager
    bm = graphed.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()


def test_ngram_verify_graphs_give_the_eager_tokens(triton_ops):
    """5 requests (padded to the graph of 8), n-gram proposals of every length 0..k (padding
    drafts), requests finishing at different steps (other padded sizes)."""
    k = 3
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], [9, 10, 11, 12, 13], [20, 21, 20, 21, 20, 21, 20],
               [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 3, 4], [40, 41]]
    max_tokens = [12, 6, 10, 14, 8]
    eager = _run(_engine("tiny-qwen3", "ngram", k, False), prompts, max_tokens)
    graphed = _engine("tiny-qwen3", "ngram", k, True)
    result = _run(graphed, prompts, max_tokens)
    _check_graph_run(graphed, eager, result)
    drafts, accepted, verifications = result[1]
    assert 0 < accepted < drafts < k * verifications  # accepted and rejected drafts, short proposals


def test_mtp_verify_graphs_give_the_eager_tokens_and_drafts(triton_ops):
    """The trained MTP layer drafts from the graph's static hidden states: same tokens, and the
    same drafts accepted as when it reads the eager forward's (a wrong hidden-state row would
    change the drafts, not the tokens)."""
    from dlengine.testing.mtp import mtp_training_prompts

    k = 2
    prompts = mtp_training_prompts()[:3] + [[7, 8, 9]]
    max_tokens = [12, 9, 12, 7]
    eager = _run(_engine("tiny-deepseek-v3-mtp", "mtp", k, False), prompts, max_tokens)
    graphed = _engine("tiny-deepseek-v3-mtp", "mtp", k, True)
    result = _run(graphed, prompts, max_tokens)
    _check_graph_run(graphed, eager, result)
    assert result[1][1] > 0  # drafts accepted
