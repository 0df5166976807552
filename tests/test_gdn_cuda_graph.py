"""CUDA-graph decode of the Gated DeltaNet hybrids, checked on CPU (the GPU run with real graphs:
tests/test_gpu_gdn.py).

- The graph runner's static inputs: each row's state slot and has_initial_state are staged like
  the other inputs, and padded rows get PAD_STATE_SLOT (no state read or written), no KV slot and
  context 0.
- The whole graph path without a GPU: a graph runner whose `replay` runs the captured forward
  eagerly on the same static buffers (Triton attention under the interpreter, the torch GDN
  references), inside an engine built from a plain engine's parts. Greedy tokens equal the plain
  engine's for batches of 3 and 5 requests (padded to 4 and 8), with requests finishing mid-batch
  and prefix-cache hits whose state is restored before a graph step; the padded rows leave every
  other state slot bit for bit as it was.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.engine.core import EngineCore
from dlengine.engine.cuda_graph import CUDAGraphRunner
from dlengine.engine.engine import Engine
from dlengine.engine.graph_layout import GraphChoice, padded_layout
from dlengine.engine.runner import ModelRunner
from dlengine.kernels.context import PAD_STATE_SLOT
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts

CPU = torch.device("cpu")


def fake_cache(num_state_slots: int):
    return SimpleNamespace(block_size=4, num_state_slots=num_state_slots, layers=[], caches_of_layer=lambda i: {})


def fake_request(tokens: list[int], computed: int, blocks: list[int], state_slot: int):
    """A decoding request as padded_layout reads it: its token at `computed` is the input."""
    return SimpleNamespace(all_token_ids=tokens, num_computed_tokens=computed, block_ids=blocks,
                           spec_token_ids=[], state_slot=state_slot)


def stage_decode(g: CUDAGraphRunner, requests, with_state: bool = True) -> int:
    """Lay out one decode token per request (engine/graph_layout.py) and stage it; the batch size."""
    bs = g.padded_size(len(requests))
    choice = GraphChoice(1, bs if bs is not None else len(requests))
    g.stage(padded_layout(requests, [0] * len(requests), choice, g.block_size, g.max_model_len,
                          with_state=with_state))
    return choice.batch_size


def test_static_state_slots_are_staged_and_padded():
    g = CUDAGraphRunner(None, fake_cache(16), None, max_batch=8, max_model_len=32, device=CPU)
    assert g.batch_sizes == [1, 2, 4, 8]
    # inputs 5, 6, 7 at positions 3, 0, 9 (block size 4: KV slots 2*4+3, 4*4+0, 10*4+1), state slots 7, 0, 15
    bs = stage_decode(g, [fake_request([0, 0, 0, 5], 3, [2], 7), fake_request([6], 0, [4], 0),
                          fake_request([0] * 9 + [7], 9, [8, 9, 10], 15)])
    assert bs == 4
    assert g.input_ids[:4].tolist() == [5, 6, 7, 0]
    assert g.positions[:4].tolist() == [3, 0, 9, 0]
    assert g.slot_mapping[:4].tolist() == [11, 16, 41, -1]  # a padded row writes no K/V ...
    assert g.seq_lens[:4].tolist() == [4, 1, 10, 0]  # ... and attends to nothing
    assert g.state_slots[:4].tolist() == [7, 0, 15, PAD_STATE_SLOT]  # ... and touches no state
    assert g.has_initial_state[:4].tolist() == [True, False, True, False]
    assert g.block_tables[2, :3].tolist() == [8, 9, 10]
    meta = g.metadata(GraphChoice(1, bs))
    assert meta.state_slots.data_ptr() == g.state_slots.data_ptr()  # the graph reads the static buffers
    assert meta.has_initial_state.data_ptr() == g.has_initial_state.data_ptr()
    assert meta.is_decode_only and meta.state_slots_cpu is None

    # five rows replay at 8: rows 5..7 are padding, whatever earlier steps left there
    bs = stage_decode(g, [fake_request(list(range(p + 1)), p, [0, 1], s) for p, s in zip(range(1, 6), [3, 4, 5, 6, 1])])
    assert bs == 8
    assert g.state_slots.tolist() == [3, 4, 5, 6, 1] + [PAD_STATE_SLOT] * 3
    assert g.has_initial_state.tolist() == [True] * 5 + [False] * 3
    assert g.slot_mapping[5:].tolist() == [-1] * 3 and g.seq_lens[5:].tolist() == [0] * 3

    with pytest.raises(ValueError, match="state slot"):
        stage_decode(g, [fake_request([1, 2], 1, [0], 0)] * 2, with_state=False)
    with pytest.raises(ValueError, match="exceed the largest captured batch"):
        stage_decode(g, [fake_request([1, 2], 1, [0], s) for s in range(9)])


def test_models_without_state_have_no_state_buffers():
    g = CUDAGraphRunner(None, fake_cache(0), None, max_batch=4, max_model_len=32, device=CPU)
    assert g.state_slots is None and g.has_initial_state is None
    assert stage_decode(g, [fake_request([1], 0, [0], 0)], with_state=False) == 1
    assert g.metadata(GraphChoice(1, 1)).state_slots is None


class EagerReplay(CUDAGraphRunner):
    """The graph runner with each replay run eagerly (no CUDA here): the same static buffers,
    padding and metadata a captured graph reads. It records the state storage around each
    replay so the test can check what the padded rows left alone."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.padded_replays = 0
        self.untouched_ok = True
        self._live: list[int] = []

    def stage(self, batch, **kwargs) -> None:
        # the slots of the step's real rows, as the runner gave them
        self._live = batch.state_slots[: len(batch.first_rows)].tolist()
        super().stage(batch, **kwargs)

    def replay(self, choice) -> None:
        before = [g.storage.clone() for g in self.kv_cache.state_groups]
        with torch.inference_mode():
            self.forward(choice)
        if len(self._live) < choice.batch_size:
            self.padded_replays += 1
        others = [s for s in range(self.kv_cache.num_state_slots) if s not in self._live]
        for b, g in zip(before, self.kv_cache.state_groups):
            self.untouched_ok &= torch.equal(b[others], g.storage[others])


