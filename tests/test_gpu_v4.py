"""GPU checks of DeepSeek-V4's batched decode step and its CUDA graphs (need a CUDA device, e.g.
an H100; skipped on CPU). The same logic runs on CPU in tests/test_v4_batched_decode.py (graph
replays simulated eagerly on the static buffers) and tests/test_v4_kernels.py.

- The decode step's kernels (the indexer scores on DSA's Triton kernel, the top-k, the masked ring
  write, the Triton decode attention) captured in one CUDA graph with padded rows, replayed with
  other slots and positions: equal to the torch references on the live rows, zeros on the padded
  rows, and no other slot of the ring touched.
- A tiny V4 engine on the GPU: the batched decode path (one token at a time, eager) gives
  transformers' logits; CUDA graphs are on by default; cuda_graphs(True) and cuda_graphs(False)
  give the same greedy tokens for 3 and 5 requests (replayed at 4 and 8 rows: padded), one
  finishing early, prompts up to 300 tokens (across the window and many CSA / HCA periods), and
  every block and state slot comes back.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

KIND = "deepseek-v4"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()


def test_decode_step_kernels_capture_with_padded_rows():
    from dlengine.kernels.v4 import decode_triton, indexer_triton
    from dlengine.kernels.v4.batched_decode import indexer_logits, masked_index_put, top_entry_ids
    from dlengine.kernels.v4.reference import decode_attention

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    b, h, d, window, m, block, n_slots, n_blocks, topk = 8, 16, 128, 128, 4, 128, 16, 80, 64
    per_block, hi, di = block // m, 8, 64
    ring = torch.randn(n_slots, window, d, device=dev, generator=g)
    compressed = torch.randn(n_blocks, per_block, d, device=dev, generator=g)
    keys = torch.randn(n_blocks, per_block, di, device=dev, generator=g)
    q = torch.randn(b, h, d, device=dev, generator=g)
    iq, iw = torch.randn(b, hi, di, device=dev, generator=g), torch.randn(b, hi, device=dev, generator=g)
    new_kv = torch.randn(b, d, device=dev, generator=g)
    sinks = torch.randn(h, device=dev, generator=g)
    # static inputs, all rows padded while capturing (as the graph runner captures)
    slots = torch.full((b,), -1, dtype=torch.int64, device=dev)
    positions = torch.zeros(b, dtype=torch.int64, device=dev)
    tables = torch.zeros(b, 10, dtype=torch.int32, device=dev)
    width = tables.shape[1] * per_block

    def step(logits_fn, attention_fn):
        masked_index_put(ring, (slots.clamp(min=0), positions % window), slots >= 0, new_kv)
        counts = torch.where(slots >= 0, (positions + 1) // m, 0)  # as Compressor.decode_update counts
        ids = top_entry_ids(logits_fn(iq, iw, keys, tables, counts, width, di ** -0.5), topk)
        return attention_fn(q, ring, slots, positions, window, compressed, tables, ids, m, sinks, d ** -0.5), ids

    before = ring.clone()
    step(indexer_triton.indexer_logits, decode_triton.decode_attention)  # compile; all padding: nothing written
    torch.cuda.synchronize()
    assert torch.equal(ring, before)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, ids = step(indexer_triton.indexer_logits, decode_triton.decode_attention)

    live = [3, 0, 9, 15, 7]  # slot 0 (the padded rows' rewrite target) and the last slot among them
    slots.copy_(torch.tensor(live + [-1] * 3, device=dev))
    positions.copy_(torch.tensor([5, 130, 1000, 77, 255, 0, 3, 0], device=dev))
    tables.copy_(torch.randperm(n_blocks, device=dev)[: b * 10].view(b, 10).int())
    tables[5:] = tables[:3]  # padded rows keep stale tables naming live blocks
    start = ring.clone()
    graph.replay()
    torch.cuda.synchronize()

    graphed_ring = ring.clone()
    ring.copy_(start)
    ref, ref_ids = step(indexer_logits, decode_attention)  # the torch references, eagerly
    n = len(live)
    assert torch.equal(ids[:n], ref_ids[:n])  # float32 scores: the same top-k
    assert (ids[n:] == -1).all()
    assert rel(out[:n], ref[:n]) < 1e-4 and not out[n:].any()
    assert torch.equal(graphed_ring, ring)
    others = [s for s in range(n_slots) if s not in live]
    assert torch.equal(graphed_ring[others], start[others])


def test_tiny_v4_engine_on_gpu_matches_transformers():
    """One token at a time (the batched decode path, eagerly: a scoring request samples nothing)
    against transformers' float32 logits; the engine captures CUDA graphs by default."""
    from dlengine import EngineBuilder
    from dlengine.testing import tiny_checkpoint

    from conftest import make_prompts
    from hf_reference import hf_logits

    path = tiny_checkpoint(KIND)
    engine = EngineBuilder(path).device("cuda").dtype("float32").cache(block_size=16).build()
    assert engine.runner.graph_runner is not None  # V4 decodes from CUDA graphs by default
    for prompt in make_prompts(2, lengths=(77, 200), seed=6):
        assert rel(engine.prompt_logits(prompt, chunk_size=1).cpu(), hf_logits(path, prompt)) < 1e-3
        assert rel(engine.prompt_logits(prompt).cpu(), hf_logits(path, prompt)) < 1e-3
    engine.close()


@pytest.mark.parametrize("num_requests", [3, 5])
def test_engine_with_cuda_graphs_matches_eager(num_requests):
    from dlengine import EngineBuilder, SamplingParams
    from dlengine.testing import tiny_checkpoint

    from conftest import make_prompts

    path = tiny_checkpoint(KIND)
    prompts = make_prompts(num_requests, lengths=(17, 1, 300, 5, 100), seed=5)
    params = [SamplingParams(max_tokens=4 if i == 1 else 40, temperature=0.0, ignore_eos=True)
              for i in range(num_requests)]
    tokens = {}
    for graphs in (False, True):
        engine = (EngineBuilder(path).device("cuda").dtype("float32").attention("triton").cuda_graphs(graphs)
                  .cache(block_size=16).build())
        tokens[graphs] = [o.token_ids for o in engine.generate(prompts, params)]
        runner = engine.runner
        if graphs:
            g = runner.graph_runner
            assert g is not None and g.padded_size(num_requests) > num_requests
            assert runner.num_graph_steps > 0 and g.num_replays[1] == runner.num_graph_steps  # graphs really ran
        else:
            assert runner.graph_runner is None and runner.num_graph_steps == 0
        bm = engine.block_manager
        assert bm.state_slots.num_free == bm.state_slots.num_slots and bm.num_free_blocks == bm.num_blocks
        engine.close()
    assert tokens[True] == tokens[False]
