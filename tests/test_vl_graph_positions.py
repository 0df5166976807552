"""Decode steps of requests with images in CUDA graphs (engine/graph_layout.py): their text rows
are fed as 1-D rotary positions `index + mrope_delta`, which equal their M-RoPE positions on all
three axes; image rows keep a step eager. On CPU: the position arithmetic, the layout, and the
graph runner driven end to end with eager replays (test_cuda_graph_verify.EagerReplay) giving
transformers' greedy tokens for one- and two-image prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.engine.graph_layout import GraphChoice, choose_graph, padded_layout, rope_offset
from dlengine.engine.request import Request
from dlengine.engine.scheduler import ScheduledRequest
from dlengine.multimodal.inputs import MultimodalInputs
from dlengine.testing import tiny_checkpoint

from test_cuda_graph_verify import LADDER, EagerReplay, triton_ops  # noqa: F401 - triton_ops is a fixture
from vl_reference import MAX_NEW, hf_greedy, requests


def _inputs() -> MultimodalInputs:
    """A prompt of 10 tokens: text 0-2, a 2 x 2 image grid at 3-6 (positions 3 / 3-4 / 3-4),
    text 7-9 at 5-7: mrope_delta = -2."""
    pos = np.array([[0, 1, 2, 3, 3, 3, 3, 5, 6, 7],
                    [0, 1, 2, 3, 3, 4, 4, 5, 6, 7],
                    [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]], dtype=np.int64)
    return MultimodalInputs(images=[], mrope_positions=pos, mrope_delta=-2)


def test_text_rows_of_an_image_request_are_shifted_1d_positions():
    mm = _inputs()
    assert mm.text_rope_offset(10, 4) == -2  # generated tokens
    assert mm.text_rope_offset(9, 3) == -2  # the last prompt token (text) and two drafts
    assert mm.text_rope_offset(7, 1) == -2  # text after the image
    assert mm.text_rope_offset(0, 3) == 0  # text before it
    assert mm.text_rope_offset(5, 1) is None  # an image token: its axes differ
    assert mm.text_rope_offset(2, 6) is None  # a span across the image
    for start, num in ((10, 4), (9, 3), (7, 1)):
        want = np.arange(start, start + num) + mm.text_rope_offset(start, num)
        assert (mm.rope_positions(start, num) == want[None, :]).all()


def test_mrope_of_equal_axes_is_the_1d_rotation():
    """What the graph relies on: the model's M-RoPE tables for 3 equal axes are its 1-D ones."""
    from dlengine.config import RopeConfig
    from dlengine.models.layers.mrope import MRotaryEmbedding

    rope = MRotaryEmbedding(32, 64, RopeConfig(theta=10000.0), sections=(8, 4, 4))
    pos = torch.tensor([0, 5, 17, 63])
    a, b = rope.step(pos), rope.step(pos.expand(3, -1))
    assert torch.equal(a.cos_cached, b.cos_cached) and torch.equal(a.sin_cached, b.sin_cached)


def _request(computed: int, mm) -> ScheduledRequest:
    r = Request("r", list(range(2, 16)), SamplingParams(max_tokens=16), multimodal=mm)
    r.num_computed_tokens = computed
    r.block_ids = [0, 1, 2, 3]
    return ScheduledRequest(r, 1, True, 0)


def test_image_requests_replay_graphs_on_text_rows_only():
    text, image_decode, image_row = _request(12, None), _request(12, _inputs()), _request(5, _inputs())
    assert choose_graph([text, image_decode], (1,), LADDER) == GraphChoice(1, 2)
    assert choose_graph([text, image_row], (1,), LADDER) is None
    assert rope_offset(image_decode.request, 1) == -2 and rope_offset(text.request, 1) == 0
    batch = padded_layout([text.request, image_decode.request], [0, 0], GraphChoice(1, 2), 4, 64)
    assert batch.positions.tolist() == [12, 10]  # the image request's rotary position is shifted
    assert batch.slot_mapping.tolist() == [12, 12]  # its KV slot is not (block 3, offset 0 for both)


@pytest.mark.parametrize("kind", ["qwen3-vl", "qwen3.5-vl"])
def test_graph_replays_of_image_requests_give_transformers_tokens(kind, triton_ops):  # noqa: F811
    engine = EngineBuilder(tiny_checkpoint(kind)).device("cpu").dtype("float32").attention("triton") \
        .cache(block_size=16).build()
    r = engine.runner
    r.graph_runner = EagerReplay(r.model, r.kv_cache, r.backend, LADDER[-1], engine.config.max_model_len,
                                 torch.device("cpu"), batch_sizes=LADDER)
    prompts = requests()  # text only, one image, two images
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    assert [o.token_ids for o in outs] == [hf_greedy(kind, i)[1] for i in range(len(prompts))]
    assert r.num_graph_steps > 0 and any(p.get("images") for p in prompts)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
