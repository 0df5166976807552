"""DeepSeek-V4's Triton decode attention vs its torch reference at tiny sizes (under
TRITON_INTERPRET=1 without CUDA): window rings shorter and longer than the window, compressed
entries spread over a block table with -1 padding, per-head sinks."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decorations

pytest.importorskip("triton")

from dlengine.kernels.v4 import decode_triton as dt  # noqa: E402
from dlengine.kernels.v4.reference import decode_attention  # noqa: E402

if DEVICE == "cpu" and not dt.interpret_mode():
    dt = importlib.reload(dt)
if DEVICE == "cpu" and not dt.interpret_mode():
    pytest.skip("cannot switch triton to interpreter mode", allow_module_level=True)


@pytest.mark.parametrize("heads,dim", [(4, 32), (20, 24)])
def test_decode_attention_matches_reference(heads, dim):
    g = torch.Generator().manual_seed(0)
    b, window, m, per_block, num_blocks, slots = 5, 16, 4, 4, 40, 8
    q = torch.randn(b, heads, dim, generator=g)
    ring = torch.randn(slots, window, dim, generator=g)
    compressed = torch.randn(num_blocks, per_block, dim, generator=g)
    block_tables = torch.randperm(num_blocks, generator=g)[: b * 8].view(b, 8).int()
    positions = torch.tensor([0, 3, 15, 16, 120])
    state_slots = torch.tensor([7, 0, 3, 5, 1])
    entry_ids = torch.full((b, 10), -1, dtype=torch.long)
    for i, p in enumerate(positions.tolist()):
        visible = (p + 1) // m
        pick = torch.randperm(visible, generator=g)[:10] if visible else torch.empty(0, dtype=torch.long)
        entry_ids[i, : pick.numel()] = pick
    sinks = torch.randn(heads, generator=g)
    args = (q, ring, state_slots, positions, window, compressed, block_tables, entry_ids, m, sinks, dim ** -0.5)
    ref = decode_attention(*args)
    out = dt.decode_attention(*(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args))
    assert torch.allclose(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_no_compressed_entries():
    """Sliding-window layers pass no entries: window + sink only."""
    g = torch.Generator().manual_seed(1)
    q, ring = torch.randn(2, 4, 16, generator=g), torch.randn(2, 8, 16, generator=g)
    args = (q, ring, torch.tensor([1, 0]), torch.tensor([5, 30]), 8, torch.zeros(1, 1, 16),
            torch.zeros(2, 1, dtype=torch.int32), torch.zeros(2, 0, dtype=torch.long), 4, torch.randn(4, generator=g),
            0.25)
    ref = decode_attention(*args)
    out = dt.decode_attention(*(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args))
    assert torch.allclose(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_reference_is_sink_attention_per_request():
    """The batched reference equals `sink_attention` run on each request's gathered keys."""
    from dlengine.kernels.v4.reference import sink_attention

    g = torch.Generator().manual_seed(2)
    b, heads, dim, window, per_block = 4, 4, 16, 8, 4
    q, ring = torch.randn(b, heads, dim, generator=g), torch.randn(6, window, dim, generator=g)
    compressed = torch.randn(20, per_block, dim, generator=g)
    tables = torch.randperm(20, generator=g)[:12].view(b, 3).int()
    positions, slots = torch.tensor([0, 5, 8, 40]), torch.tensor([3, 0, 5, 1])
    ids = torch.tensor([[-1, -1, -1], [0, -1, -1], [0, 1, -1], [2, 7, 9]])
    sinks = torch.randn(heads, generator=g)
    out = decode_attention(q, ring, slots, positions, window, compressed, tables, ids, 4, sinks, dim ** -0.5)
    for i in range(b):
        p = int(positions[i])
        key_pos = torch.arange(max(0, p - window + 1), p + 1)
        chosen = ids[i][ids[i] >= 0]
        entries = compressed[tables[i, chosen // per_block].long(), chosen % per_block]
        want = sink_attention(q[i:i + 1], ring[int(slots[i]), key_pos % window], key_pos, positions[i:i + 1], window,
                              entries, torch.ones(1, chosen.numel(), dtype=torch.bool), sinks, dim ** -0.5)
        assert torch.allclose(out[i], want[0], atol=1e-6, rtol=1e-6)


def test_padded_rows_read_nothing():
    """A padded row of a CUDA-graph batch (state slot -1) gets zeros from both forms, whatever its
    position, entry ids or stale block table name; the other rows are unaffected."""
    g = torch.Generator().manual_seed(3)
    heads, dim, window = 4, 16, 8
    q, ring = torch.randn(3, heads, dim, generator=g), torch.randn(2, window, dim, generator=g)
    compressed = torch.randn(6, 4, dim, generator=g)
    tables = torch.tensor([[1, 2], [1, 2], [1, 2]], dtype=torch.int32)
    args = (q, ring, torch.tensor([1, -1, -1]), torch.tensor([9, 0, 9]), window, compressed, tables,
            torch.tensor([[0, 1], [-1, -1], [0, 1]]), 4, torch.randn(heads, generator=g), dim ** -0.5)
    ref = decode_attention(*args)
    assert ref[1:].eq(0).all()
    alone = decode_attention(q[:1], ring, args[2][:1], args[3][:1], window, compressed, tables[:1], args[7][:1], 4,
                             args[9], args[10])
    assert torch.equal(ref[:1], alone)
    out = dt.decode_attention(*(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args))
    assert torch.allclose(out.cpu(), ref, atol=1e-5, rtol=1e-5)


def test_long_prompt_references_score_in_query_blocks(monkeypatch):
    """The prefill references make a long prompt's scores a block of queries at a time (one 8k
    prompt at V4-Flash's 64 heads needed 10 GiB at once); blocks give the one-shot result."""
    from dlengine.kernels.v4 import reference as ref

    g = torch.Generator().manual_seed(3)
    n, h, d, c, window = 37, 4, 16, 9, 8
    q = torch.randn(n, h, d, generator=g)
    keys, compressed = torch.randn(n, d, generator=g), torch.randn(c, d, generator=g)
    pos = torch.arange(n)
    visible = torch.rand(n, c, generator=g) < 0.5
    sinks = torch.randn(h, generator=g)
    iq, ik, iw = torch.randn(n, 3, d, generator=g), torch.randn(c, d, generator=g), torch.randn(n, 3, generator=g)
    whole = ref.sink_attention(q, keys, pos, pos, window, compressed, visible, sinks, d ** -0.5)
    picked = ref.indexer_select(iq, ik, iw, pos, 4, 3, d ** -0.5)
    monkeypatch.setattr(ref, "SCORE_ELEMENTS", h * (n + c) * 5)  # blocks of 5 queries (the last one 2)
    torch.testing.assert_close(ref.sink_attention(q, keys, pos, pos, window, compressed, visible, sinks, d ** -0.5),
                               whole, rtol=1e-6, atol=1e-6)
    assert torch.equal(ref.indexer_select(iq, ik, iw, pos, 4, 3, d ** -0.5), picked)


# ------------------------------------------------------------------------------- prefill


from dlengine.kernels.v4 import prefill_triton as pt  # noqa: E402
from dlengine.kernels.v4.reference import prefill_attention, sink_attention  # noqa: E402

if DEVICE == "cpu" and not pt._INTERPRET:
    pt = importlib.reload(pt)

# (first position, new tokens) per request at window 8: a prompt shorter than the window, one
# longer, chunks starting mid-sequence (inside the first window, past it, longer than the window
# after it), a one-token extend
PREFILL_REQUESTS = [(0, 5), (0, 21), (3, 4), (13, 6), (10, 19), (30, 1)]


def prefill_batch(heads: int, dim: int, mode: str, g: torch.Generator, requests=PREFILL_REQUESTS, window: int = 8,
                  m: int = 4, topk: int = 3, dtype=torch.float32):
    """A prompt step's inputs, with each request's whole history: `history[b]` = (keys of
    positions 0 .. s + n - 1, its compressed entries). The ring holds the last `window` keys
    before the chunk (and stale rows elsewhere); the paged cache holds the entries at shuffled
    blocks. mode: "hca" (no ids), "csa" (random top-k ids, -1 padded, several queries with none),
    "sliding" (no entries)."""
    per_block, num_blocks, blocks_per_row, num_slots = 4, 64, 6, 8
    t = sum(n for _, n in requests)
    q = torch.randn(t, heads, dim, generator=g)
    ring = torch.randn(num_slots, window, dim, generator=g)
    compressed = torch.randn(num_blocks, per_block, dim, generator=g)
    tables = torch.randperm(num_blocks, generator=g)[: len(requests) * blocks_per_row].view(len(requests), -1).int()
    slots = torch.randperm(num_slots, generator=g)[: len(requests)]
    kv, positions, history, starts = [], [], [], [0]
    for b, (s, n) in enumerate(requests):
        keys = torch.randn(s + n, dim, generator=g)
        old = torch.arange(max(0, s - window), s)
        ring[slots[b], old % window] = keys[old]
        count = (s + n) // m
        w = torch.arange(count)
        history.append((keys, compressed[tables[b, w // per_block].long(), w % per_block]))
        kv.append(keys[s:])
        positions.append(torch.arange(s, s + n))
        starts.append(starts[-1] + n)
    positions = torch.cat(positions)
    ids = None
    if mode == "sliding":
        ids = torch.zeros((t, 0), dtype=torch.long)
    elif mode == "csa":
        ids = torch.full((t, topk), -1, dtype=torch.long)
        for i, p in enumerate(positions.tolist()):
            pick = torch.randperm((p + 1) // m, generator=g)[:topk].sort().values
            ids[i, : pick.numel()] = pick
    sinks = torch.randn(heads, generator=g)
    args = (q.to(dtype), torch.cat(kv).to(dtype), ring.to(dtype), positions, torch.tensor(starts, dtype=torch.int32),
            slots, window, compressed.to(dtype), tables, ids, m if mode != "sliding" else 1, sinks, dim ** -0.5)
    return args, history


def on_device(args):
    return tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("mode", ["hca", "csa", "sliding"])
def test_prefill_reference_is_sink_attention_on_each_history(mode):
    """The batched reference (window from the ring before the chunk, new keys after) equals
    `sink_attention` over each request's whole key history."""
    g = torch.Generator().manual_seed(10)
    args, history = prefill_batch(4, 16, mode, g)
    q, positions, starts, ids, m, sinks = args[0], args[3], args[4].tolist(), args[9], args[10], args[11]
    out = prefill_attention(*args)
    for b, (keys, entries) in enumerate(history):
        a, e = starts[b], starts[b + 1]
        pos = positions[a:e]
        if mode == "sliding":
            entries, visible = entries[:0], torch.zeros((e - a, 0), dtype=torch.bool)
        elif mode == "hca":
            visible = torch.arange(entries.shape[0])[None, :] < ((pos + 1) // m)[:, None]
        else:
            visible = torch.zeros((e - a, entries.shape[0] + 1), dtype=torch.bool)
            visible.scatter_(1, torch.where(ids[a:e] >= 0, ids[a:e], entries.shape[0]), True)
            visible = visible[:, :-1]
        want = sink_attention(q[a:e], keys, torch.arange(keys.shape[0]), pos, args[6], entries, visible, sinks,
                              args[12])
        torch.testing.assert_close(out[a:e], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["hca", "csa", "sliding"])
@pytest.mark.parametrize("heads,dim,block_h", [(4, 32, None), (20, 24, 16)])
def test_prefill_kernel_matches_reference(mode, heads, dim, block_h):
    """float32: prompts shorter and longer than the window, chunks from mid-sequence, HCA's
    every-finished-entry rule, CSA ids with -1 padding (queries before the first finished entry
    read none); head_dim 24 (not a power of two) over two head blocks of 16 (the second partial)."""
    g = torch.Generator().manual_seed(11)
    args, _ = prefill_batch(heads, dim, mode, g)
    config = pt.LaunchConfig(block_h, 16, 4, 1) if block_h else None
    ref = prefill_attention(*args)
    out = pt.prefill_attention(*on_device(args), config=config)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_prefill_kernel_bf16():
    g = torch.Generator().manual_seed(12)
    args, _ = prefill_batch(8, 32, "csa", g, dtype=torch.bfloat16)
    ref = prefill_attention(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                              for a in args))
    out = pt.prefill_attention(*on_device(args))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.cpu().float(), ref, rtol=2e-2, atol=2e-2)


def test_prefill_kernel_csa_top_k_wider_than_visible():
    """A one-request step of a 9-token prompt (2 finished entries at most) with 5-wide ids: the
    kernel reads no id slot past the finished count, so garbage there (not -1) is never read."""
    g = torch.Generator().manual_seed(13)
    args, _ = prefill_batch(4, 16, "csa", g, requests=[(0, 9)], topk=5)
    ref = prefill_attention(*args)
    ids = args[9].clone()
    for i, p in enumerate(args[3].tolist()):
        ids[i, (p + 1) // 4:] = 10 ** 6  # past the visible count: out of any table
    out = pt.prefill_attention(*on_device(args[:9] + (ids,) + args[10:]))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
