"""FP8 checkpoints under tensor parallelism and attention-DP x expert parallelism (CPU, gloo, 2
processes): greedy tokens of tiny-deepseek-v3-fp8 equal the single-process engine's in the same
quantization mode, "dequant" and "fp8". In the tiny model every tensor-parallel shard boundary
falls inside a 128-block (q_b_proj rows 48 of 96, o_proj columns 32 of 64, expert intermediate
12 of 24), so these runs go through the per-row scales and the whole-block column windows of
fp8_shards.py; the in-process tests check those pieces one rank at a time against the full
layer, on multi-block weights.

Each parallel engine is built once per module and shared by its assertions."""

import os

import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.kernels.fp8 import fp8_torch as ref
from dlengine.models.layers.fp8_linear import Fp8Linear
from dlengine.models.layers.fp8_shards import KWindow
from dlengine.models.layers.linear import Linear
from dlengine.models.layers.parallel_linear import Shard
from dlengine.parallel import ParallelEngine

from conftest import make_prompts

KIND = "tiny-deepseek-v3-fp8"
PROMPTS = make_prompts(4, lengths=(1, 5, 17, 64))
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def tokens(engine) -> list[tuple]:
    return [tuple(o.token_ids) for o in engine.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module", params=["dequant", "fp8"])
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def single(mode) -> list[tuple]:
    engine = EngineBuilder(KIND).dtype("float32").quantization(mode).build()
    try:
        return tokens(engine)
    finally:
        engine.close()


def _parallel(mode: str, **layout) -> ParallelEngine:
    engine = EngineBuilder(KIND).dtype("float32").quantization(mode).parallel(timeout_s=180, **layout).build()
    assert isinstance(engine, ParallelEngine) and engine.config.quantization == mode
    return engine


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(tp=2), dict(attention_dp=2, ffn_ep=2)], ids=["tp2", "dp2-ep2"])
def test_parallel_fp8_matches_single_process(mode, single, layout):
    engine = _parallel(mode, **layout)
    procs = engine.processes
    try:
        assert tokens(engine) == single
        # one request: under attention DP the other rank only joins the expert exchanges
        [one] = engine.generate([PROMPTS[2]], GREEDY)
        assert tuple(one.token_ids) == single[2]
    finally:
        engine.close()
    for p in procs:
        p.join(10)
    assert [p.exitcode for p in procs] == [0] * len(procs)


# --------------------------------------------------------------- one rank's shard, in process
BLOCK = (16, 16)


def _quantised(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q, s = ref.quantize_weight_blockwise(w, BLOCK)
    return q, s, ref.dequantize_weight(q, s, BLOCK[1], BLOCK[0], torch.float32)


def _loaded(rows: list[Shard], cols: KWindow, q: torch.Tensor, s: torch.Tensor) -> Fp8Linear:
    lin = Fp8Linear(Linear(cols.full, rows[0].full), BLOCK, rows, cols)
    for shard in rows:
        lin.weight.weight_loader(lin.weight, q, shard.name)
        lin.weight_scale_inv.weight_loader(lin.weight_scale_inv, s, shard.name)
    return lin


@pytest.mark.parametrize("n, tp", [(40, 2), (48, 3), (64, 2)])
def test_column_shards_take_their_rows_scales(n, tp):
    """Each rank's rows of a column-parallel FP8 layer (shard starts inside a block -> per-row
    scales) give that rank's rows of the full layer's W8A8 output and dequantised weight."""
    q, s, deq = _quantised(n, 40, seed=n)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    full = _loaded([Shard(None, n, 0, n)], KWindow.whole(40), q, s)(x)
    local = n // tp
    for r in range(tp):
        lin = _loaded([Shard(None, n, r * local, local)], KWindow.whole(40), q, s)
        assert lin.row_div == (BLOCK[0] if r * local % BLOCK[0] == 0 else 1)
        torch.testing.assert_close(lin(x), full[:, r * local : (r + 1) * local])
        lin.dequantize_(torch.float32)
        torch.testing.assert_close(lin.weight, deq[r * local : (r + 1) * local], rtol=0, atol=0)


@pytest.mark.parametrize("k, tp", [(40, 2), (48, 3), (64, 2)])
def test_row_shards_hold_whole_blocks(k, tp):
    """A row-parallel rank holds the whole 16-column blocks its columns touch, the others'
    columns zero: its W8A8 GEMM on the window of the full activation quantises the checkpoint's
    groups, so the ranks' partial outputs sum to the single-process output; dequantised, it keeps
    only its own columns."""
    q, s, deq = _quantised(24, k, seed=k)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(0))
    full = _loaded([Shard(None, 24, 0, 24)], KWindow.whole(k), q, s)(x)
    local, parts = k // tp, []
    for r in range(tp):
        cols = KWindow.around(k, r * local, local, BLOCK[1])
        assert cols.start % BLOCK[1] == 0 and cols.padded == (local % BLOCK[1] != 0)
        lin = _loaded([Shard(None, 24, 0, 24)], cols, q, s)
        parts.append(lin(x[:, cols.start : cols.start + cols.size]))
        lin.dequantize_(torch.float32)
        torch.testing.assert_close(lin.weight, deq[:, r * local : (r + 1) * local], rtol=0, atol=0)
    torch.testing.assert_close(sum(parts), full)


