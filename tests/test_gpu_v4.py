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
- The Triton prefill attention at V4-Flash's dimensions (64 heads of 512, window 128, CSA top-512
  of m = 4, HCA m' = 128): equal to the torch reference in float32 and bf16 for a step mixing a
  long prompt, a chunk from mid-sequence, a prompt shorter than the window and a one-token
  extend; and timed against the reference on a 4096-token prompt (printed, with a few other
  tile choices: run with -s to see them).
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


# ------------------------------------------------------------------------- prefill attention

FLASH = dict(heads=64, dim=512, window=128, block_size=256, topk=512)  # V4-Flash's attention
RATES = {"csa": 4, "hca": 128, "sliding": 1}


def flash_prefill_inputs(mode: str, requests: list[tuple[int, int]], dtype: torch.dtype, seed: int = 0):
    """A prompt step at V4-Flash's dimensions: requests (first position, new tokens), the ring
    and paged entries random (what the ring holds before a chunk does not matter to the
    comparison), CSA ids a random top-k of each query's finished entries (ascending, -1 padded)."""
    from dlengine.kernels.v4.batched_decode import top_entry_ids

    dev, f = "cuda", FLASH
    g = torch.Generator(device=dev).manual_seed(seed)
    m = RATES[mode]
    t, b = sum(n for _, n in requests), len(requests)
    per_block = f["block_size"] // m
    blocks_per_row = -(-max(s + n for s, n in requests) // f["block_size"])
    num_blocks = b * blocks_per_row + 3
    q = torch.randn(t, f["heads"], f["dim"], device=dev, generator=g).to(dtype)
    kv = torch.randn(t, f["dim"], device=dev, generator=g).to(dtype)
    ring = torch.randn(b + 2, f["window"], f["dim"], device=dev, generator=g).to(dtype)
    compressed = torch.randn(num_blocks, per_block, f["dim"], device=dev, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, device=dev, generator=g)[: b * blocks_per_row].view(b, -1).int()
    positions = torch.cat([torch.arange(s, s + n, device=dev) for s, n in requests])
    starts = torch.tensor([0] + [n for _, n in requests], device=dev).cumsum(0).to(torch.int32)
    slots = torch.randperm(b + 2, device=dev, generator=g)[:b]
    ids = None
    if mode == "sliding":
        ids = torch.zeros((t, 0), dtype=torch.long, device=dev)
    elif mode == "csa":
        width = max(s + n for s, n in requests) // m
        scores = torch.rand(t, width, device=dev, generator=g)
        visible = torch.arange(width, device=dev)[None, :] < ((positions + 1) // m)[:, None]
        ids = top_entry_ids(scores.masked_fill(~visible, float("-inf")), f["topk"])
    sinks = torch.randn(f["heads"], device=dev, generator=g)
    return (q, kv, ring, positions, starts, slots, f["window"], compressed, tables, ids, m, sinks, f["dim"] ** -0.5)


def upcast(args):
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


@pytest.mark.parametrize("mode", ["csa", "hca", "sliding"])
def test_prefill_kernel_matches_reference_at_flash_dims(mode):
    """A 1000-token prompt, a 300-token chunk from position 1100 (its window in the ring), a
    60-token prompt (shorter than the window) and a one-token extend, in one step."""
    from dlengine.kernels.v4 import prefill_triton
    from dlengine.kernels.v4.reference import prefill_attention

    requests = [(0, 1000), (1100, 300), (0, 60), (517, 1)]
    args = flash_prefill_inputs(mode, requests, torch.float32)
    ref = prefill_attention(*args)
    assert rel(prefill_triton.prefill_attention(*args), ref) < 1e-5  # float32: ieee dots
    args16 = flash_prefill_inputs(mode, requests, torch.bfloat16)
    out = prefill_triton.prefill_attention(*args16)
    assert out.dtype == torch.bfloat16 and rel(out, prefill_attention(*upcast(args16))) < 1e-2


def cuda_time_ms(fn, iters: int = 10) -> float:
    fn()  # compile / warm up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@pytest.mark.parametrize("mode", ["csa", "hca", "sliding"])
def test_prefill_kernel_timing_4k_prompt(mode):
    """One 4096-token bf16 prompt at V4-Flash's dimensions (one layer): the Triton kernel against
    the per-request torch reference, timed with CUDA events; prints both and the ratio, and the
    kernel's time under other tile choices (default_config's are not tuned on an H100 yet)."""
    from dlengine.kernels.v4 import prefill_triton
    from dlengine.kernels.v4.reference import prefill_attention

    args = flash_prefill_inputs(mode, [(0, 4096)], torch.bfloat16)
    ref_ms = cuda_time_ms(lambda: prefill_attention(*args), iters=3)
    triton_ms = cuda_time_ms(lambda: prefill_triton.prefill_attention(*args))
    assert rel(prefill_triton.prefill_attention(*args), prefill_attention(*upcast(args))) < 1e-2
    cfg = prefill_triton.default_config(FLASH["heads"], FLASH["dim"])
    print(f"\nV4 prefill attention, {mode}, 4096 tokens, 64 heads x 512, bf16: torch reference {ref_ms:.2f} ms, "
          f"triton {triton_ms:.2f} ms ({cfg}), {ref_ms / triton_ms:.1f}x")
    for alt in [(64, 64, 8, 1), (64, 16, 8, 2), (64, 32, 4, 2), (32, 32, 8, 2), (32, 64, 4, 2), (16, 32, 4, 2)]:
        c = prefill_triton.LaunchConfig(*alt)
        try:
            ms = cuda_time_ms(lambda: prefill_triton.prefill_attention(*args, config=c))
            print(f"  {c}: {ms:.2f} ms")
        except Exception as e:  # noqa: BLE001 - a tile choice the GPU cannot run (shared memory): report it
            print(f"  {c}: failed ({type(e).__name__}: {str(e)[:120]})")
