"""The optional FlashInfer attention backend.

CPU: a missing flashinfer and a non-CUDA device are ConfigErrors, "auto" never picks it, and the
translation of AttentionMetadata into FlashInfer's plan() arguments (page indptr/indices/last page
lengths, qo_indptr, wrapper choice, one plan per step) is checked against the torch reference with a
stand-in `flashinfer` module whose wrappers attend exactly as FlashInfer documents (NHD pages,
causal mask aligned to the end of each context).
GPU (marked gpu, skipped without CUDA or flashinfer): the real kernels against the torch reference
on NaN-poisoned caches, and an engine on qwen3-0.6b (dummy weights, head_dim 128) against Triton.
"""

import importlib
import itertools
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from dlengine import ConfigError, EngineBuilder, SamplingParams
from dlengine.kernels.attention import paged_attention_torch as ref
from dlengine.kernels.context import AttentionMetadata
from dlengine.kernels.selection import resolve_attention_backend

MODULE = "dlengine.kernels.attention.flashinfer_backend"


def _flashinfer_importable() -> bool:
    try:
        import flashinfer  # noqa: F401

        return True
    except Exception:  # noqa: BLE001
        return False


HAS_FLASHINFER = _flashinfer_importable()
needs_flashinfer_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_FLASHINFER),
                                          reason="needs CUDA and flashinfer-python")


# ------------------------------------------------------------------------------------------ batches


def make_batch(reqs, H, Hkv, D, page=16, dtype=torch.bfloat16, device="cpu", seed=0):
    """A paged batch, reqs = [(query_len, seq_len)], with scattered pages and a spare padded column
    in the block tables. Caches hold random values at live slots (positions < seq_len of some
    request); `dead` marks every other slot."""
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-sl // page) for _, sl in reqs]
    num_blocks = sum(nblk) + 4
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(reqs), max(nblk) + 1, dtype=torch.int32)
    live = torch.zeros(num_blocks * page, dtype=torch.bool)
    slots = []
    off = 0
    for i, ((ql, sl), n) in enumerate(zip(reqs, nblk)):
        tables[i, :n] = perm[off:off + n]
        off += n
        pos = torch.arange(sl)
        s = tables[i, pos // page].long() * page + pos % page
        live[s] = True
        slots.append(s[sl - ql:])
    qls, sls = [ql for ql, _ in reqs], [sl for _, sl in reqs]
    T = sum(qls)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, *itertools.accumulate(qls)], dtype=torch.int32, device=device),
        seq_lens=torch.tensor(sls, dtype=torch.int32, device=device), block_tables=tables.to(device),
        slot_mapping=torch.cat(slots).to(device), max_query_len=max(qls), max_seq_len=max(sls),
        query_lens_cpu=qls, seq_lens_cpu=sls)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    return SimpleNamespace(meta=meta, q=rnd(T, H, D), k=rnd(T, Hkv, D), v=rnd(T, Hkv, D),
                           k_cache=rnd(num_blocks, page, Hkv, D), v_cache=rnd(num_blocks, page, Hkv, D),
                           dead=(~live).to(device), scale=D ** -0.5)


def check_against_reference(backend, b, atol=2e-2):
    """write_kv + attend (twice, as two layers sharing one step's metadata) on caches whose dead
    slots are NaN, against the reference on the same caches with zeros there."""
    caches = []
    for poison in (float("nan"), 0.0):
        kc, vc = b.k_cache.clone(), b.v_cache.clone()
        for c in (kc, vc):
            c.view(-1, *c.shape[2:])[b.dead] = poison
        caches.append((kc, vc))
    (kc, vc), (rk, rv) = caches
    backend.write_kv(b.k, b.v, kc, vc, b.meta)
    ref.write_kv_cache(b.k, b.v, rk, rv, b.meta.slot_mapping)
    live = ~b.dead
    assert torch.equal(kc.view(-1, *kc.shape[2:])[live], rk.view(-1, *rk.shape[2:])[live])
    plans = backend.num_plans
    # second "layer": same metadata, other caches (K and V swapped)
    for (k1, v1), (k2, v2) in (((kc, vc), (rk, rv)), ((vc, kc), (rv, rk))):
        out = backend.attend(b.q, k1, v1, b.meta, b.scale)
        expected = ref.paged_attention_ref(b.q, k2, v2, b.meta, b.scale)
        assert out.shape == b.q.shape and out.dtype == b.q.dtype
        assert not out.isnan().any()
        err = (out.float() - expected.float()).abs().max().item()
        assert torch.allclose(out.float(), expected.float(), atol=atol, rtol=2e-2), f"max |err| {err:.3e}"
    assert backend.num_plans == plans + 1  # planned once for both layers


