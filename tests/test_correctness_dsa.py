"""dlengine vs transformers on tiny DeepSeek-V3.2 and GLM-5 checkpoints (DeepSeek Sparse
Attention: MLA restricted to the lightning indexer's top-k tokens, index_topk 16, so prompts of
17..300 tokens really select): float32 logits close at every prompt position, greedy tokens equal
through the paged cache, chunked prefill, preemption and prefix-cache hits, the Triton DSA kernels
in the engine, and the indexer-key cache laid out beside the latent."""

import json

import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.cache.specs import IndexerKeySpec, MLALatentSpec
from dlengine.config import ConfigError
from dlengine.models.deepseek_v32 import DSAAttention, LightningIndexer
from dlengine.testing import tiny_checkpoint
from dlengine.testing.dsa import TINY_INDEX_TOPK

from conftest import make_prompts
from hf_reference import SCHEDULING_SETUPS, check_greedy_setup, copy_checkpoint, hf_greedy, hf_logits, relative_error

KINDS = ["deepseek-v32", "glm-moe-dsa"]
MAX_NEW = 24
PROMPTS = make_prompts()  # lengths 1, 2, 5, 16, 17, 31, 64, 100, 200, 300


def _engine(kind, **cache):
    return EngineBuilder(tiny_checkpoint(kind)).dtype("float32").cache(block_size=16, **cache).build()


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_logits_match_transformers(kind):
    path = tiny_checkpoint(kind)
    engine = _engine(kind)
    for prompt in PROMPTS:
        ours = engine.prompt_logits(prompt)
        ref = hf_logits(path, prompt)
        assert ours.shape == ref.shape
        assert relative_error(ours, ref) < 1e-4, f"prompt of {len(prompt)} tokens"


@pytest.mark.parametrize("kind", KINDS)
def test_sparsity_really_selects(kind):
    """With the indexer's top-k lifted above every prompt length attention is dense, and the long
    prompts' logits move far from transformers' sparse ones: the comparison above would catch an
    indexer that selected the wrong tokens, or none."""
    path = tiny_checkpoint(kind)
    dense = EngineBuilder(path).dtype("float32").hf_overrides(index_topk=4096).build()
    prompt = PROMPTS[-1]
    assert len(prompt) > 10 * TINY_INDEX_TOPK
    assert relative_error(dense.prompt_logits(prompt), hf_logits(path, prompt)) > 1e-2
    short = PROMPTS[3]  # 16 tokens: at most index_topk visible, dense in both
    assert relative_error(dense.prompt_logits(short), hf_logits(path, short)) < 1e-4


def test_indexer_cache_sits_beside_the_latent():
    engine = _engine("glm-moe-dsa")
    hf = engine.config.model.hf_config
    specs = engine.kv_cache.specs
    assert [type(s) for s in specs] == [MLALatentSpec, IndexerKeySpec]
    # GLM-5's "shared" layer 2 has no indexer and no key cache
    assert specs[1].layers == (0, 1, 3)
    attn = [layer.self_attn for layer in engine.model.model.layers]
    assert all(isinstance(a, DSAAttention) for a in attn)
    assert [isinstance(a.indexer, LightningIndexer) for a in attn] == [True, True, False, True]
    keys, scale = engine.kv_cache.caches_of_layer(1)["indexer_k"]
    assert scale is None and keys.shape == (engine.kv_cache.num_blocks, 16, 1, hf["index_head_dim"])
    assert "indexer_k" not in engine.kv_cache.caches_of_layer(2)
    # one block holds every layer's latent and every indexer layer's keys
    assert engine.kv_cache.bytes_per_block == 16 * 4 * (4 * (32 + 8) + 3 * 16)


SETUPS = {name: SCHEDULING_SETUPS[name] for name in ("default", "chunked-32", "prefix-cache-twice")}
# 32 blocks rather than the shared setup's 40: the greedy runs of these models happen to fit in 40
SETUPS["preemption"] = dict(cache=dict(block_size=16, num_blocks=32), scheduler=dict(max_model_len=352))


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_tokens_match_transformers(kind, setup):
    check_greedy_setup(kind, setup, SETUPS[setup], PROMPTS, MAX_NEW)


def test_prefix_cache_hit_reuses_the_indexer_keys():
    """A second request sharing a 200-token prefix reads it (latent and indexer keys) from the
    cache and still decodes transformers' tokens."""
    kind = "deepseek-v32"
    engine = _engine(kind)
    base = PROMPTS[-2]
    prompts = [base, base + PROMPTS[4][:9]]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    engine.generate([prompts[0]], params)
    engine.stats.reset()
    out = engine.generate([prompts[1]], params)[0]
    assert engine.stats.num_cached_tokens >= 192
    assert out.token_ids == hf_greedy(tiny_checkpoint(kind), prompts[1], 8)


