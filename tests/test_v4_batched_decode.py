"""DeepSeek-V4's batched decode step (layers/v4_attention.py `_decode`, kernels/v4/batched_decode.py)
against the per-request path it replaces for one-token steps, on the tiny checkpoint's layers.

- The compressors (CSA with overlap, its indexer's, HCA): `decode_update` on random rings and
  paged entries writes exactly what `update` writes request by request, for requests that start,
  continue or complete a window (the first CSA window, with no previous half, too); padded rows
  (state slot -1, stale block tables) write no ring row and no entry, also in an all-padding batch.
- The indexer: `top_entry_ids(indexer_logits(...))` lists the entries `indexer_select` chooses,
  with fewer, as many and more finished windows than the top-k; the Triton form (DSA's kernel,
  under the interpreter) gives the same scores.
- Whole attention layers of each kind: the batched decode equals the per-request path (the one
  prompt steps take) on random caches, outputs and every cache byte; padded rows added to the
  batch change neither the live rows' outputs nor any cache.
- The CUDA-graph path without a GPU: the graph runner with each replay run eagerly on its static
  buffers (tests/test_gdn_cuda_graph.py's EagerReplay) gives transformers' greedy tokens for
  prompts of 1..300 tokens under the default schedule, chunked prefill and preemption, with
  padded batches that leave every other state slot and paged block as it was.
- The clamped MoE's dense form (what a captured graph runs) equals its sparse form.
(The same with real CUDA graphs: tests/test_gpu_v4.py.)
"""

from __future__ import annotations

import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.engine.core import EngineCore
from dlengine.engine.engine import Engine
from dlengine.engine.runner import ModelRunner
from dlengine.kernels.context import AttentionMetadata, ForwardContext
from dlengine.kernels.v4.batched_decode import finished_entry_ids, indexer_logits, top_entry_ids
from dlengine.kernels.v4.reference import indexer_select
from dlengine.models.layers.v4_attention import CSA, HCA, SLIDING, StepSlice
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts
from hf_reference import SCHEDULING_SETUPS, build_for_setup, reference_greedy
from test_gdn_cuda_graph import CPU, EagerReplay

KIND = "deepseek-v4"
BLOCK = 16


@pytest.fixture(scope="module")
def engine():
    return (EngineBuilder(tiny_checkpoint(KIND)).dtype("float32").cache(block_size=BLOCK)
            .scheduler(max_num_seqs=8, max_model_len=512).build())


def compressor(engine, which: str):
    layers = engine.core.model.layers  # the tiny schedule: CSA, HCA, sliding, CSA
    return {"csa": layers[0].attn.compressor, "csa_index": layers[0].attn.indexer.compressor,
            "hca": layers[1].attn.compressor}[which]


def decode_batch(m: int, g: torch.Generator, num_blocks: int, blocks_per_row: int):
    """Positions, state slots and block tables of 6 live requests and 2 padded rows. The live
    ones start a sequence, sit mid-window, complete their first window (no previous half for
    CSA), their second and a later one; the padded rows keep stale block tables naming live
    requests' blocks, one of them at a position that would complete a window."""
    positions = torch.tensor([m - 1, 2 * m - 1, 5 * m - 1, 3, 0, 7 * m + 1, 0, m - 1])
    slots = torch.tensor([3, 0, 7, 5, 1, 2, -1, -1])
    tables = torch.randperm(num_blocks, generator=g)[: 8 * blocks_per_row].view(8, blocks_per_row).int()
    tables[6], tables[7] = tables[0], tables[2]
    return positions, slots, tables


