"""GPU checks of the FP8 latent cache of the DeepSeek Sparse Attention models (need a CUDA
device, e.g. an H100; skipped on CPU).

The compiled sparse MLA kernel at DeepSeek-V3.2's dims (128 heads / 16 per tensor-parallel rank of
8, kv_lora_rank 512 + rope 64, index_topk 2048, bf16 queries) over an FP8 latent, against the
torch reference on the dequantised values, for decode rows and prefill / extend rows, selections
with -1 padding. The indexer kernel over bf16 keys with bf16 queries (what the engine stores
under an FP8 cache) and over FP8 keys. Then the tiny DeepSeek-V3.2 / GLM-5 engines on CUDA with
an FP8 cache: CUDA graphs on and off give the same tokens, logits near the float32 reference.
tests/test_fp8_kv_dsa.py runs the same kernels at tiny sizes (on CPU under the interpreter).
"""

import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.kernels import kv_quant
from dlengine.kernels.context import AttentionMetadata

from conftest import make_prompts

pytestmark = pytest.mark.gpu
FP8, BF16 = torch.float8_e4m3fn, torch.bfloat16
DEV = "cuda"
C, R, NOPE, V, ID, IH = 512, 64, 128, 128, 128, 64  # DeepSeek-V3.2's latent and indexer dims
TOPK = 2048


def batch(reqs, block_size=64, heads=16, seed=0):
    """reqs [(query_len, seq_len)] -> an FP8 latent cache (scale 0.02), bf16 indexer keys,
    metadata, positions and queries."""
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-sl // block_size) for _, sl in reqs]
    num_blocks = sum(nblk) + 1
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(reqs), max(nblk), dtype=torch.int32)
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
    latent = kv_quant.quantize_fp8(torch.randn(num_blocks, block_size, 1, C + R, generator=g) * 0.3, 0.02).to(DEV)
    keys = torch.randn(num_blocks, block_size, 1, ID, generator=g).to(BF16).to(DEV)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEV),
        seq_lens=torch.tensor([sl for _, sl in reqs], dtype=torch.int32, device=DEV),
        block_tables=tables.to(DEV), slot_mapping=torch.cat(slots).long().to(DEV),
        max_query_len=max(ql for ql, _ in reqs), max_seq_len=max(sl for _, sl in reqs),
        query_lens_cpu=[ql for ql, _ in reqs], seq_lens_cpu=[sl for _, sl in reqs])
    q = dict(q_nope=torch.randn(t, heads, NOPE, generator=g), q_pe=torch.randn(t, heads, R, generator=g),
             iq=torch.randn(t, IH, ID, generator=g), iw=torch.randn(t, IH, generator=g))
    q = {k: v.to(BF16 if k != "iw" else torch.float32).to(DEV) for k, v in q.items()}
    kv_b = (torch.randn(heads * (NOPE + V), C, generator=g) * C**-0.5).to(BF16).to(DEV)
    return latent, keys, meta, torch.cat(positions).to(DEV), q, kv_b


@pytest.mark.parametrize("reqs", [[(1, 6000), (1, 33), (1, 2048), (1, 4100)],       # decode; short rows padded
                                  [(300, 300), (64, 5000), (1, 900), (500, 2600)]])  # prefill, extend, mixed
def test_sparse_mla_on_fp8_latent_at_deepseek_v32_dims(reqs):
    from dlengine.kernels.dsa import indexer_torch as it
    from dlengine.kernels.dsa import sparse_mla_torch as st
    from dlengine.kernels.dsa import sparse_mla_triton as smt
    from dlengine.kernels.mla.mla_torch import MLAWeights, absorb_query

    latent, keys, meta, positions, q, kv_b = batch(reqs)
    w = MLAWeights.from_kv_b(kv_b, q["q_nope"].shape[1], NOPE, V)
    sel = it.indexer_topk_ref(q["iq"], q["iw"], keys, meta, TOPK, ID**-0.5)
    token_req = it.token_requests(meta.query_start_loc, positions.shape[0])
    slots = it.topk_to_slots(sel, meta.block_tables, token_req, latent.shape[1])
    assert bool((slots < 0).any())  # rows with fewer than 2048 visible tokens are -1 padded
    scale, ls = (NOPE + R) ** -0.5, torch.tensor(0.02, device=DEV)
    q_lat = absorb_query(q["q_nope"], w)
    ref = st.sparse_mla_absorbed_ref(q_lat, q["q_pe"], latent, slots, scale, ls)
    out = smt.sparse_mla_attend(q_lat, q["q_pe"], latent, slots, scale, out_dtype=BF16, kv_scale=ls)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_indexer_on_bf16_and_fp8_keys_at_deepseek_v32_dims():
    from dlengine.kernels.dsa import indexer_torch as it
    from dlengine.kernels.dsa import indexer_triton as itr

    _, keys, meta, positions, q, _ = batch([(1, 6000), (200, 3000), (1, 700)])
    token_req = it.token_requests(meta.query_start_loc, positions.shape[0])
    ks = torch.tensor(0.01, device=DEV)
    keys8 = kv_quant.quantize_fp8(keys, ks)
    for cache, scale, deq in ((keys, None, keys.float()), (keys8, ks, kv_quant.dequantize_fp8(keys8, ks))):
        got = itr.indexer_logits(q["iq"], q["iw"], cache, meta.block_tables, token_req, positions,
                                 meta.max_seq_len, ID**-0.5, key_scale=scale)
        want = itr.indexer_logits(q["iq"].float(), q["iw"], deq, meta.block_tables, token_req, positions,
                                  meta.max_seq_len, ID**-0.5)
        finite = torch.isfinite(want)
        assert torch.equal(finite, torch.isfinite(got))
        torch.testing.assert_close(got[finite], want[finite], atol=5e-2 * want[finite].abs().max().item(), rtol=0)


@pytest.mark.parametrize("model", ["tiny-deepseek-v32", "tiny-glm-moe-dsa"])
def test_fp8_dsa_engine_cuda_graphs_and_reference(model):
    prompts = make_prompts(6)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def build(graphs):
        return (EngineBuilder(model).device("cuda").dtype("bfloat16").cache(dtype="fp8_e4m3")
                .cuda_graphs(graphs).build())

    eager, graphs = build(False), build(True)
    assert eager.describe()["kv_cache_dtype"] == "float8_e4m3fn"
    assert eager.model.model.layers[0].self_attn.dsa_kernels.name == "triton"
    assert ([o.token_ids for o in eager.generate(prompts, params)]
            == [o.token_ids for o in graphs.generate(prompts, params)])
    graphs.close()
    ref = EngineBuilder(model).device("cpu").dtype("float32").build()
    for prompt in prompts[2:5]:
        got, want = eager.prompt_logits(prompt).float().cpu(), ref.prompt_logits(prompt)
        err = ((got - want).abs().max(-1).values / want.abs().max()).mean().item()
        assert err < 0.45, err  # FP8 latent + bf16 compute vs float32 throughout (CPU, fp32 compute: < 0.4)
    eager.close()