def graph_engine(base: Engine, max_batch: int = 8) -> tuple[Engine, EagerReplay]:
    """An engine on `base`'s model, cache, block manager and scheduler whose runner replays
    decode steps through an EagerReplay graph runner."""
    core, cfg = base.core, base.config
    graphs = EagerReplay(core.model, core.kv_cache, core.runner.backend, max_batch, cfg.max_model_len, CPU)
    runner = ModelRunner(core.model, core.kv_cache, core.runner.backend, core.runner.sampler, cfg.model.vocab_size,
                         CPU, graph_runner=graphs, kernels=core.runner.kernels)
    graph_core = EngineCore(cfg, core.model, core.kv_cache, core.block_manager, core.scheduler, runner,
                            memory_plan=core.memory_plan)
    return Engine(cfg, graph_core, base.tokenizer), graphs


@pytest.fixture(scope="module", params=["qwen3.5-moe", "qwen3-next"])
def base_engine(request):
    pytest.importorskip("triton")
    return (EngineBuilder(tiny_checkpoint(request.param)).dtype("float32").attention("triton").cuda_graphs(False)
            .cache(block_size=16).scheduler(max_num_seqs=8, max_model_len=96).build())


PROMPTS = make_prompts(5, lengths=(1, 17, 5, 33, 2), seed=3)


@pytest.mark.parametrize("n", [3, 5])
def test_graph_decode_matches_eager_with_padding(base_engine, n):
    """n requests of mixed prompt lengths, one finishing after 2 tokens (the batch shrinks
    mid-way), decode through padded graph batches: the same greedy tokens as eager steps."""
    prompts = PROMPTS[:n]
    params = [SamplingParams(max_tokens=2 if i == 1 else 6, temperature=0.0, ignore_eos=True) for i in range(n)]
    base_engine.block_manager.reset_prefix_cache()
    eager = [o.token_ids for o in base_engine.generate(prompts, params)]
    base_engine.block_manager.reset_prefix_cache()
    engine, graphs = graph_engine(base_engine)
    assert [o.token_ids for o in engine.generate(prompts, params)] == eager
    assert engine.runner.num_graph_steps > 0 and graphs.num_replays[1] == engine.runner.num_graph_steps
    assert graphs.padded_replays > 0  # 3 -> 4 and 5 -> 8 rows: padding ran
    assert graphs.untouched_ok  # no replay changed a slot outside its live rows
    bm = base_engine.block_manager
    assert bm.state_slots.num_free == bm.state_slots.num_slots
    assert bm.num_free_blocks == bm.num_blocks


def test_graph_steps_restore_prefix_cache_checkpoints(base_engine):
    """A prompt of one block + 1 token, sent again, hits its cached block and computes its last
    token in a one-token step: a graph step, whose slot is restored from the checkpoint first."""
    prompt = make_prompts(1, lengths=(17,), seed=4)[0]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    base_engine.block_manager.reset_prefix_cache()
    eager = base_engine.generate([prompt], params)[0].token_ids
    engine, graphs = graph_engine(base_engine)
    engine.stats.reset()
    assert engine.generate([prompt], params)[0].token_ids == eager
    assert engine.stats.num_cached_tokens == 16
    assert graphs.num_replays[1] == 4  # the prompt's last token and the three decodes after it