def _fused_fp8_copy(out: str) -> str:
    """tiny-deepseek-v3-fp8 with its experts as fused 3-D FP8 tensors (gate_up [E, 2I, H] and down
    [E, H, I], each quantised as one matrix per expert, 128-blocks spanning gate and up)."""
    from hf_reference import copy_checkpoint
    from safetensors.torch import load_file

    from dlengine.testing import tiny_checkpoint

    fp8 = load_file(os.path.join(tiny_checkpoint("deepseek-v3-fp8"), "model.safetensors"))
    src = load_file(os.path.join(tiny_checkpoint("deepseek-v3"), "model.safetensors"))
    fused = {n: t for n, t in fp8.items() if ".mlp.experts." not in n}
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp.experts"
        gate_up = torch.stack([torch.cat([src[f"{p}.{e}.gate_proj.weight"], src[f"{p}.{e}.up_proj.weight"]])
                               for e in range(8)])
        down = torch.stack([src[f"{p}.{e}.down_proj.weight"] for e in range(8)])
        for hf, w in (("gate_up_proj", gate_up), ("down_proj", down)):
            fused[f"{p}.{hf}"], fused[f"{p}.{hf}_scale_inv"] = ref.quantize_weight_blockwise(w, (128, 128))
    return copy_checkpoint(tiny_checkpoint("deepseek-v3-fp8"), out, fused)


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_ranks_load_their_fp8_experts(layout, tmp_path):
    """FP8 experts of one rank, from both checkpoint layouts: under EP its experts with their
    scales; under TP (intermediate 12 of 24, inside one 128-block) the whole block, the other
    rank's down columns zero, so the two ranks' FP8 outputs sum to the single-process layer's,
    and dequantised each keeps exactly its own columns."""
    from dlengine.config import ModelConfig
    from dlengine.models.deepseek_v3 import DeepseekV3ForCausalLM
    from dlengine.models.layers.fp8_linear import finish_fp8_load, prepare_fp8_model
    from dlengine.models.loader import load_weights
    from dlengine.parallel.state import ParallelState, parallel_state
    from dlengine.testing import tiny_checkpoint

    path = tiny_checkpoint("deepseek-v3-fp8") if layout == "per-expert" else _fused_fp8_copy(str(tmp_path / "f"))
    cfg = ModelConfig.from_pretrained(path)

    def load(state, mode="fp8"):
        with parallel_state(state):
            model = DeepseekV3ForCausalLM(cfg, 64)
        prepare_fp8_model(model, cfg.quantization)
        load_weights(model, path)
        finish_fp8_load(model, mode, torch.float32)
        return model.model.layers[1].mlp.experts

    full, full_deq = load(ParallelState()), load(ParallelState(), "dequant")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, full.hidden_size, generator=g)
    ids = torch.randint(0, 8, (6, 2), generator=g)
    weights = torch.rand(6, 2, generator=g)
    group = object()  # layers only keep the group for their collectives, which do not run here
    partial = []
    for r in range(2):
        ep = load(ParallelState(world_size=2, rank=r, ep_size=2, ep_rank=r, ep_group=group,
                                expert_placement="round_robin"))
        for name in ("w13_weight", "w13_weight_scale_inv", "w2_weight", "w2_weight_scale_inv"):
            assert torch.equal(getattr(ep, name).float(), getattr(full, name)[ep.local_experts].float()), name
        state = ParallelState(world_size=2, rank=r, tp_size=2, tp_rank=r, tp_group=group)
        tp = load(state)
        assert tp.w13_weight.shape == full.w13_weight.shape and tp.fp8_inter.padded  # the whole block
        partial.append(tp.run_experts(x, weights, ids))
        deq, i, li = load(state, "dequant"), full.intermediate_size, 12
        assert torch.equal(deq.w13_weight[:, :li], full_deq.w13_weight[:, r * li:(r + 1) * li])  # gate
        assert torch.equal(deq.w13_weight[:, li:], full_deq.w13_weight[:, i + r * li:i + (r + 1) * li])  # up
        assert torch.equal(deq.w2_weight, full_deq.w2_weight[:, :, r * li:(r + 1) * li])
    torch.testing.assert_close(partial[0] + partial[1], full.run_experts(x, weights, ids))