@pytest.mark.parametrize("which", ["csa", "csa_index", "hca"])
def test_compressor_decode_update_matches_per_request(engine, which):
    comp = compressor(engine, which)
    g = torch.Generator().manual_seed(1)
    m, num_slots, num_blocks = comp.m, 8, 80
    positions, slots, tables = decode_batch(m, g, num_blocks, 8)
    state = {f"{comp.cache_name}_kv": torch.randn(num_slots, comp.ring, comp.width, generator=g),
             f"{comp.cache_name}_gate": torch.randn(num_slots, comp.ring, comp.width, generator=g)}
    paged = torch.randn(num_blocks, BLOCK // m, comp.dim, generator=g)
    kv, gate = torch.randn(8, comp.width, generator=g), torch.randn(8, comp.width, generator=g)

    initial, ref_state, ref_paged = paged.clone(), {k: v.clone() for k, v in state.items()}, paged.clone()
    for i in range(6):  # the live rows, one request at a time
        r = StepSlice(0, 1, int(positions[i]), int(slots[i]), tables[i])
        count = comp.update(kv[i:i + 1], gate[i:i + 1], r, ref_state, ref_paged, BLOCK)
        assert count == (int(positions[i]) + 1) // m

    assert not torch.equal(ref_paged, paged)  # the completed windows wrote entries

    counts = comp.decode_update(kv, gate, slots, positions, tables, state, paged, BLOCK)
    assert counts.tolist() == [(p + 1) // m for p in positions[:6].tolist()] + [0, 0]  # padded rows: none
    # the same entries written (none by a padded row), equal to rounding: the pooling's reductions
    # run over differently shaped batches
    assert torch.equal((paged != initial).any(-1), (ref_paged != initial).any(-1))
    assert torch.allclose(paged, ref_paged, rtol=1e-6, atol=1e-6)
    for name in state:
        assert torch.equal(state[name], ref_state[name]), f"{name} differs (or a padded row wrote it)"

    # a batch of padding only (a graph's warm-up) touches nothing
    before = ({k: v.clone() for k, v in state.items()}, paged.clone())
    comp.decode_update(kv[:2], gate[:2], torch.tensor([-1, -1]), torch.tensor([m - 1, 0]), tables[:2], state, paged,
                       BLOCK)
    assert torch.equal(paged, before[1]) and all(torch.equal(state[k], before[0][k]) for k in state)


def test_indexer_top_entries_match_indexer_select():
    """Counts 0, 3 (< top-k), 8 (= top-k) and more; keys gathered through shuffled block tables."""
    g = torch.Generator().manual_seed(2)
    heads, dim, m, topk, per_block, num_blocks, blocks_per_row = 16, 16, 4, 8, 4, 64, 8
    positions = torch.tensor([0, 2, 13, 31, 77, 127, 60])
    b = positions.numel()
    q, w = torch.randn(b, heads, dim, generator=g), torch.randn(b, heads, generator=g) * heads ** -0.5
    keys = torch.randn(num_blocks, per_block, dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: b * blocks_per_row].view(b, blocks_per_row).int()
    counts = (positions + 1) // m
    width = blocks_per_row * per_block
    logits = indexer_logits(q, w, keys, tables, counts, width, dim ** -0.5)
    ids = top_entry_ids(logits, topk)
    assert ids.shape == (b, topk)
    for i in range(b):
        c = int(counts[i])
        entry = torch.arange(c)
        row_keys = keys[tables[i, entry // per_block].long(), entry % per_block]
        chosen = indexer_select(q[i:i + 1], row_keys, w[i:i + 1], positions[i:i + 1], m, topk, dim ** -0.5)
        want = torch.nonzero(chosen[0]).flatten().tolist()
        got = ids[i]
        assert got[got >= 0].tolist() == want, f"row {i} ({c} entries)"
        assert (got[len(want):] == -1).all()
    assert finished_entry_ids(counts, 10)[3].tolist() == list(range(8)) + [-1, -1]

    pytest.importorskip("triton")
    from dlengine.kernels.v4 import indexer_triton
    from dlengine.kernels.mla.mla_triton import interpret_mode

    if not interpret_mode():
        pytest.skip("the Triton indexer needs CUDA or TRITON_INTERPRET=1")
    fused = indexer_triton.indexer_logits(q, w, keys, tables, counts, width, dim ** -0.5)
    assert torch.equal(torch.isinf(fused), torch.isinf(logits))
    assert torch.allclose(fused[~torch.isinf(fused)], logits[~torch.isinf(logits)], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- whole layers


def layer_context(engine, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                  per_request: bool) -> ForwardContext:
    """A one-token-per-request step's context. `per_request` says the step has a longer query
    (max_query_len 2), which sends the layers down the per-request (prompt) path."""
    b = positions.numel()
    meta = AttentionMetadata(
        query_start_loc=torch.arange(b + 1, dtype=torch.int32), seq_lens=(positions + 1).int(),
        block_tables=tables, slot_mapping=torch.full((b,), -1, dtype=torch.int64),
        max_query_len=2 if per_request else 1, max_seq_len=int(positions.max()) + 1,
        query_lens_cpu=[1] * b, seq_lens_cpu=(positions + 1).tolist(),
        state_slots=slots, has_initial_state=positions > 0, state_slots_cpu=slots.tolist(),
        has_initial_state_cpu=(positions > 0).tolist())
    kv = engine.kv_cache
    return ForwardContext(meta, kv.layers, [kv.caches_of_layer(i) for i in range(len(kv.layers))])


def cache_bytes(engine) -> list[torch.Tensor]:
    return [g.storage.clone() for g in engine.kv_cache.groups]


def restore(engine, saved: list[torch.Tensor]) -> None:
    for g, s in zip(engine.kv_cache.groups, saved):
        g.storage.copy_(s)


@pytest.mark.parametrize("layer_idx,kind", [(0, CSA), (1, HCA), (2, SLIDING)])
def test_layer_batched_decode_equals_per_request_path(engine, layer_idx, kind):
    attn = engine.core.model.layers[layer_idx].attn
    assert attn.kind == kind
    g = torch.Generator().manual_seed(3)
    for grp in engine.kv_cache.groups:  # random rings, partial windows and compressed entries
        storage = grp.storage.view(torch.float32) if grp.storage.dtype == torch.uint8 else grp.storage
        storage.copy_(torch.randn(storage.shape, generator=g))
    # requests across the window (16), CSA (4) and HCA (16) periods, completing windows or not
    positions = torch.tensor([15, 3, 200, 63, 0, 130, 47, 255])
    slots = torch.tensor([2, 5, 0, 7, 1, 3, 6, 4])
    tables = torch.randperm(engine.block_manager.num_blocks, generator=g)[: 8 * 16].view(8, 16).int()
    x = torch.randn(8, engine.config.model.hidden_size, generator=g)
    start = cache_bytes(engine)

    with torch.inference_mode():
        ref = attn(positions, x, layer_context(engine, positions, slots, tables, per_request=True))
        ref_cache = cache_bytes(engine)
        restore(engine, start)
        out = attn(positions, x, layer_context(engine, positions, slots, tables, per_request=False))
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), (out - ref).abs().max()
    for grp, want, was in zip(engine.kv_cache.groups, ref_cache, start):
        if grp.spec.paged:  # the same entries written, equal to rounding (reductions over other shapes)
            assert torch.equal((grp.storage != was).any(-1), (want != was).any(-1)), grp.spec.describe()
            assert torch.allclose(grp.storage, want, rtol=1e-6, atol=1e-6), grp.spec.describe()
        else:  # rings hold copies of the projections: bit for bit
            assert torch.equal(grp.storage, want), f"{grp.spec.describe()} differs"

    # three padded rows (slot -1, position 0 and one completing a window, stale tables) change nothing
    batched = cache_bytes(engine)
    restore(engine, start)
    pad_pos, pad_slots = torch.cat([positions, torch.tensor([0, 3, 0])]), torch.cat([slots, torch.tensor([-1] * 3)])
    pad_tables = torch.cat([tables, tables[:3]])
    with torch.inference_mode():
        padded = attn(pad_pos, torch.cat([x, x[:3]]), layer_context(engine, pad_pos, pad_slots, pad_tables, False))
    assert torch.allclose(padded[:8], out, rtol=1e-6, atol=1e-6)
    for grp, want in zip(engine.kv_cache.groups, batched):
        assert torch.equal(grp.storage, want), f"a padded row wrote {grp.spec.describe()}"


def test_decode_steps_take_the_batched_path(engine, monkeypatch):
    """A pure decode step never lists requests on the host (the per-request path's entry)."""
    import dlengine.models.layers.v4_attention as v4

    calls = []
    real = v4.request_slices
    monkeypatch.setattr(v4, "request_slices", lambda ctx: calls.append(ctx.meta.max_query_len) or real(ctx))
    engine.generate(make_prompts(3, lengths=(5, 9, 20)), SamplingParams(max_tokens=4, temperature=0.0))
    assert calls and min(calls) > 1  # prompt steps only


# ------------------------------------------------------------------------- CUDA-graph replay


class PagedCheckReplay(EagerReplay):
    """tests/test_gdn_cuda_graph.py's eager graph runner (static buffers, padded rows, state
    slots outside the live rows checked untouched), also checking the paged blocks: a replay
    changes none outside its live requests' block tables."""

    def stage(self, batch, **kwargs) -> None:
        # the blocks the live requests' contexts (seq_lens) occupy in their (zero-padded) tables
        used = -(-batch.seq_lens[: len(batch.first_rows)] // self.block_size)
        self._blocks = {int(b) for t, k in zip(batch.block_tables, used) for b in t[:k]}
        super().stage(batch, **kwargs)

    def replay(self, choice) -> None:
        paged = [g for g in self.kv_cache.groups if g.spec.paged]
        others = torch.ones(self.kv_cache.num_blocks, dtype=torch.bool)
        others[sorted(self._blocks)] = False
        before = [g.storage[:, others].clone() for g in paged]
        super().replay(choice)
        for b, g in zip(before, paged):
            self.untouched_ok &= torch.equal(b, g.storage[:, others])


def graph_engine(base: Engine, max_batch: int) -> tuple[Engine, PagedCheckReplay]:
    """An engine on `base`'s parts whose decode steps replay through PagedCheckReplay."""
    core, cfg = base.core, base.config
    graphs = PagedCheckReplay(core.model, core.kv_cache, core.runner.backend, max_batch, cfg.max_model_len, CPU)
    runner = ModelRunner(core.model, core.kv_cache, core.runner.backend, core.runner.sampler, cfg.model.vocab_size,
                         CPU, graph_runner=graphs, kernels=core.runner.kernels)
    graph_core = EngineCore(cfg, core.model, core.kv_cache, core.block_manager, core.scheduler, runner,
                            memory_plan=core.memory_plan)
    return Engine(cfg, graph_core, base.tokenizer), graphs


PROMPTS = make_prompts()  # lengths 1 .. 300
MAX_NEW = 24


@pytest.mark.parametrize("setup", ["default", "chunked-32", "preemption"])
def test_graph_replays_give_transformers_tokens(setup):
    base = build_for_setup(tiny_checkpoint(KIND), SCHEDULING_SETUPS[setup])
    engine, graphs = graph_engine(base, max_batch=16)
    expected = reference_greedy(KIND, tuple(map(tuple, PROMPTS)), MAX_NEW)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    for i, (out, want) in enumerate(zip(outs, expected)):
        assert out.token_ids == list(want), f"prompt {i} (len {len(PROMPTS[i])}) diverged"
    assert graphs.num_replays[1] > 0 and graphs.num_replays[1] == engine.runner.num_graph_steps
    assert graphs.padded_replays > 0  # 10 requests replay at 16 rows
    assert graphs.untouched_ok  # no replay changed a state slot or paged block outside its live rows
    if setup == "preemption":
        assert engine.stats.num_preemptions > 0
    bm = base.block_manager
    assert bm.state_slots.num_free == bm.state_slots.num_slots and bm.num_free_blocks == bm.num_blocks


def test_dense_experts_equal_sparse():
    """The MoE form a CUDA graph captures (every expert on every token, weighted by its routing
    weight) gives the sparse form's numbers."""
    from dlengine.kernels.v4.reference import clamped_swiglu_experts, clamped_swiglu_experts_dense

    g = torch.Generator().manual_seed(4)
    t, h, inter, e, k = 7, 16, 8, 6, 2
    x = torch.randn(t, h, generator=g)
    w13, w2 = torch.randn(e, 2 * inter, h, generator=g), torch.randn(e, h, inter, generator=g)
    ids = torch.rand(t, e, generator=g).argsort(dim=-1)[:, :k]
    weights = torch.rand(t, k, generator=g)
    sparse = clamped_swiglu_experts(x, w13, w2, weights, ids, 2.0)
    assert torch.allclose(clamped_swiglu_experts_dense(x, w13, w2, weights, ids, 2.0), sparse, rtol=1e-5, atol=1e-5)