DECODE = [(1, L) for L in (1, 16, 17, 100, 33, 64, 5, 250)]
PREFILL = [(40, 40), (17, 17), (1, 1), (64, 64)]
MIXED = [(1, 77), (30, 90), (1, 1), (16, 16), (50, 150), (1, 200)]


# ------------------------------------------------------------------------------------------ CPU


@pytest.mark.skipif(HAS_FLASHINFER, reason="flashinfer is installed here")
def test_missing_flashinfer_is_a_config_error():
    with pytest.raises(ConfigError, match="flashinfer-python"):
        EngineBuilder("tiny-qwen3").attention("flashinfer").build()


def test_flashinfer_needs_cuda_and_auto_never_picks_it():
    with pytest.raises(ConfigError, match="flashinfer"):
        resolve_attention_backend("flashinfer", torch.device("cpu"))
    for dev in ("cpu", "cuda"):
        assert resolve_attention_backend("auto", torch.device(dev)).name != "flashinfer"


class _FakeWrapper:
    """Stand-in for FlashInfer's paged wrappers: records plan(), attends per request in run()."""

    PLAN_KWARGS = frozenset({"causal", "pos_encoding_mode", "q_data_type", "kv_data_type", "sm_scale"})

    def __init__(self, workspace, kv_layout, use_tensor_cores=False):
        assert kv_layout == "NHD" and workspace.dtype == torch.uint8
        self.plans = 0

    def _plan(self, qo_indptr, indptr, indices, last_page_len, H, Hkv, D, page, causal=False, **kw):
        assert set(kw) | {"causal"} <= self.PLAN_KWARGS and kw["pos_encoding_mode"] == "NONE"
        for t in (qo_indptr, indptr, last_page_len):  # host arrays: plan() needs no device sync
            assert t.device.type == "cpu" and t.dtype == torch.int32
        assert indices.dtype == torch.int32 and indices.numel() == int(indptr[-1])
        assert kw["q_data_type"] == kw["kv_data_type"]
        self.qo, self.indptr, self.indices, self.last = qo_indptr.tolist(), indptr.tolist(), indices, last_page_len
        self.heads, self.page, self.causal, self.scale = (H, Hkv, D), page, causal, kw["sm_scale"]
        self.plans += 1

    def run(self, q, paged_kv_cache):
        k_cache, v_cache = paged_kv_cache
        assert q.is_contiguous() and q.shape[1:] == (self.heads[0], self.heads[2]) and q.shape[0] == self.qo[-1]
        assert k_cache.shape[1:] == (self.page, self.heads[1], self.heads[2])
        out = torch.empty_like(q)
        for i in range(len(self.qo) - 1):
            pages = self.indices[self.indptr[i]:self.indptr[i + 1]].long()
            kv_len = (len(pages) - 1) * self.page + int(self.last[i])
            k, v = (c[pages].flatten(0, 1)[:kv_len] for c in (k_cache, v_cache))
            s, e = self.qo[i], self.qo[i + 1]
            out[s:e] = ref.attend_dense(q[s:e], k, v, self.scale, kv_len - (e - s) if self.causal else None)
        return out


class _FakeDecode(_FakeWrapper):
    def plan(self, indptr, indices, last_page_len, H, Hkv, D, page, **kw):
        qo = torch.arange(len(last_page_len) + 1, dtype=torch.int32)
        self._plan(qo, indptr, indices, last_page_len, H, Hkv, D, page, **kw)


class _FakePrefill(_FakeWrapper):
    def plan(self, qo_indptr, indptr, indices, last_page_len, H, Hkv, D, page, **kw):
        assert kw.get("causal") is True
        self._plan(qo_indptr, indptr, indices, last_page_len, H, Hkv, D, page, **kw)


@pytest.fixture
def fake_flashinfer_module():
    """dlengine.kernels.attention.flashinfer_backend imported over the stand-in `flashinfer`; both removed
    (and any real ones put back) afterwards."""
    saved = {k: sys.modules.pop(k) for k in ("flashinfer", MODULE) if k in sys.modules}
    fake = types.ModuleType("flashinfer")
    fake.BatchDecodeWithPagedKVCacheWrapper = _FakeDecode
    fake.BatchPrefillWithPagedKVCacheWrapper = _FakePrefill
    sys.modules["flashinfer"] = fake
    try:
        yield importlib.import_module(MODULE)
    finally:
        sys.modules.pop(MODULE, None)
        sys.modules.pop("flashinfer", None)
        sys.modules.update(saved)