def test_triton_dsa_kernels_in_the_engine(monkeypatch):
    """The Triton indexer and sparse-MLA kernels (the interpreter on CPU) drive the whole engine:
    logits close to transformers' and the same greedy tokens."""
    monkeypatch.setenv("DLENGINE_DSA_KERNELS", "triton")
    kind = "glm-moe-dsa"
    path = tiny_checkpoint(kind)
    engine = _engine(kind)
    assert engine.model.model.layers[0].self_attn.dsa_kernels.name == "triton"
    prompts = [PROMPTS[5], PROMPTS[7]]  # 31 and 100 tokens
    assert relative_error(engine.prompt_logits(prompts[1]), hf_logits(path, prompts[1])) < 1e-4
    outs = engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(path, prompt, 4)


def test_unknown_dsa_kernels_choice_is_an_error(monkeypatch):
    monkeypatch.setenv("DLENGINE_DSA_KERNELS", "cuda-magic")
    with pytest.raises(ConfigError, match="DLENGINE_DSA_KERNELS='cuda-magic'"):
        _engine("deepseek-v32")


def test_missing_indexer_field_is_a_config_error(tmp_path):
    path = tiny_checkpoint("deepseek-v32")
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    del cfg["index_topk"]
    out = copy_checkpoint(path, str(tmp_path / "no-topk"), config=cfg)
    with pytest.raises(ConfigError, match="index_topk"):
        EngineBuilder(out).dtype("float32").build()


def test_shared_first_layer_is_a_config_error(tmp_path):
    path = tiny_checkpoint("glm-moe-dsa")
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    cfg["indexer_types"] = ["shared", "full", "full", "full"]
    out = copy_checkpoint(path, str(tmp_path / "shared-first"), config=cfg)
    with pytest.raises(ConfigError, match="indexer_types"):
        EngineBuilder(out).dtype("float32").build()


def test_first_decode_step_logits_match_transformers():
    """Teacher-forced: the logits of the first decode step (prompt of 100 > index_topk, so the
    decode query selects among them) against transformers' forward over prompt + token."""
    kind = "deepseek-v32"
    path = tiny_checkpoint(kind)
    engine = _engine(kind)
    prompt = PROMPTS[7]
    first = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))[0].token_ids
    ours = engine.prompt_logits(prompt + first)[-1]
    ref = hf_logits(path, prompt + first)[-1]
    assert relative_error(ours, ref) < 1e-4
    assert torch.argmax(hf_logits(path, prompt)[-1]).item() == first[0]


