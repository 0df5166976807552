"""FP8 checkpoints under tensor parallelism and attention-DP x expert parallelism (CPU, gloo, 2
processes): greedy tokens of tiny-deepseek-v3-fp8 equal the single-process engine's in the same
quantization mode, "dequant" and "fp8". In the tiny model every tensor-parallel shard boundary
falls inside a 128-block (q_b_proj rows 48 of 96, o_proj columns 32 of 64, expert intermediate
12 of 24), so these runs go through the per-row scales and the whole-block column windows of
fp8_shards.py; the in-process tests check those pieces one rank at a time against the full
layer, on multi-block weights.

Each parallel engine is built once per module and shared by its assertions."""

import pytest
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.kernels import fp8_torch as ref
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
