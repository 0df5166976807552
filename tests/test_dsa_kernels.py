"""DeepSeek Sparse Attention kernels (kernels/dsa/): the indexer's top-k against its definition,
sparse MLA's references against each other and dense MLA, and the Triton kernels (indexer logits,
absorbed sparse MLA) against the torch references at tiny sizes.

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1)."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decorations

pytest.importorskip("triton")

from dlengine.kernels.context import AttentionMetadata  # noqa: E402
from dlengine.kernels.dsa import TritonDSAKernels, TorchDSAKernels  # noqa: E402
from dlengine.kernels.dsa import indexer_torch as it  # noqa: E402
from dlengine.kernels.dsa import sparse_mla_torch as st  # noqa: E402
from dlengine.kernels.mla import mla_triton as tm  # noqa: E402
from dlengine.kernels.mla.mla_torch import MLAWeights, absorb_query, latent_to_v, mla_attention_ref  # noqa: E402

if DEVICE == "cpu" and not tm.interpret_mode():
    tm = importlib.reload(tm)
from dlengine.kernels.dsa import indexer_triton as itr  # noqa: E402
from dlengine.kernels.dsa import sparse_mla_triton as smt  # noqa: E402

if DEVICE == "cpu":
    itr, smt = importlib.reload(itr), importlib.reload(smt)
    if not (tm.interpret_mode() and itr.interpret_mode()):
        pytest.skip("cannot switch triton to interpreter mode", allow_module_level=True)

# tiny dims: MLA 4 heads, latent 32 + rope 8, nope 16, v 16; indexer 4 heads of 16
H, C, R, NOPE, V = 4, 32, 8, 16, 16
IH, ID = 4, 16
SCALE = (NOPE + R) ** -0.5
ISCALE = ID ** -0.5


def make_batch(reqs, block_size, seed=0, dtype=torch.float32):
    """reqs: [(query_len, seq_len)] -> everything a DSA layer's kernels see: MLA queries, latent
    cache, indexer queries / weights / key cache, positions, metadata, kv_b weights. Block ids are
    shuffled and the block tables carry a padding column."""
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-sl // block_size) for _, sl in reqs]
    num_blocks = sum(nblk) + 2
    perm = torch.randperm(num_blocks, generator=g)
    latent = torch.randn(num_blocks, block_size, 1, C + R, generator=g).to(dtype)
    keys = torch.randn(num_blocks, block_size, 1, ID, generator=g).to(dtype)
    tables = torch.zeros(len(reqs), max(nblk) + 1, dtype=torch.int32)
    slots, qsl, positions, used = [], [0], [], 0
    for i, (ql, sl) in enumerate(reqs):
        blocks = perm[used:used + nblk[i]]
        used += nblk[i]
        tables[i, :nblk[i]] = blocks.to(torch.int32)
        pos = torch.arange(sl - ql, sl)
        positions.append(pos)
        slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        qsl.append(qsl[-1] + ql)
    t = qsl[-1]
    d = lambda x: x.to(DEVICE)  # noqa: E731
    meta = AttentionMetadata(
        query_start_loc=d(torch.tensor(qsl, dtype=torch.int32)),
        seq_lens=d(torch.tensor([sl for _, sl in reqs], dtype=torch.int32)),
        block_tables=d(tables), slot_mapping=d(torch.cat(slots).long()),
        max_query_len=max(ql for ql, _ in reqs), max_seq_len=max(sl for _, sl in reqs),
        query_lens_cpu=[ql for ql, _ in reqs], seq_lens_cpu=[sl for _, sl in reqs],
    )
    batch = dict(
        q_nope=torch.randn(t, H, NOPE, generator=g).to(dtype), q_pe=torch.randn(t, H, R, generator=g).to(dtype),
        latent=latent, iq=torch.randn(t, IH, ID, generator=g).to(dtype), iw=torch.randn(t, IH, generator=g),
        keys=keys, positions=torch.cat(positions),
        kv_b=(torch.randn(H * (NOPE + V), C, generator=g) * C ** -0.5).to(dtype),
    )
    batch = {k: d(v) for k, v in batch.items()}
    batch["weights"] = MLAWeights.from_kv_b(batch["kv_b"], H, NOPE, V)
    return batch, meta


REQS = [[(1, 1)], [(1, 40)], [(1, 9), (1, 33), (1, 70)], [(20, 20)], [(5, 37), (1, 50), (30, 30)]]


def _definition_topk(b, meta, topk):
    """Selection straight from the definition, one query at a time."""
    rows, start = [], 0
    for i, ql in enumerate(meta.query_lens_cpu):
        sl = meta.seq_lens_cpu[i]
        keys = b["keys"][meta.block_tables[i].long()].flatten(0, 1)[:sl, 0].float()
        for j in range(ql):
            p = sl - ql + j
            s = (b["iw"][start + j].float()[:, None]
                 * torch.relu(b["iq"][start + j].float() @ keys[:p + 1].T * ISCALE)).sum(0)
            rows.append(set(range(p + 1)) if p + 1 <= topk else set(s.topk(topk).indices.tolist()))
        start += ql
    return rows


@pytest.mark.parametrize("reqs", REQS)
@pytest.mark.parametrize("topk", [4, 16])
def test_indexer_reference_selects_the_definitions_top_k(reqs, topk):
    b, meta = make_batch(reqs, block_size=8)
    got = it.indexer_topk_ref(b["iq"], b["iw"], b["keys"], meta, topk, ISCALE)
    assert got.shape == (len(b["positions"]), min(topk, meta.max_seq_len))
    for row, want in zip(got.tolist(), _definition_topk(b, meta, topk)):
        sel = [x for x in row if x >= 0]
        assert len(sel) == len(set(sel)) and set(sel) == want


@pytest.mark.parametrize("reqs", REQS)
@pytest.mark.parametrize("topk", [4, 16])
def test_triton_indexer_matches_reference(reqs, topk):
    b, meta = make_batch(reqs, block_size=8)
    ref = it.indexer_topk_ref(b["iq"], b["iw"], b["keys"], meta, topk, ISCALE)
    got = itr.indexer_topk(b["iq"], b["iw"], b["keys"], meta.block_tables, meta.query_start_loc, b["positions"],
                           topk, ISCALE, max_context=meta.max_seq_len)
    assert got.shape == ref.shape
    for g_row, r_row in zip(got.tolist(), ref.tolist()):
        assert set(g_row) == set(r_row)
    # the logits themselves, -inf past each token's position
    token_req = it.token_requests(meta.query_start_loc, len(b["positions"]))
    logits = itr.indexer_logits(b["iq"], b["iw"], b["keys"], meta.block_tables, token_req, b["positions"],
                                meta.max_seq_len, ISCALE)
    start = 0
    for i, ql in enumerate(meta.query_lens_cpu):
        sl = meta.seq_lens_cpu[i]
        keys = b["keys"][meta.block_tables[i].long()].flatten(0, 1)[:sl, 0]
        want = it.indexer_scores_ref(b["iq"][start:start + ql], keys, b["iw"][start:start + ql], ISCALE)
        for j in range(ql):
            p = sl - ql + j
            torch.testing.assert_close(logits[start + j, :p + 1], want[j, :p + 1], rtol=1e-5, atol=1e-5)
            assert torch.isinf(logits[start + j, p + 1:]).all()
        start += ql


def test_selection_wider_than_every_context_keeps_all_tokens_dense():
    """Below the top-k length the selection is every visible token: sparse MLA is dense MLA."""
    b, meta = make_batch([(6, 6), (1, 11), (4, 9)], block_size=4)
    sel = it.indexer_topk_ref(b["iq"], b["iw"], b["keys"], meta, 2048, ISCALE)
    assert sel.shape[1] == 11
    dense = mla_attention_ref(torch.cat([b["q_nope"], b["q_pe"]], -1), b["latent"], meta, b["kv_b"], C, NOPE, V,
                              SCALE)
    sparse = st.sparse_mla_ref(b["q_nope"], b["q_pe"], b["latent"], meta, b["weights"], SCALE, sel)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reqs", REQS)
def test_absorbed_reference_equals_expanded_reference(reqs):
    b, meta = make_batch(reqs, block_size=8)
    sel = it.indexer_topk_ref(b["iq"], b["iw"], b["keys"], meta, 5, ISCALE)
    expanded = st.sparse_mla_ref(b["q_nope"], b["q_pe"], b["latent"], meta, b["weights"], SCALE, sel)
    token_req = it.token_requests(meta.query_start_loc, len(b["positions"]))
    slots = it.topk_to_slots(sel, meta.block_tables, token_req, 8)
    out_lat = st.sparse_mla_absorbed_ref(absorb_query(b["q_nope"], b["weights"]), b["q_pe"], b["latent"], slots,
                                         SCALE)
    torch.testing.assert_close(latent_to_v(out_lat, b["weights"]), expanded, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reqs", REQS)
@pytest.mark.parametrize("topk", [5, 16])
def test_triton_sparse_mla_matches_reference(reqs, topk):
    b, meta = make_batch(reqs, block_size=8)
    sel = it.indexer_topk_ref(b["iq"], b["iw"], b["keys"], meta, topk, ISCALE)
    token_req = it.token_requests(meta.query_start_loc, len(b["positions"]))
    slots = it.topk_to_slots(sel, meta.block_tables, token_req, 8)
    q_lat = absorb_query(b["q_nope"], b["weights"])
    want = st.sparse_mla_absorbed_ref(q_lat, b["q_pe"], b["latent"], slots, SCALE)
    got = smt.sparse_mla_attend(q_lat, b["q_pe"], b["latent"], slots, SCALE)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_h", [None, 16])
def test_triton_kernels_bf16(block_h):
    """bfloat16 caches and queries (the GPU's tiles and dots; upcast under the interpreter)."""
    b, meta = make_batch([(1, 50), (7, 40)], block_size=16, dtype=torch.bfloat16)
    sel = it.indexer_topk_ref(b["iq"], b["iw"], b["keys"], meta, 8, ISCALE)
    got_sel = itr.indexer_topk(b["iq"], b["iw"], b["keys"], meta.block_tables, meta.query_start_loc,
                               b["positions"], 8, ISCALE, max_context=meta.max_seq_len)
    agree = sum(len(set(g) & set(r)) for g, r in zip(got_sel.tolist(), sel.tolist()))
    assert agree >= 0.95 * sel.numel()  # bf16 dots may swap near-tied neighbours at the boundary
    token_req = it.token_requests(meta.query_start_loc, len(b["positions"]))
    slots = it.topk_to_slots(sel, meta.block_tables, token_req, 16)
    q_lat = absorb_query(b["q_nope"], b["weights"])
    want = st.sparse_mla_absorbed_ref(q_lat, b["q_pe"], b["latent"], slots, SCALE)
    got = smt.sparse_mla_attend(q_lat, b["q_pe"], b["latent"], slots, SCALE, block_h=block_h)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    narrow = smt.sparse_mla_attend(q_lat, b["q_pe"], b["latent"], slots, SCALE, block_h=block_h,
                                   out_dtype=torch.bfloat16)
    assert narrow.dtype == torch.bfloat16
    torch.testing.assert_close(narrow.float(), want, rtol=2e-2, atol=2e-2)


def test_triton_sparse_mla_row_without_selection_gives_zeros():
    b, meta = make_batch([(1, 12), (1, 7)], block_size=4)
    slots = torch.full((2, 8), -1, dtype=torch.int32, device=DEVICE)
    slots[0, :3] = torch.tensor([5, 0, 9])
    out = smt.sparse_mla_attend(absorb_query(b["q_nope"], b["weights"]), b["q_pe"], b["latent"], slots, SCALE)
    assert out[1].abs().max() == 0 and out[0].abs().max() > 0


def test_both_kernel_sets_agree_end_to_end():
    """Write keys, select, attend: the Triton set (absorbed) against the torch set (expanded)."""
    b, meta = make_batch([(1, 30), (12, 12), (3, 25)], block_size=8)
    outs = []
    for kernels in (TorchDSAKernels(), TritonDSAKernels()):
        keys = b["keys"].clone()
        new_keys = torch.randn(len(b["positions"]), ID, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        kernels.write_keys(new_keys, keys, meta)
        assert torch.equal(keys.view(-1, ID)[meta.slot_mapping], new_keys)
        sel = kernels.select(b["iq"], b["iw"], keys, meta, b["positions"], 6, ISCALE)
        outs.append((sel, kernels.attend(b["q_nope"], b["q_pe"], b["latent"], meta, b["weights"], SCALE, sel)))
    (sel_t, out_t), (sel_g, out_g) = outs
    assert [set(r) - {-1} for r in sel_t.tolist()] == [set(r) - {-1} for r in sel_g[:, :sel_t.shape[1]].tolist()]
    torch.testing.assert_close(out_g, out_t, rtol=1e-4, atol=1e-5)