@pytest.mark.parametrize("preset", ["deepseek-v3.2-exp", "glm-5"])
def test_bench_dummy_dsa_preset_with_few_layers(preset, tmp_path, capsys, monkeypatch):
    """`dlengine bench` on the released models' configs with dummy weights and two layers, shrunk
    through hf_overrides (a CPU cannot hold one real layer in float32); index_topk stays above the
    tiny context, the rest of the indexer is the real one's shape."""
    from dlengine.bench import common
    from dlengine.cli import main

    shrink = dict(hidden_size=256, n_routed_experts=16, n_group=1, topk_group=1, first_k_dense_replace=1,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=1024, intermediate_size=512,
                  moe_intermediate_size=64, index_n_heads=4, index_topk=8)
    real_build = common.EngineBuilder

    class Shrunk(real_build):
        def build(self):
            self.hf_overrides(**shrink)
            return super().build()

    monkeypatch.setattr(common, "EngineBuilder", Shrunk)
    path = tmp_path / "out.json"
    rc = main(["bench", "--model", preset, "--load-format", "dummy", "--num-layers", "2", "--num-prompts", "2",
               "--input-len", "24", "--output-len", "3", "--max-model-len", "64", "--no-progress",
               "--json", str(path)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(path.read_text())
    assert res["total_output_tokens"] == 6
    assert res["model_cost"]["num_layers"] == 2 and res["model_cost"]["moe_layers"] == 1


@pytest.mark.parametrize("preset,params", [("deepseek-v3.2-exp", 671e9), ("glm-5", 744e9)])
def test_dsa_preset_parameter_counts(preset, params):
    """DeepSeek-V3.2-Exp is DeepSeek-V3 plus a small indexer per layer (671B published, MTP
    excluded); GLM-5 is published as 744B (MTP included, about 10B)."""
    from dlengine.bench.roofline import ModelCost
    from dlengine.builder import resolve_model_path
    from dlengine.config import ModelConfig
    from dlengine.models.registry import get_model_class

    cfg = ModelConfig.from_pretrained(resolve_model_path(preset))
    with torch.device("meta"):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = get_model_class(cfg)(cfg, max_position=4096)
        finally:
            torch.set_default_dtype(prev)
    cost = ModelCost.from_model(model, cfg, torch.bfloat16)
    assert cost.num_params == pytest.approx(params, rel=0.03)


def test_roofline_counts_the_bytes_sparse_decode_reads():
    """A DSA decode token reads min(context, index_topk) latents plus every context token's indexer
    key: at 64k context about 4x less than DeepSeek-V3's dense latent read (bf16 keys), flat above
    the top-k but for the keys."""
    from dlengine.bench.roofline import ModelCost
    from dlengine.builder import resolve_model_path
    from dlengine.config import ModelConfig
    from dlengine.models.registry import get_model_class

    costs = {}
    for preset in ("deepseek-v3", "deepseek-v3.2-exp"):
        cfg = ModelConfig.from_pretrained(resolve_model_path(preset), {"num_hidden_layers": 4})
        with torch.device("meta"):
            model = get_model_class(cfg)(cfg, max_position=4096)
        costs[preset] = ModelCost.from_model(model, cfg, torch.bfloat16)
    dense, sparse = costs["deepseek-v3"], costs["deepseek-v3.2-exp"]
    latent, key = 4 * (512 + 64) * 2, 4 * 128 * 2
    assert sparse.kv_bytes_per_token == dense.kv_bytes_per_token == latent
    assert sparse.index_key_bytes_per_token == key
    for ctx in (100, 2048, 32768, 65536):
        assert dense.kv_bytes_read(ctx) == latent * ctx
        assert sparse.kv_bytes_read(ctx) == latent * min(ctx, 2048) + key * ctx
    assert sparse.request_decode_kv_bytes(1000, 4) == sum(sparse.kv_bytes_read(1000 + k) for k in (1, 2, 3))
    assert dense.kv_bytes_read(65536) / sparse.kv_bytes_read(65536) > 3.5  # bf16 keys: 256 B vs 1152 B


def test_pd_disaggregation_matches_hybrid():
    """Prefill in a child process, decode here (another block size), over DLSlime's TCP transport:
    the latent and the indexer keys both migrate (bytes per token = every layer's latent plus every
    indexer layer's key) and the tokens equal a hybrid engine's, also on a prefix-cache hit."""
    pytest.importorskip("dlslime", reason="pip install 'dlengine[dlslime]' and apt-get install libibverbs1")
    from dlengine.disagg import PDRouter
    from dlengine.disagg.worker import WorkerEngine

    model = "tiny-glm-moe-dsa"
    params = SamplingParams(max_tokens=10, temperature=0.0)
    prompts = make_prompts(8, lengths=(1, 5, 16, 17, 31, 64, 100, 200))
    hybrid = EngineBuilder(model).dtype("float32").cache(block_size=16).scheduler(max_model_len=512).build()
    expected = [o.token_ids for o in hybrid.generate(prompts, params)]
    worker = WorkerEngine({"model": model, "role": "prefill", "dtype": "float32", "cache": {"block_size": 16},
                           "scheduler": {"max_model_len": 512}, "transfer": {}})
    decode = None
    try:
        decode = (EngineBuilder(model).dtype("float32").cache(block_size=8).scheduler(max_model_len=512)
                  .role("decode").transfer("dlslime", transport="tcp").build())
        router = PDRouter(worker, decode)
        for round_ in range(2):
            outs = router.generate(prompts, params)
            for i, (out, want) in enumerate(zip(outs, expected)):
                assert out.error is None, out.error
                assert out.token_ids == want, f"round {round_} prompt {i}"
        assert worker.stats()["num_cached_tokens"] > 0  # round 2 hit the prefill side's prefix cache
        report = router.migration_report()
        latent, keys = 4 * (32 + 8) * 4, 3 * 16 * 4  # 4 layers' latents, 3 indexer layers' keys, float32
        assert report["bytes"] == report["tokens"] * (latent + keys)
        assert decode.block_manager.num_free_blocks == decode.block_manager.num_blocks
    finally:
        worker.close()
        if decode is not None:
            decode.close()


@pytest.mark.parametrize("parallel", [dict(tp=2), dict(attention_dp=2, ffn_ep=2)], ids=["tp2", "dp2-ep2"])
def test_parallel_engine_matches_single_process(parallel):
    """2 processes on gloo: tensor parallelism (MLA heads split, the indexer replicated on both
    ranks) and attention-DP x expert-parallel MoE give the single-process engine's tokens."""
    kind = "tiny-glm-moe-dsa"
    prompts = make_prompts(8)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    want = [o.token_ids for o in EngineBuilder(kind).dtype("float32").build().generate(prompts, params)]
    engine = EngineBuilder(kind).dtype("float32").parallel(timeout_s=180, **parallel).build()
    try:
        assert [o.token_ids for o in engine.generate(prompts, params)] == want
    finally:
        engine.close()
