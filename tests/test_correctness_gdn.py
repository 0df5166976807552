"""dlengine vs transformers on tiny Gated DeltaNet hybrids (Qwen3-Next, Qwen3.5, Qwen3.5-MoE):
float32 logits close at every prompt position, greedy tokens equal through the paged cache with
the recurrent state in per-request slots: a batch of prompts of lengths 1..300, prompts split
into 32-token chunks (each chunk resumes the state the previous one left), forced preemption (the
slot is freed and the request recomputes from scratch), and prefix caching with state checkpoints
(a second round of the same prompts, and prompts extending earlier ones, resume cached prefixes
from the state saved at each prompt's last full block; eviction frees the checkpoints)."""

import logging

import pytest

from dlengine import EngineBuilder
from dlengine.cache.specs import FullAttentionSpec, StateSpec
from dlengine.config import ConfigError
from dlengine.models.layers.gated_deltanet import GatedDeltaNet
from dlengine.models.qwen3_next import GatedAttention, SharedExpertMoE
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts
from hf_reference import build_for_setup, hf_logits, reference_greedy, relative_error

KINDS = ["qwen3-next", "qwen3.5", "qwen3.5-moe"]
MAX_NEW = 16
PROMPTS = make_prompts()  # lengths 1, 2, 5, 16, 17, 31, 64, 100, 200, 300

SETUPS = {
    # prefix caching is on by default: two rounds of the same prompts, hits on the second
    "default-twice": dict(cache=dict(block_size=16)),
    "chunked-32": dict(cache=dict(block_size=16), scheduler=dict(max_num_batched_tokens=32)),
    "preemption": dict(cache=dict(block_size=16, num_blocks=24), scheduler=dict(max_model_len=320)),
    # the next step is scheduled (placeholder tokens) while this one updates the states
    "async-chunked-32": dict(cache=dict(block_size=16), scheduler=dict(max_num_batched_tokens=32),
                             async_scheduling=True),
}


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


def test_layers_and_cache_specs(kind):
    engine = EngineBuilder(tiny_checkpoint(kind)).dtype("float32").cache(block_size=16).build()
    layers = engine.model.model.layers if kind == "qwen3-next" else engine.model.model.language_model.layers
    mixers = [type(getattr(l, "linear_attn", None) or l.self_attn) for l in layers]
    assert mixers == [GatedDeltaNet, GatedDeltaNet, GatedAttention, GatedDeltaNet]
    sparse = [isinstance(l.mlp, SharedExpertMoE) for l in layers]
    assert sparse == {"qwen3-next": [True, False, True, True], "qwen3.5": [False] * 4, "qwen3.5-moe": [True] * 4}[kind]
    full, state = engine.kv_cache.specs
    assert isinstance(full, FullAttentionSpec) and full.layers == (2,)
    assert isinstance(state, StateSpec) and state.layers == (0, 1, 3)
    assert {t.name: t.shape for t in state.tensors} == {"conv": (128, 3), "ssm": (4, 16, 16)}
    assert engine.memory_plan.num_state_slots == engine.config.scheduler.max_num_seqs
    assert "state slots" in engine.memory_plan.describe(16)


def test_prompt_logits_match_transformers(kind):
    path = tiny_checkpoint(kind)
    engine = EngineBuilder(path).dtype("float32").cache(block_size=16).build()
    for prompt in PROMPTS:
        ours = engine.prompt_logits(prompt)
        ref = hf_logits(path, prompt)
        assert ours.shape == ref.shape
        assert relative_error(ours[-1], ref[-1]) < 1e-4
        assert relative_error(ours, ref) < 1e-4  # every position, i.e. the whole prefill


def test_teacher_forced_logits_through_small_chunks(kind):
    """Prompt + reference continuation scored in chunks of 7 tokens (each resuming the conv window
    and delta-rule state the last one left, chunk edges off the block edges), and one sequence in
    chunks of 2, shorter than the conv window (K - 1 = 3 inputs), so the window mixes old and new."""
    path = tiny_checkpoint(kind)
    engine = EngineBuilder(path).dtype("float32").cache(block_size=16).build()
    expected = reference_greedy(kind, tuple(map(tuple, PROMPTS)), MAX_NEW)
    for prompt, cont in list(zip(PROMPTS, expected))[-4:]:
        seq = prompt + list(cont)
        assert relative_error(engine.prompt_logits(seq, chunk_size=7), hf_logits(path, seq)) < 1e-4
    seq = PROMPTS[5] + list(expected[5])
    assert relative_error(engine.prompt_logits(seq, chunk_size=2), hf_logits(path, seq)) < 1e-4


