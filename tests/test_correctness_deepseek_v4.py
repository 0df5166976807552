"""dlengine vs transformers on the tiny DeepSeek-V4 checkpoint (dlengine/testing/deepseek_v4.py:
window 16, CSA every 4 tokens with an 8-entry indexer, HCA every 16, hyper-connections, hash- and
learned-routed clamped MoE, YaRN on the compress RoPE). Prompts up to 300 tokens cross the window
and dozens of compression periods.

Exact: float32 logits at every prompt position within 1e-4 relative, also when the prompt is fed
in chunks (1 token at a time = the decode path, and odd chunk sizes that split compression
windows); greedy tokens identical under the default schedule, small chunked prefill and
preemption. Prefix caching is refused (no hits) with the V4 state spec named as the reason."""

import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.cache.v4_specs import CompressedKVSpec, V4StateSpec
from dlengine.config import ConfigError
from dlengine.kernels.v4.reference import pool_windows
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts
from hf_reference import SCHEDULING_SETUPS, check_greedy_setup, hf_logits, reference_greedy, relative_error

KIND = "deepseek-v4"
MAX_NEW = 24
PROMPTS = make_prompts()  # lengths 1 .. 300


@pytest.fixture(scope="module")
def engine():
    return EngineBuilder(tiny_checkpoint(KIND)).dtype("float32").cache(block_size=16).build()


def test_cache_has_every_v4_kind(engine):
    specs = {s.name: s for s in engine.kv_cache.specs}
    assert specs["csa_kv"].compress_rate == 4 and specs["hca_kv"].compress_rate == 16
    assert specs["csa_index_k"].entry_dim == 16
    assert isinstance(specs["csa_kv"], CompressedKVSpec) and isinstance(specs["v4_sliding_state"], V4StateSpec)
    # one block of 16 tokens: 4 CSA entries (kv 32 + index key 16) in 2 layers, 1 HCA entry in 1 layer
    assert engine.block_manager.bytes_per_block == 4 * (2 * 32 + 2 * 16 + 0) * 4 + 1 * 32 * 4
    assert engine.kv_cache.bytes_per_state_slot > 0
    assert not engine.block_manager.prefix_caching_active
    assert "v4_" in engine.block_manager.prefix_cache_blocker


@pytest.mark.parametrize("prompt", PROMPTS, ids=[f"len{len(p)}" for p in PROMPTS])
def test_prompt_logits_match_transformers(engine, prompt):
    ref = hf_logits(tiny_checkpoint(KIND), prompt)
    ours = engine.prompt_logits(prompt)
    assert relative_error(ours, ref) < 1e-4


@pytest.mark.parametrize("chunk", [1, 3, 7, 32])
def test_chunked_logits_match_transformers(engine, chunk):
    """Chunk 1 runs every position through the one-token (decode) path; 3 and 7 split CSA and
    HCA windows across steps (the projection rings), 32 crosses the window within a step."""
    prompt = PROMPTS[-1] if chunk > 1 else PROMPTS[-2]  # 300 tokens (200 one at a time)
    ref = hf_logits(tiny_checkpoint(KIND), prompt)
    ours = engine.prompt_logits(prompt, chunk_size=chunk)
    assert relative_error(ours, ref) < 1e-4


@pytest.mark.parametrize("setup", ["default", "chunked-32", "preemption"])
def test_greedy_tokens_match_transformers(setup):
    check_greedy_setup(KIND, setup, SCHEDULING_SETUPS[setup], PROMPTS, MAX_NEW)


def test_prefix_caching_is_refused_and_tokens_stay_exact():
    """The window ring and partial compression windows are per-sequence state: no prefix hits,
    and a second identical round still computes every prompt and matches."""
    engine = EngineBuilder(tiny_checkpoint(KIND)).dtype("float32").cache(block_size=16, prefix_caching=True).build()
    expected = reference_greedy(KIND, tuple(map(tuple, PROMPTS[:6])), 8)
    for _ in range(2):
        outs = engine.generate(PROMPTS[:6], SamplingParams(max_tokens=8, temperature=0.0))
        assert [o.token_ids for o in outs] == [list(w) for w in expected]
    assert engine.stats.num_cached_tokens == 0


def test_block_size_must_hold_whole_compressed_entries():
    with pytest.raises(ConfigError, match="multiple of the compress rate 16"):
        EngineBuilder(tiny_checkpoint(KIND)).dtype("float32").cache(block_size=8).build()


def test_overlap_pooling_matches_its_definition():
    """CSA entry w = softmax-pool of window w-1's first half with window w's second half."""
    g = torch.Generator().manual_seed(0)
    w, m, d = 3, 4, 5
    kv, gate, ape = (torch.randn(w, m, 2 * d, generator=g) for _ in range(3))
    ape = ape[0]
    prev_kv, prev_gate = torch.randn(m, 2 * d, generator=g), torch.randn(m, 2 * d, generator=g)
    out = pool_windows(kv, gate, ape, True, prev_kv, prev_gate)
    for i in range(w):
        pk, pg = (prev_kv, prev_gate) if i == 0 else (kv[i - 1], gate[i - 1])
        slots_kv = torch.cat([pk[:, :d], kv[i, :, d:]])
        slots_gate = torch.cat([(pg + ape)[:, :d], (gate[i] + ape)[:, d:]])
        assert torch.allclose(out[i], (slots_kv * slots_gate.softmax(dim=0)).sum(0), atol=1e-6)
    first = pool_windows(kv[:1], gate[:1], ape, True)  # no previous window: its half weighs 0
    assert torch.allclose(first[0], (kv[0, :, d:] * (gate[0] + ape)[:, d:].softmax(dim=0)).sum(0), atol=1e-6)