@pytest.mark.parametrize("reqs", [DECODE, PREFILL, MIXED], ids=["decode", "prefill", "mixed"])
@pytest.mark.parametrize("page", [16, 4])
def test_plan_arguments_match_reference_cpu(fake_flashinfer_module, reqs, page):
    backend = fake_flashinfer_module.FlashInferAttentionBackend(workspace_bytes=1 << 10)
    b = make_batch(reqs, 4, 2, 16, page=page)
    check_against_reference(backend, b, atol=1e-2)
    expected = backend._decode if all(ql == 1 for ql, _ in reqs) else backend._prefill
    assert backend._wrapper is expected and expected.plans == 1
    # a new step (new metadata object) plans again, once
    b2 = make_batch(reqs, 4, 2, 16, page=page, seed=1)
    check_against_reference(backend, b2, atol=1e-2)
    assert backend.num_plans == 2


def test_float32_cache_is_rejected_cpu(fake_flashinfer_module):
    backend = fake_flashinfer_module.FlashInferAttentionBackend(workspace_bytes=1 << 10)
    b = make_batch(DECODE, 4, 2, 16, dtype=torch.float32)
    with pytest.raises(ConfigError, match="bfloat16"):
        backend.attend(b.q, b.k_cache, b.v_cache, b.meta, b.scale)


# ------------------------------------------------------------------------------------------ GPU


def _gpu_backend():
    return resolve_attention_backend("flashinfer", torch.device("cuda"))


GPU_LENS = torch.randint(1, 2049, (32,), generator=torch.Generator().manual_seed(0)).tolist()
GPU_CASES = {
    "decode": [(1, L) for L in [1, 16, 17, 1024, 1025, 2048] + GPU_LENS],
    "prefill": [(1024, 1024), (300, 300), (17, 17), (1, 1), (129, 129)],
    "mixed": [(1, L) for L in GPU_LENS[:16]] + [(512, 1536), (700, 2748), (256, 256), (33, 1057), (2, 2050)],
}


@pytest.mark.gpu
@needs_flashinfer_gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("H, Hkv, D", [(32, 8, 128), (16, 4, 64)])
def test_kernels_match_reference_gpu(case, H, Hkv, D):
    backend = _gpu_backend()
    check_against_reference(backend, make_batch(GPU_CASES[case], H, Hkv, D, device="cuda", seed=H + D))
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_flashinfer_gpu
def test_kernels_fp16_and_step_sequence_gpu():
    backend = _gpu_backend()  # one backend through decode -> mixed -> decode steps (wrapper switches)
    for i, case in enumerate(["decode", "mixed", "decode", "prefill"]):
        check_against_reference(backend, make_batch(GPU_CASES[case], 32, 8, 128, dtype=torch.float16,
                                                    device="cuda", seed=i))
    assert backend.num_plans == 4


@pytest.mark.gpu
@needs_flashinfer_gpu
def test_flashinfer_refuses_cuda_graphs_gpu():
    with pytest.raises(ConfigError, match="captured"):
        EngineBuilder("tiny-qwen3").attention("flashinfer").cuda_graphs(True).build()


@pytest.mark.gpu
@needs_flashinfer_gpu
def test_engine_matches_triton_gpu():
    """qwen3-0.6b shapes (16/8 heads, d=128) with dummy weights: teacher-forced logits (whole
    prompts and 64-token chunks over a cached prefix) agree with the Triton backend; generation
    with chunked prefill beside decodes runs to completion."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 150000, (L,), generator=g).tolist() for L in (1, 17, 100, 300)]
    logits = {}
    for attention in ("flashinfer", "triton"):
        engine = (EngineBuilder("qwen3-0.6b").load_format("dummy").dtype("bfloat16").max_model_len(512)
                  .attention(attention).cuda_graphs(False).cache(num_blocks=256, prefix_caching=False)
                  .scheduler(max_num_batched_tokens=128, max_num_seqs=8).build())
        assert engine.runner.backend.name == attention
        logits[attention] = [engine.prompt_logits(p) for p in prompts] + \
                            [engine.prompt_logits(p, chunk_size=64) for p in prompts[2:]]
        if attention == "flashinfer":
            outs = engine.generate(prompts * 2, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
            assert all(len(o.token_ids) == 24 for o in outs)
            assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        del engine
        torch.cuda.empty_cache()
    for a, b in zip(logits["flashinfer"], logits["triton"]):
        assert a.shape == b.shape and not a.isnan().any()
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 2e-2, f"relative logit difference {rel:.3e}"
