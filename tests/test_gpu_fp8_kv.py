"""GPU checks of the FP8 KV cache (need a CUDA device, e.g. an H100; skipped on CPU).

The compiled Triton kernels at real sizes against the torch reference on the same dequantised
values: GQA at Qwen3-8B's attention dims (32 q heads, 8 kv heads, head 128), MLA at DeepSeek-V3's
latent dims (kv_lora_rank 512 + rope 64), bf16 queries, contexts of a few thousand tokens with
split-KV, the fused norm + rope + KV write. Then tiny engines with an FP8 cache on CUDA, CUDA
graphs on and off: the same tokens either way, logits near the float32-cache reference.
tests/test_fp8_kv.py runs the same kernels at tiny sizes (on CPU under the interpreter).
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


def batch(reqs, block_size, heads, width, seed=0):
    """reqs [(query_len, seq_len)] -> random paged caches (FP8 at scale 0.02) and metadata."""
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-sl // block_size) for _, sl in reqs]
    num_blocks = sum(nblk) + 1
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(reqs), max(nblk), dtype=torch.int32)
    slots, qsl, used = [], [0], 0
    for i, (ql, sl) in enumerate(reqs):
        blocks = perm[used:used + nblk[i]]
        used += nblk[i]
        tables[i, :nblk[i]] = blocks.to(torch.int32)
        pos = torch.arange(sl - ql, sl)
        slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        qsl.append(qsl[-1] + ql)
    caches = [kv_quant.quantize_fp8(torch.randn(num_blocks, block_size, heads, width, generator=g) * 0.3, 0.02).to(DEV)
              for _ in range(2)]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEV),
        seq_lens=torch.tensor([sl for _, sl in reqs], dtype=torch.int32, device=DEV),
        block_tables=tables.to(DEV), slot_mapping=torch.cat(slots).long().to(DEV),
        max_query_len=max(ql for ql, _ in reqs), max_seq_len=max(sl for _, sl in reqs),
        query_lens_cpu=[ql for ql, _ in reqs], seq_lens_cpu=[sl for _, sl in reqs])
    return caches, meta, qsl[-1]


@pytest.mark.parametrize("reqs", [[(1, 3000), (1, 17), (1, 1200), (1, 4096)],        # decode, split-KV
                                  [(200, 200), (64, 2100), (1, 900), (333, 1000)]])  # prefill, extend, mixed
def test_gqa_kernels_on_fp8_cache_at_qwen3_8b_dims(reqs):
    from dlengine.kernels.attention import paged_attention_triton as ta
    from dlengine.kernels.attention.paged_attention_torch import paged_attention_ref, write_kv_cache

    H, Hkv, D = 32, 8, 128
    (kc, vc), meta, t = batch(reqs, 16, Hkv, D)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(t, H, D, generator=g).to(BF16).to(DEV)
    k = (torch.randn(t, Hkv, D, generator=g) * 0.3).to(BF16).to(DEV)
    v = (torch.randn(t, Hkv, D, generator=g) * 0.3).to(BF16).to(DEV)
    ks, vs = (torch.tensor(s, device=DEV) for s in (0.02, 0.015))
    kr, vr = kc.clone(), vc.clone()
    write_kv_cache(k, v, kr, vr, meta.slot_mapping, ks, vs)
    ta.store_kvcache(k, v, kc, vc, meta.slot_mapping, ks, vs)
    for got, ref, s in ((kc, kr, 0.02), (vc, vr, 0.015)):  # equal up to a GPU division's last bit at ties
        diff = (kv_quant.dequantize_fp8(got, s) - kv_quant.dequantize_fp8(ref, s)).abs()
        assert (diff > 0).float().mean() < 1e-3
    ref = paged_attention_ref(q.float(), kc, vc, meta, D**-0.5, ks, vs)
    out = ta.paged_attention(q, kc, vc, meta, D**-0.5, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("reqs", [[(1, 4000), (1, 33), (1, 2048)], [(40, 600), (1, 700), (300, 300)]])
def test_mla_kernels_on_fp8_cache_at_deepseek_dims(reqs):
    from dlengine.kernels.mla import mla_triton as tm
    from dlengine.kernels.mla.mla_torch import MLAWeights, mla_attention_ref

    H, C, R, NOPE, V = 16, 512, 64, 128, 128
    (cache, _), meta, t = batch(reqs, 64, 1, C + R)
    g = torch.Generator().manual_seed(2)
    q_nope = torch.randn(t, H, NOPE, generator=g).to(BF16).to(DEV)
    q_pe = torch.randn(t, H, R, generator=g).to(BF16).to(DEV)
    kv_b = (torch.randn(H * (NOPE + V), C, generator=g) * C**-0.5).to(BF16).to(DEV)
    w = MLAWeights.from_kv_b(kv_b, H, NOPE, V)
    scale, ls = (NOPE + R) ** -0.5, torch.tensor(0.02, device=DEV)
    out = tm.mla_attention(q_nope, q_pe, cache, meta, w, scale, kv_scale=ls)
    ref = mla_attention_ref(torch.cat([q_nope, q_pe], -1).float(), cache, meta, kv_b.float(), C, NOPE, V, scale, ls)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("model", ["tiny-qwen3", "tiny-deepseek-v3"])
def test_fp8_engine_cuda_graphs_and_reference(model):
    prompts = make_prompts(6)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def build(cache_dtype, graphs):
        return (EngineBuilder(model).device("cuda").dtype("bfloat16").cache(dtype=cache_dtype)
                .cuda_graphs(graphs).build())

    eager, graphs = build("fp8_e4m3", False), build("fp8_e4m3", True)
    assert eager.describe()["kv_cache_dtype"] == "float8_e4m3fn"
    assert ([o.token_ids for o in eager.generate(prompts, params)]
            == [o.token_ids for o in graphs.generate(prompts, params)])
    graphs.close()
    ref = EngineBuilder(model).device("cpu").dtype("float32").build()
    for prompt in prompts[2:5]:
        got, want = eager.prompt_logits(prompt).float().cpu(), ref.prompt_logits(prompt)
        err = ((got - want).abs().max(-1).values / want.abs().max()).mean().item()
        assert err < 0.2, err  # FP8 KV + bf16 compute vs float32 throughout (CPU test: < 0.15 at fp32 compute)
    eager.close()