def test_flash_preset_has_the_released_size():
    """deepseek-v4-flash: transformers' config defaults (DeepSeek-V4-Flash, 284B parameters),
    buildable on the meta device; its cache per token is a tenth of DeepSeek-V3's latent."""
    from dlengine.builder import resolve_model_path
    from dlengine.cache.kv_cache import bytes_per_block
    from dlengine.cache.specs import cache_specs_for
    from dlengine.config import ModelConfig
    from dlengine.models.deepseek_v4 import DeepseekV4ForCausalLM

    cfg = ModelConfig.from_pretrained(resolve_model_path("deepseek-v4-flash"))
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(cfg, max_position=4096)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(284e9, rel=0.01)
    specs = cache_specs_for(cfg, torch.bfloat16, model_cls=DeepseekV4ForCausalLM)
    # 20 CSA layers: (512 + 128) per 4 tokens; 23 HCA layers: 512 per 128 tokens; bf16
    assert bytes_per_block(specs, 128) == 128 * 2 * (20 * 640 // 4 + 23 * 512 // 128)


def test_pd_tokens_equal_hybrid():
    """Prefill-decode disaggregation over DLSlime TCP: the compressed entries travel as paged
    blocks (the decode side uses another block size), the rings as the state slot; greedy tokens
    equal a hybrid engine's, and every block and slot comes back on both sides."""
    pytest.importorskip("dlslime", reason="pip install 'dlengine[dlslime]' and apt-get install libibverbs1")
    from dlengine.disagg import PDRouter
    from test_pd_gdn import GREEDY, PROMPTS as PD_PROMPTS, assert_all_free, build, step_until

    prefill, decode = build(KIND, "prefill"), build(KIND, "decode", block_size=32)
    try:
        expected = [o.token_ids for o in build(KIND, "hybrid").generate(PD_PROMPTS, GREEDY)]
        decode.connector.region.tensor.fill_(255)  # an unpulled byte would show as NaN
        outs = PDRouter(prefill, decode).generate(PD_PROMPTS, GREEDY)
        for i, (out, exp) in enumerate(zip(outs, expected)):
            assert out.error is None, out.error
            assert out.token_ids == exp, f"prompt {i} ({len(PD_PROMPTS[i])} tokens)"
        step_until([prefill], lambda: not prefill.connector.pinned)
        assert_all_free(prefill)
        assert_all_free(decode)
    finally:
        prefill.close()
        decode.close()


def test_mtp_tensors_are_skipped_unknown_ones_are_errors(tmp_path):
    """Released checkpoints carry the MTP module as `mtp.*` tensors: not loaded (transformers
    drops them too), their presence no error; any other unknown tensor still is one."""
    from hf_reference import checkpoint_tensors, copy_checkpoint

    path = tiny_checkpoint(KIND)
    tensors = checkpoint_tensors(path)
    mtp = dict(tensors)
    for name, t in tensors.items():
        if name.startswith("layers.3."):
            mtp["mtp.0." + name[len("layers.3."):]] = t.clone()
    prompt = PROMPTS[6]
    ref = EngineBuilder(path).dtype("float32").cache(block_size=16).build().prompt_logits(prompt)
    out = copy_checkpoint(path, str(tmp_path / "mtp"), mtp)
    assert torch.equal(EngineBuilder(out).dtype("float32").cache(block_size=16).build().prompt_logits(prompt), ref)
    bad = dict(tensors, **{"layers.1.attn.bogus.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match="bogus"):
        EngineBuilder(copy_checkpoint(path, str(tmp_path / "bad"), bad)).dtype("float32").cache(block_size=16).build()


def test_compressed_kv_spec_layout():
    """Entry w of a layer sits in the block holding token w*m, row (w*m % block_size) // m; a
    block's part is block_size * token_bytes bytes (what KV migration copies)."""
    from dlengine.cache.kv_cache import KVCache

    spec = CompressedKVSpec((0, 2), cache_name="hca_kv", compress_rate=8, entry_dim=6, dtype=torch.float32)
    assert spec.token_bytes == 6 * 4 // 8 and spec.page_bytes(32) == 2 * 4 * 6 * 4
    cache = KVCache([spec], num_blocks=5, block_size=32)
    views = cache.caches_of_layer(2)["hca_kv"]
    assert views.shape == (5, 4, 6)
    views[3, 1] = 7.0  # layer 2, block 3, entry row 1
    raw = cache.groups[0].storage
    assert raw[1, 3, 1].eq(7.0).all() and raw[0].eq(0).all()
    with pytest.raises(ConfigError, match="multiple of the compress rate"):
        spec.page_bytes(12)
    with pytest.raises(ConfigError, match="multiple of the compress rate"):
        CompressedKVSpec((0,), compress_rate=128, entry_dim=32, dtype=torch.bfloat16)  # 64-byte entries
