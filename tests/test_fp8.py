"""Block-scaled FP8 checkpoints (DeepSeek-V3 / Kimi-K2 style): config parsing, the tiny FP8
checkpoint, loading (both scale layouts, missing / mistyped tensors), the "dequant" and "fp8"
modes, and the Triton kernels against their torch references (CPU: TRITON_INTERPRET=1).

The oracle for loading is transformers' own FP8 dequantisation (`Fp8Dequantize._dequantize_one`)
applied to the same checkpoint, run by transformers' DeepseekV3ForCausalLM: dequant mode must match
it like the bf16 model matches transformers (1e-4, greedy tokens equal). Against the unquantised
checkpoint only the size of the quantisation error is asserted: the tiny random model is chaotic
(see test_quantisation_error_against_the_unquantised_checkpoint)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from dlengine import EngineBuilder, SamplingParams
from dlengine.config import ConfigError, QuantizationConfig
from dlengine.kernels.fp8 import fp8_torch as ref
from dlengine.models.layers.fp8_linear import Fp8Linear, should_convert
from dlengine.models.layers.linear import MergedLinear
from dlengine.testing import build_fp8_checkpoint, tiny_checkpoint

from conftest import make_prompts
from hf_reference import copy_checkpoint, hf_greedy, hf_logits, relative_error

PROMPTS = make_prompts()
MAX_NEW = 16


def fp8_path() -> str:
    return tiny_checkpoint("deepseek-v3-fp8")


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------ config
def test_quantization_config_parsing(tmp_path):
    q = QuantizationConfig.from_hf({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                    "weight_block_size": [128, 128], "activation_scheme": "dynamic"}}, "x")
    assert q == QuantizationConfig("fp8", (128, 128), ())
    assert QuantizationConfig.from_hf({}, "x") is None
    with pytest.raises(ConfigError, match="quant_method='awq'"):
        QuantizationConfig.from_hf({"quantization_config": {"quant_method": "awq"}}, "x")
    with pytest.raises(ConfigError, match="weight_block_size=None"):  # per-tensor FP8
        QuantizationConfig.from_hf({"quantization_config": {"quant_method": "fp8"}}, "x")
    with pytest.raises(ConfigError, match="activation_scheme='static'"):
        QuantizationConfig.from_hf({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
                                                            "activation_scheme": "static"}}, "x")
    # an unknown method fails the build, naming the method
    cfg = read_config(fp8_path())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    bad = copy_checkpoint(fp8_path(), str(tmp_path / "gptq"), config=cfg)
    with pytest.raises(ConfigError, match="'gptq' is not supported"):
        EngineBuilder(bad).dtype("float32").build()


def test_builder_quantization_modes():
    with pytest.raises(ConfigError, match="unknown quantization mode 'int4'"):
        EngineBuilder(fp8_path()).quantization("int4").build()
    with pytest.raises(ConfigError, match="needs an FP8 checkpoint"):
        EngineBuilder(tiny_checkpoint("deepseek-v3")).dtype("float32").quantization("fp8").build()
    # unquantised checkpoints ignore the default and "dequant"
    assert EngineBuilder(tiny_checkpoint("deepseek-v3")).dtype("float32").quantization("dequant").build() \
        .config.quantization == "none"
    engine = EngineBuilder(fp8_path()).dtype("float32").build()  # auto on a CPU: dequant
    assert engine.config.quantization == "dequant" and "quantization=dequant" in repr(engine)
    assert not any(p.dtype == torch.float8_e4m3fn for p in engine.model.parameters())


def test_modules_to_not_convert_matching_follows_transformers():
    skip = ["lm_head", "model.layers.0", "mlp.gate"]
    assert not should_convert("lm_head", skip)
    assert not should_convert("model.layers.0.self_attn.q_a_proj", skip)
    assert should_convert("model.layers.10.self_attn.q_a_proj", skip)  # "layers.0" is not "layers.10"
    assert not should_convert("model.layers.3.mlp.gate", skip)
    assert should_convert("model.layers.3.mlp.gate_up_proj", skip)


# ---------------------------------------------------------------------------- the checkpoint
def test_tiny_fp8_checkpoint_is_deepseek_layout():
    """FP8 weights with [ceil(N/128), ceil(K/128)] float32 scales for every linear projection and
    expert; bf16 embeddings, lm_head, norms and router gate; float32 score-correction bias. Each
    block's scale is its amax / 448 and every element is within half an e4m3 step of the top
    binade (amax / 28) of the source weight: the bound round-to-nearest guarantees."""
    fp8 = load_file(os.path.join(fp8_path(), "model.safetensors"))
    src = load_file(os.path.join(tiny_checkpoint("deepseek-v3"), "model.safetensors"))
    assert read_config(fp8_path())["quantization_config"]["weight_block_size"] == [128, 128]
    scales = {n for n in fp8 if n.endswith("weight_scale_inv")}
    assert {n[: -len("_scale_inv")] for n in scales} == {n for n, t in fp8.items() if t.dtype == torch.float8_e4m3fn}
    assert set(fp8) - scales == set(src)
    for name, t in fp8.items():
        if name in scales:
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = fp8[name + "_scale_inv"]
            n, k = t.shape
            assert s.dtype == torch.float32 and s.shape == ((n + 127) // 128, (k + 127) // 128)
            w = src[name]
            assert torch.allclose(s, w.abs().amax().reshape(1, 1) / 448)  # tiny: one partial block
            deq = ref.dequantize_weight(t, s, 128, 128, torch.float32)
            assert (deq - w).abs().max() <= w.abs().max() / 28 * (1 + 1e-6)
        elif name.endswith("e_score_correction_bias"):
            assert t.dtype == torch.float32
        else:
            assert t.dtype == torch.bfloat16, name
            assert t.dim() == 1 or "embed" in name or "lm_head" in name or name.endswith("mlp.gate.weight")
    assert any(".experts.3.down_proj.weight_scale_inv" in n for n in scales)
    assert any(".shared_experts.gate_proj.weight_scale_inv" in n for n in scales)


def test_quantise_dequantise_partial_blocks():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 200, 300, generator=g)
    w[0, :128, :128] = 0  # an all-zero block: scale 1, exact zeros
    q, s = ref.quantize_weight_blockwise(w, (128, 128))
    assert q.shape == w.shape and s.shape == (3, 2, 3)
    assert s[0, 0, 0] == 1 and (q[0, :128, :128].float() == 0).all()
    amax = torch.zeros(3, 2, 3)
    for i in range(2):
        for j in range(3):
            amax[:, i, j] = w[:, i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].abs().amax(dim=(1, 2))
    torch.testing.assert_close(s[amax > 0], amax[amax > 0] / 448)
    deq = ref.dequantize_weight(q, s, 128, 128, torch.float32)
    bound = (amax / 28).repeat_interleave(128, 1)[:, :200].repeat_interleave(128, 2)[:, :, :300]
    assert ((deq - w).abs() <= bound * (1 + 1e-6)).all()


# ------------------------------------------------------------------------------------ loading
def transformers_dequantised_checkpoint(path: str, out: str) -> str:
    """The oracle: every FP8 weight dequantised by transformers' own Fp8Dequantize, float32."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    tensors = load_file(os.path.join(path, "model.safetensors"))
    deq = Fp8Dequantize(hf_quantizer=None)
    plain = {}
    for name, t in tensors.items():
        if name.endswith("weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            plain[name] = deq._dequantize_one(t, tensors[name + "_scale_inv"], output_dtype=torch.float32)
        else:
            plain[name] = t.float()
    cfg = read_config(path)
    del cfg["quantization_config"]
    return copy_checkpoint(path, out, plain, cfg)


@pytest.mark.parametrize("block", [(128, 128), (8, 8)])
def test_dequant_mode_matches_transformers(tmp_path, block):
    """(128, 128): each tiny matrix is one partial block and the merged gate/up GEMMs (I = 24) keep
    per-row scales; (8, 8): multi-block scale grids, merged GEMMs sharing 8-row blocks. Logits at
    every prompt position and greedy tokens match transformers on the dequantised weights."""
    path = fp8_path() if block == (128, 128) else build_fp8_checkpoint(
        tiny_checkpoint("deepseek-v3"), str(tmp_path / "fp8-8x8"), block)
    oracle = transformers_dequantised_checkpoint(path, str(tmp_path / "oracle"))
    engine = EngineBuilder(path).dtype("float32").quantization("dequant").build()
    merged = engine.model.model.layers[2].mlp.shared_experts.gate_up_proj
    assert isinstance(merged, Fp8Linear) and merged.dequantized
    assert merged.row_div == (1 if block == (128, 128) else 8)
    for prompt in PROMPTS[:6]:
        assert relative_error(engine.prompt_logits(prompt), hf_logits(oracle, prompt)) < 1e-4
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
    for out, prompt in zip(outs, PROMPTS):
        assert out.token_ids == hf_greedy(oracle, prompt, MAX_NEW)


def test_missing_or_mistyped_fp8_tensors_are_errors(tmp_path):
    tensors = load_file(os.path.join(fp8_path(), "model.safetensors"))
    for name in ("model.layers.1.self_attn.o_proj.weight_scale_inv",
                 "model.layers.2.mlp.experts.5.up_proj.weight_scale_inv",
                 "model.layers.0.mlp.up_proj.weight_scale_inv"):
        partial = dict(tensors)
        del partial[name]
        out = copy_checkpoint(fp8_path(), str(tmp_path / name), partial)
        ours = (name.replace("experts.5.up_proj.weight_scale_inv", "experts.w13_weight_scale_inv")
                .replace("mlp.up_proj", "mlp.gate_up_proj"))
        with pytest.raises(ConfigError, match=ours.replace(".", r"\.")):
            EngineBuilder(out).dtype("float32").quantization("dequant").build()
    # a bf16 weight where the config promises FP8 is not silently cast
    mistyped = dict(tensors)
    mistyped["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(64, 64, dtype=torch.bfloat16)
    out = copy_checkpoint(fp8_path(), str(tmp_path / "mistyped"), mistyped)
    with pytest.raises(ConfigError, match=r"o_proj\.weight.*bfloat16.*FP8"):
        EngineBuilder(out).dtype("float32").build()


def test_fp8_mode_keeps_fp8_weights_and_runs_w8a8(tmp_path):
    """quantization("fp8") on a CPU: the linear layers keep FP8 weights and scales and run the
    torch W8A8 reference (activations quantised per token group), the experts too (FP8 fused-MoE
    reference); kv_b_proj (read as a matrix by MLA) is dequantised. Each Fp8Linear's output is the
    dequantised-activation x dequantised-weight product."""
    engine = EngineBuilder(fp8_path()).dtype("float32").quantization("fp8").build()
    layer = engine.model.model.layers[1]
    assert layer.self_attn.q_a_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.mlp.shared_experts.down_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.self_attn.kv_b_proj.dequantized and layer.self_attn.kv_b_proj.weight.dtype == torch.float32
    assert layer.mlp.experts.w13_weight.dtype == torch.float8_e4m3fn
    assert layer.mlp.experts.w2_weight_scale_inv.shape == (8, 1, 1)
    assert layer.mlp.gate.weight.dtype == torch.float32 and engine.model.lm_head.weight.dtype == torch.float32
    lin = layer.self_attn.o_proj
    x = torch.randn(5, lin.in_features, generator=torch.Generator().manual_seed(0))
    xq, xs = ref.per_token_group_quant_fp8_torch(x, 128)
    w = ref.dequantize_weight(lin.weight, lin.weight_scale_inv, 128, lin.row_div, torch.float32)
    torch.testing.assert_close(lin(x), ref.dequantize_activation(xq, xs, 128) @ w.t())
    # both modes run every prompt; how far apart they are is the activation quantisation error
    deq = EngineBuilder(fp8_path()).dtype("float32").quantization("dequant").build()
    errs = [((engine.prompt_logits(p)[0] - deq.prompt_logits(p)[0]).norm() / deq.prompt_logits(p)[0].norm()).item()
            for p in PROMPTS]
    # measured (experts W8A8 too): max 0.32, median 0.097; a wrong activation scale would give ~1
    assert 0 < max(errs) < 0.6 and sorted(errs)[len(errs) // 2] < 0.2


def test_quantisation_error_against_the_unquantised_checkpoint():
    """Dequant mode vs the float32 checkpoint it was quantised from. The tiny model is chaotic:
    ~24 linear layers in series with 1/sqrt(fan_in) weights and decisive routing, so e4m3's ~2.5%
    rms weight error grows to ~10-20% of the logits and flips many argmaxes (top-2 gaps are
    0.02-0.08); rounding only the non-FP8 tensors to bf16 already moves some positions by 100%
    through routing flips. Measured (first position of each prompt, relative L2): median 0.12,
    max 0.41; argmax agreement over all positions 0.55. Asserted with margin: median < 0.2, max <
    0.6, agreement > 0.35 (chance is 1/512) -- enough to catch a wrong scale layout (errors ~1)
    or unquantised weights (error 0 at position 0: the lower bound)."""
    src = EngineBuilder(tiny_checkpoint("deepseek-v3")).dtype("float32").build()
    deq = EngineBuilder(fp8_path()).dtype("float32").quantization("dequant").build()
    first, agree, total = [], 0, 0
    for p in PROMPTS:
        a, b = deq.prompt_logits(p), src.prompt_logits(p)
        first.append(((a[0] - b[0]).norm() / b[0].norm()).item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += len(p)
    first.sort()
    assert 0.01 < first[len(first) // 2] < 0.2 and first[-1] < 0.6, first
    assert agree / total > 0.35


# -------------------------------------------------------------------------- merged scale layouts
@pytest.mark.parametrize("sizes, block, row_div", [([24, 24], (16, 16), 1), ([32, 48], (16, 16), 16),
                                                    ([24, 40], (128, 128), 1)])
def test_merged_linear_scales_load_per_shard(sizes, block, row_div):
    """gate/up shards quantised separately load into one Fp8Linear: block-shared scale rows when
    every shard starts on a block boundary, per-row scales otherwise; either way it computes what
    the separate shards compute."""
    g = torch.Generator().manual_seed(1)
    k = 40
    lin = Fp8Linear(MergedLinear(k, sizes, ["gate", "up"]), block)
    assert lin.row_div == row_div
    shards = [torch.randn(n, k, generator=g) for n in sizes]
    deq = []
    for name, w in zip(("gate", "up"), shards):
        q, s = ref.quantize_weight_blockwise(w, block)
        lin.weight.weight_loader(lin.weight, q, name)
        lin.weight_scale_inv.weight_loader(lin.weight_scale_inv, s, name)
        deq.append(ref.dequantize_weight(q, s, block[1], block[0], torch.float32))
    x = torch.randn(7, k, generator=g)
    xq, xs = ref.per_token_group_quant_fp8_torch(x, block[1])
    expect = ref.dequantize_activation(xq, xs, block[1]) @ torch.cat(deq).t()
    torch.testing.assert_close(lin(x), expect)
    lin.dequantize_(torch.float32)
    torch.testing.assert_close(lin.weight, torch.cat(deq))
    with pytest.raises(ValueError, match="shape"):
        Fp8Linear(MergedLinear(k, sizes, ["gate", "up"]), block).weight_scale_inv.weight_loader(
            lin.weight, torch.ones(9, 9), "gate")


# ----------------------------------------------------------------------------------- kernels
triton = pytest.importorskip("triton")
from dlengine.kernels.fp8 import fp8_gemm_triton as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("m, k, group", [(1, 128, 128), (5, 300, 128), (9, 64, 32), (3, 256, 128)])
def test_per_token_group_quant_matches_reference(m, k, group):
    g = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, k)
    x[0, :group] = 0  # an all-zero group: eps scale, zeros
    x = x.to(DEVICE)
    q, s = tk.per_token_group_quant_fp8(x, group)
    q_ref, s_ref = ref.per_token_group_quant_fp8_torch(x, group)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (m, (k + group - 1) // group)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    assert torch.equal(q.float(), q_ref.float())
    # the largest element of every non-zero group lands on +-448 (the scale is that group's amax / 448)
    kb = s.shape[1]
    padded = torch.zeros(m, kb * group, device=DEVICE)
    padded[:, :k] = q.float()
    group_max = padded.view(m, kb, group).abs().amax(dim=-1)
    nonzero = s > ref.ACT_EPS / 448 * 1.5
    assert (group_max[nonzero] == 448).all() and (group_max[~nonzero] == 0).all()


@pytest.mark.parametrize("m, n, k, row_div, bias", [
    (1, 64, 128, 128, False),    # decode row, one K block
    (5, 200, 300, 128, True),    # partial N and K blocks, bias
    (17, 96, 256, 1, False),     # per-row weight scales
    (33, 130, 384, 128, False),  # several M tiles
])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_block_gemm_matches_reference(m, n, k, row_div, bias, out_dtype):
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE)
    w_q, w_s = ref.quantize_weight_blockwise(w, (128, 128))
    if row_div == 1:
        w_s = w_s.repeat_interleave(128, dim=0)[:n].contiguous()
    b = torch.randn(n, generator=g).to(DEVICE) if bias else None
    a_q, a_s = ref.per_token_group_quant_fp8_torch(x, 128)
    out = tk.fp8_block_gemm(a_q, a_s, w_q, w_s, (128, 128), row_div, out_dtype, b)
    expect = ref.fp8_block_gemm_torch(a_q, a_s, w_q, w_s, (128, 128), row_div, torch.float32, b)
    assert out.dtype == out_dtype and out.shape == (m, n)
    # float32: only the summation order differs (interpreter); Hopper's FP8 MMA accumulates in
    # reduced precision within each 128-wide K block (~1e-3). bf16: one rounding (the
    # interpreter truncates)
    tol = (2e-3 if DEVICE == "cuda" else 1e-5) if out_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), expect, rtol=tol, atol=tol * expect.abs().max().item())
    # and the whole linear (Triton quant + GEMM) is W8A8: a few % of the float32 product
    y = tk.fp8_linear(x, w_q, w_s, (128, 128), row_div, b)
    exact = x @ w.t() + (b if bias else 0)
    assert relative_error(y.float(), exact) < 0.1


def test_fp8_block_gemm_empty_batch():
    w_q, w_s = ref.quantize_weight_blockwise(torch.randn(64, 128), (128, 128))
    a_q, a_s = tk.per_token_group_quant_fp8(torch.zeros(0, 128, device=DEVICE), 128)
    assert tk.fp8_block_gemm(a_q, a_s, w_q.to(DEVICE), w_s.to(DEVICE), (128, 128), 128, torch.float32).shape == (0, 64)


def _fp8_experts(e, h, i, block, seed):
    """Stacked FP8 experts quantised per expert projection as checkpoints store them; gate/up
    scale rows in the layout Fp8FusedMoE uses (per row when I is not a multiple of the block)."""
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(e, i, h, generator=g) / h ** 0.5, torch.randn(e, i, h, generator=g) / h ** 0.5
    w2 = torch.randn(e, h, i, generator=g) / i ** 0.5
    row_div = block[0] if i % block[0] == 0 else 1
    qs = [ref.quantize_weight_blockwise(w, block) for w in (gate, up, w2)]
    w13 = torch.cat([qs[0][0], qs[1][0]], dim=1)
    if row_div == 1:
        s13 = torch.cat([s.repeat_interleave(block[0], dim=1)[:, :i] for s in (qs[0][1], qs[1][1])], dim=1)
    else:
        s13 = torch.cat([qs[0][1], qs[1][1]], dim=1)
    return w13, s13, qs[2][0], qs[2][1], row_div


@pytest.mark.parametrize("t, e, k, h, i, block", [
    (1, 4, 2, 64, 24, (128, 128)),     # decode, one partial block, per-row gate/up scales
    (33, 8, 2, 256, 160, (128, 128)),  # several K blocks, I not a block multiple
    (17, 4, 3, 96, 64, (32, 32)),      # block-shared gate/up scales (I = 2 blocks)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_fp8_matches_reference(t, e, k, h, i, block, dtype):
    from dlengine.kernels.moe.fused_moe_fp8_triton import fused_experts_fp8_triton

    w13, s13, w2, s2, row_div = _fp8_experts(e, h, i, block, seed=t + e + h)
    g = torch.Generator().manual_seed(t)
    x = torch.randn(t, h, generator=g).to(dtype)
    probs = torch.softmax(torch.randn(t, e, generator=g), dim=-1)
    tw, ti = torch.topk(probs, k, dim=-1)
    tw = tw / tw.sum(-1, keepdim=True)
    args = [a.to(DEVICE) for a in (x, w13, s13, w2, s2)]
    out = fused_experts_fp8_triton(*args, block, row_div, tw.to(DEVICE), ti.to(DEVICE))
    expect = ref.fused_experts_fp8_torch(*args, block, row_div, tw.to(DEVICE), ti.to(DEVICE))
    assert out.dtype == dtype and not torch.isnan(out).any()
    # float32: summation order only. bf16: the interpreter truncates the rounded gate/up, and an
    # ulp there can move an intermediate across an e4m3 rounding boundary (one e4m3 step, 6%)
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    assert relative_error(out.float(), expect.float()) < tol
    # W8A8 stays close to the float32 experts on the dequantised weights
    from dlengine.kernels.moe.fused_moe_torch import fused_experts_torch

    deq13 = ref.dequantize_weight(w13, s13, block[1], row_div, torch.float32)
    deq2 = ref.dequantize_weight(w2, s2, block[1], block[0], torch.float32)
    exact = fused_experts_torch(x.float(), deq13, deq2, tw, ti)
    assert relative_error(out.float().cpu(), exact) < 0.1


def test_fused_3d_expert_tensors_load(tmp_path):
    """Experts stored as fused 3-D tensors (transformers 5's layout: experts.gate_up_proj [E, 2I, H]
    and experts.down_proj [E, H, I], each with `<name>_scale_inv` over its own 128-row blocks) load
    in both modes; dequantised they are exactly the blockwise products."""
    tensors = load_file(os.path.join(fp8_path(), "model.safetensors"))
    src = load_file(os.path.join(tiny_checkpoint("deepseek-v3"), "model.safetensors"))
    fused, expect = {}, {}
    for name, t in tensors.items():
        if ".mlp.experts." not in name:
            fused[name] = t
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp.experts"
        gate_up = torch.stack([torch.cat([src[f"{p}.{e}.gate_proj.weight"], src[f"{p}.{e}.up_proj.weight"]])
                               for e in range(8)])
        down = torch.stack([src[f"{p}.{e}.down_proj.weight"] for e in range(8)])
        for hf, w, ours in (("gate_up_proj", gate_up, "w13_weight"), ("down_proj", down, "w2_weight")):
            q, s = ref.quantize_weight_blockwise(w, (128, 128))
            fused[f"{p}.{hf}"], fused[f"{p}.{hf}_scale_inv"] = q, s
            expect[f"{p}.{ours}"] = ref.dequantize_weight(q, s, 128, 128, torch.float32)
    out = copy_checkpoint(fp8_path(), str(tmp_path / "fused"), fused)
    deq = EngineBuilder(out).dtype("float32").quantization("dequant").build()
    params = dict(deq.model.named_parameters())
    for name, w in expect.items():
        torch.testing.assert_close(params[name], w, rtol=0, atol=0)
    fp8 = EngineBuilder(out).dtype("float32").quantization("fp8").build()
    moe = fp8.model.model.layers[2].mlp.experts
    torch.testing.assert_close(ref.dequantize_weight(moe.w13_weight, moe.w13_weight_scale_inv, 128, moe.w13_row_div,
                                                     torch.float32), expect["model.layers.2.mlp.experts.w13_weight"])
    assert torch.isfinite(fp8.prompt_logits(PROMPTS[3])).all()