@pytest.mark.parametrize("setup", list(SETUPS))
def test_greedy_tokens_match_transformers(kind, setup, caplog):
    from dlengine import SamplingParams

    with caplog.at_level(logging.INFO, logger="dlengine"):
        engine = build_for_setup(tiny_checkpoint(kind), SETUPS[setup])
    assert "prefix caching of the recurrent state" in caplog.text
    expected = reference_greedy(kind, tuple(map(tuple, PROMPTS)), MAX_NEW)
    for r in range(2 if setup == "default-twice" else 1):
        engine.stats.reset()
        outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
        for i, (out, want) in enumerate(zip(outs, expected)):
            assert out.token_ids == list(want), f"round {r}: prompt {i} (len {len(PROMPTS[i])}) diverged"
        if r == 1:  # every prompt of a full block or more resumes its checkpoint
            assert engine.stats.num_cached_tokens == sum((len(p) - 1) // 16 * 16 for p in PROMPTS)
    if setup == "preemption":
        assert engine.stats.num_preemptions > 0
    if setup.endswith("chunked-32"):
        assert max(s.num_tokens for s in engine.stats.steps) <= 32
        assert any(s.num_decodes > 0 and s.num_prefill_tokens > 0 for s in engine.stats.steps)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.state_slots.num_free == bm.state_slots.num_slots  # every slot came back
    assert bm.checkpoints.num_pending == 0
    bm.check_invariants()


def test_prefix_cache_hits_resume_checkpoints(kind):
    """Shared prefixes across requests: prompts that extend earlier prompts (and their answers:
    a multi-turn conversation) by a few blocks resume the checkpoint at the earlier prompt's last
    full block, through 7-token prefill chunks (so checkpoints fall inside steps and at their
    ends, off the chunk edges), with greedy tokens equal to transformers'. A small cache evicts
    cached blocks, and their checkpoints go with them: slot accounting returns to zero."""
    from dlengine import SamplingParams

    path = tiny_checkpoint(kind)
    engine = build_for_setup(path, dict(cache=dict(block_size=16, num_blocks=40),
                                        scheduler=dict(max_num_batched_tokens=64, max_model_len=320)))
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    bm = engine.block_manager
    first = make_prompts(3, lengths=(33, 70, 120), seed=7)
    turns = [first]
    for _ in range(2):  # two more turns: previous prompt + its answer + a new question
        answers = reference_greedy(kind, tuple(map(tuple, turns[-1])), MAX_NEW)
        extra = make_prompts(3, lengths=(5, 20, 37), seed=8 + len(turns))
        turns.append([p + list(a) + e for p, a, e in zip(turns[-1], answers, extra)])
    for t, prompts in enumerate(turns):
        engine.stats.reset()
        expected = reference_greedy(kind, tuple(map(tuple, prompts)), MAX_NEW)
        for prompt, want in zip(prompts, expected):  # one at a time: the cache holds one long prompt
            assert engine.generate([prompt], params)[0].token_ids == list(want), f"turn {t}, len {len(prompt)}"
        if t:
            assert engine.stats.num_cached_tokens >= 16 * 3, "later turns resume their earlier turns' prefixes"
        bm.check_invariants()
        assert bm.checkpoints.num_pending == 0
    assert bm.checkpoints.num_published == 9  # one per prompt
    for prompt in make_prompts(3, lengths=(300, 300, 300), seed=20):  # fills the cache: evicts the others
        engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    bm.check_invariants()  # every published checkpoint's block is still cached
    assert bm.checkpoints.num_evicted == 0 and bm.checkpoints.num_published <= 4  # dropped with their blocks
    assert bm.reset_prefix_cache()
    assert bm.checkpoints.num_free == bm.checkpoints.num_slots
    assert bm.state_slots.num_free == bm.state_slots.num_slots


def test_unsupported_settings_are_config_errors():
    """Speculative decoding of a state kind that cannot roll drafts back is a ConfigError naming
    the problem (the Gated DeltaNet state can: tests/test_spec_gdn.py). CUDA graphs capture the
    Gated DeltaNet state (tests/test_gdn_cuda_graph.py), and stay refused with a ConfigError for
    state kinds that are not capturable (a StateSpec declaring graph_capturable False;
    DeepSeek-V4's rings are captured since its batched decode path); checked at the assembly
    step, since a CPU build refuses cuda_graphs(True) earlier. Tensor parallelism:
    tests/test_gdn_parallel.py."""
    from types import SimpleNamespace

    import torch

    from dlengine.assemble import _check_state_model_features, _use_cuda_graphs
    from dlengine.config import ModelConfig
    from dlengine.models.deepseek_v4 import DeepseekV4ForCausalLM
    from dlengine.models.qwen3_5 import Qwen3_5ForConditionalGeneration

    cfg = ModelConfig.from_pretrained(tiny_checkpoint("qwen3.5"))
    specs = Qwen3_5ForConditionalGeneration.cache_specs(cfg, dtype=torch.float32)
    backend = SimpleNamespace(supports_cuda_graphs=True)
    one_rank = SimpleNamespace(ep_group=None)
    assert _use_cuda_graphs(SimpleNamespace(cuda_graphs=True, model=cfg), backend, one_rank, specs) is True
    on_cuda = SimpleNamespace(cuda_graphs=None, model=cfg, device=torch.device("cuda"))
    assert _use_cuda_graphs(on_cuda, backend, one_rank, specs) is True  # the default on GPUs
    v4 = ModelConfig.from_pretrained(tiny_checkpoint("deepseek-v4"))
    v4_specs = DeepseekV4ForCausalLM.cache_specs(v4, dtype=torch.float32)
    assert _use_cuda_graphs(SimpleNamespace(cuda_graphs=True, model=v4), backend, one_rank, v4_specs) is True
    uncapturable = [*specs[:-1], _UncapturableState(specs[-1].layers, tensors=specs[-1].tensors)]
    with pytest.raises(ConfigError, match="whose layers CUDA graphs do not capture yet; use cuda_graphs\\(False\\)"):
        _use_cuda_graphs(SimpleNamespace(cuda_graphs=True, model=cfg), backend, one_rank, uncapturable)
    assert _use_cuda_graphs(SimpleNamespace(cuda_graphs=None, model=cfg), backend, one_rank, uncapturable) is False
    # speculative decoding rolls the Gated DeltaNet state back from draft snapshots (tests/test_spec_gdn.py);
    # a state kind whose layers keep none is refused, naming it
    engine = EngineBuilder(tiny_checkpoint("qwen3.5")).dtype("float32").speculative(_NoDrafts(), num_tokens=1).build()
    assert engine.core.state_rollback is not None
    speculating = SimpleNamespace(model=cfg, components=SimpleNamespace(speculator=_NoDrafts()))
    no_rollback = [*specs[:-1], _NoRollbackState(specs[-1].layers, tensors=specs[-1].tensors)]
    with pytest.raises(ConfigError, match="cannot roll rejected drafts back"):
        _check_state_model_features(speculating, no_rollback)


class _UncapturableState(StateSpec):
    """A state kind whose decode layers a CUDA graph cannot capture (e.g. they sync with the host)."""

    graph_capturable = False


class _NoRollbackState(StateSpec):
    """A state kind whose layers keep no per-position snapshots (speculation cannot undo drafts)."""

    speculative_rollback = False


class _NoDrafts:
    name, num_tokens = "none", 1

    def propose(self, requests):
        return [[] for _ in requests]


# the released models' sizes (config-only presets): total parameters as published ("35B", "27B",
# "80B"; Qwen3.5's include a ~0.4B vision tower the text path does not build)
@pytest.mark.parametrize("preset,total", [("qwen3.5-35b-a3b", 35e9), ("qwen3.5-27b", 27e9),
                                          ("qwen3-next-80b-a3b", 80e9)])
def test_presets_have_the_released_sizes(preset, total):
    import torch

    from dlengine.bench.roofline import ModelCost
    from test_presets import meta_model

    model, cfg = meta_model(preset)
    assert ModelCost.from_model(model, cfg, torch.bfloat16).num_params == pytest.approx(total, rel=0.03)
    specs = type(model).cache_specs(cfg, dtype=torch.bfloat16)
    assert len(specs[0].layers) == cfg.num_hidden_layers // 4  # every 4th layer is full attention
    with pytest.raises(ConfigError, match="all linear attention; keep at least one full-attention layer"):
        type(model).cache_specs(meta_model(preset, num_hidden_layers=2)[1], dtype=torch.bfloat16)


def test_qwen3_5_moe_preset_has_the_released_dims():
    """The preset's text config equals transformers' Qwen3_5MoeTextConfig defaults, which that
    class documents as Qwen/Qwen3.5-35B-A3B's."""
    import json
    import os

    from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig

    from dlengine.builder import resolve_model_path

    with open(os.path.join(resolve_model_path("qwen3.5-35b-a3b"), "config.json")) as f:
        text = json.load(f)["text_config"]
    released = Qwen3_5MoeTextConfig()
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                  "linear_num_key_heads", "linear_num_value_heads", "moe_intermediate_size",
                  "shared_expert_intermediate_size", "num_experts_per_tok", "num_experts", "rms_norm_eps",
                  "layer_types"):
        assert text[field] == getattr(released, field), field
    assert text["partial_rotary_factor"] == 0.25
