"""Single-process checks of the parallel building blocks: shard arithmetic of the TP layers
(simulated ranks: every rank's shard computed in this process and put back together equals the
unsharded layer, incl. kv heads replicated when num_kv_heads < tp), expert placement maps, and
least-loaded request assignment."""

import pytest
import torch
import torch.nn.functional as F

from dlengine.config import ConfigError, ParallelConfig
from dlengine.engine.request import Request
from dlengine.models.layers.parallel_linear import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                                                    RowParallelLinear, VocabParallelEmbedding, kv_heads_per_rank)
from dlengine.parallel import ExpertPlacement, assign_least_loaded, make_placement
from dlengine.parallel.state import ParallelState, parallel_state
from dlengine.sampling_params import SamplingParams


def on_rank(rank: int, tp: int, make):
    """Construct a layer as TP rank `rank` of `tp` would (no process group: shapes and loading only)."""
    with parallel_state(ParallelState(world_size=tp, rank=rank, tp_size=tp, tp_rank=rank)):
        return make()


@pytest.mark.parametrize("tp", [2, 4])
def test_qkv_shards_give_each_rank_its_heads_and_their_kv_head(tp):
    h, hkv, d, hidden = 4, 2, 3, 8  # tp=4 > hkv=2: each kv head is replicated on two ranks
    g = torch.Generator().manual_seed(0)
    wq, wk, wv = (torch.randn(n * d, hidden, generator=g) for n in (h, hkv, hkv))
    x = torch.randn(5, hidden, generator=g)
    q_full = (x @ wq.T).view(5, h, d)
    k_full, v_full = (x @ wk.T).view(5, hkv, d), (x @ wv.T).view(5, hkv, d)
    q_heads = []
    for r in range(tp):
        layer = on_rank(r, tp, lambda: QKVParallelLinear(hidden, d, h, hkv))
        for name, w in (("q", wq), ("k", wk), ("v", wv)):
            layer.weight.weight_loader(layer.weight, w, name)
        assert layer.num_kv_heads == kv_heads_per_rank(hkv, tp) == max(1, hkv // tp)
        q, k, v = layer(x).split([layer.num_heads * d, layer.num_kv_heads * d, layer.num_kv_heads * d], dim=-1)
        q = q.view(5, layer.num_heads, d)
        q_heads.append(q)
        # the kv head(s) a rank holds are the ones its q heads attend with (GQA group = h // hkv)
        for j in range(layer.num_heads):
            global_q = r * layer.num_heads + j
            kv = global_q // (h // hkv)
            local_kv = j * layer.num_kv_heads // layer.num_heads
            torch.testing.assert_close(k.view(5, -1, d)[:, local_kv], k_full[:, kv])
            torch.testing.assert_close(v.view(5, -1, d)[:, local_kv], v_full[:, kv])
    torch.testing.assert_close(torch.cat(q_heads, dim=1), q_full)


def test_kv_heads_that_cannot_be_split_or_replicated_are_refused():
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        kv_heads_per_rank(3, 4)
    with pytest.raises(ConfigError, match="not divisible"):
        kv_heads_per_rank(6, 4)


def test_column_then_row_parallel_sums_to_the_full_mlp():
    hidden, inter, tp = 8, 12, 2
    g = torch.Generator().manual_seed(1)
    wg, wu, wd = torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g), torch.randn(hidden, inter, generator=g)
    bias = torch.randn(hidden, generator=g)
    x = torch.randn(3, hidden, generator=g)
    full = F.linear(F.silu(x @ wg.T) * (x @ wu.T), wd, bias)
    parts = []
    for r in range(tp):
        up = on_rank(r, tp, lambda: MergedColumnParallelLinear(hidden, [inter, inter], ["gate", "up"]))
        up.weight.weight_loader(up.weight, wg, "gate")
        up.weight.weight_loader(up.weight, wu, "up")
        down = on_rank(r, tp, lambda: RowParallelLinear(inter, hidden, bias=True))
        down.weight.weight_loader(down.weight, wd)
        down.bias.weight_loader(down.bias, bias)
        gate, u = up(x).chunk(2, dim=-1)
        parts.append(F.linear(F.silu(gate) * u, down.weight))  # the partial the all-reduce sums
    torch.testing.assert_close(sum(parts) + bias, full)


def test_vocab_parallel_embedding_and_head_pad_and_trim():
    vocab, dim, tp = 11, 4, 2  # 11 rows: rank 1 holds 5 real rows and one padding row
    w = torch.randn(vocab, dim)
    ids = torch.tensor([0, 5, 6, 10])
    emb, logits = torch.zeros(4, dim), []
    h = torch.randn(2, dim)
    for r in range(tp):
        e = on_rank(r, tp, lambda: VocabParallelEmbedding(vocab, dim))
        e.weight.weight_loader(e.weight, w)
        inside = (ids >= e.start) & (ids < e.end)
        emb += F.embedding(torch.where(inside, ids - e.start, 0), e.weight) * inside.unsqueeze(-1)
        head = on_rank(r, tp, lambda: ParallelLMHead(dim, vocab))
        head.weight.weight_loader(head.weight, w)
        logits.append(F.linear(h, head.weight))
    assert torch.equal(emb, w[ids])
    torch.testing.assert_close(torch.cat(logits, dim=-1)[:, :vocab], h @ w.T)


def test_expert_placements_are_maps_from_logical_expert_to_rank_and_slot():
    c = make_placement("contiguous", 8, 2)
    assert c.slots == [[0, 1, 2, 3], [4, 5, 6, 7]]
    rr = make_placement("round_robin", 8, 2)
    assert rr.slots == [[0, 2, 4, 6], [1, 3, 5, 7]]
    rank, slot = rr.route(torch.tensor([[5, 2]]))
    assert rank.tolist() == [[1, 0]] and slot.tolist() == [[2, 1]]
    # any table works: e.g. a hand-made one that keeps the hot experts apart
    custom = ExpertPlacement(4, 2, rank_of=(0, 0, 1, 1), slot_of=(1, 0, 0, 1))
    assert custom.slots_of(0) == [1, 0]
    with pytest.raises(ConfigError, match="evenly"):
        make_placement("contiguous", 6, 4)
    with pytest.raises(ConfigError, match="unknown expert placement"):
        make_placement("nope", 8, 2)


def test_least_loaded_assignment():
    reqs = [Request(f"r{i}", list(range(n)), SamplingParams(max_tokens=4)) for i, n in enumerate([50, 3, 7, 9, 1])]
    shares = assign_least_loaded(reqs, 2)
    # equal counts go to the rank with fewer tokens (prompt + max_tokens): r0 is long
    assert [[r.request_id for r in s] for s in shares] == [["r0", "r3"], ["r1", "r2", "r4"]]
    shares = assign_least_loaded(reqs[:1], 2, loads=[1, 0])  # rank 0 already busier
    assert [len(s) for s in shares] == [0, 1]


def test_parallel_config_names_what_is_supported():
    ParallelConfig(tp=2).validate()
    ParallelConfig(attention_dp=4, ffn_ep=4).validate()
    ParallelConfig(attention_dp=2).validate()
    with pytest.raises(ConfigError, match="tp=N"):
        ParallelConfig(tp=2, attention_dp=2).validate()
    with pytest.raises(ConfigError, match="integer >= 1"):
        ParallelConfig(tp=0).validate()
    with pytest.raises(ConfigError, match="unknown expert_placement"):
        ParallelConfig(attention_dp=2, ffn_ep=2, expert_placement="random").validate()


def _fused_copy(path: str, out: str) -> str:
    """The checkpoint with its per-expert tensors stacked into transformers 5's fused layout."""
    import glob
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    os.makedirs(out)
    for f in os.listdir(path):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(path, f), out)
    tensors = {}
    for f in glob.glob(os.path.join(path, "*.safetensors")):
        tensors.update(load_file(f))
    fused, experts = {}, {}
    for name, t in tensors.items():
        if ".mlp.experts." not in name:
            fused[name] = t
            continue
        prefix, rest = name.split(".mlp.experts.")
        e, proj, _ = rest.split(".")
        experts.setdefault(prefix, {}).setdefault(proj, {})[int(e)] = t
    for prefix, projs in experts.items():
        stack = {p: torch.stack([projs[p][e] for e in sorted(projs[p])]) for p in projs}
        fused[f"{prefix}.mlp.experts.gate_up_proj"] = torch.cat([stack["gate_proj"], stack["up_proj"]], 1).contiguous()
        fused[f"{prefix}.mlp.experts.down_proj"] = stack["down_proj"].contiguous()
    save_file(fused, os.path.join(out, "model.safetensors"))
    return out


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_ranks_load_their_shard_of_the_experts_from_the_full_checkpoint(layout, tmp_path):
    from dlengine.config import ModelConfig
    from dlengine.models.loader import load_weights
    from dlengine.models.qwen3_moe import Qwen3MoeForCausalLM
    from dlengine.testing import tiny_checkpoint

    path = tiny_checkpoint("qwen3-moe")
    if layout == "fused":
        path = _fused_copy(path, str(tmp_path / "fused"))
    cfg = ModelConfig.from_pretrained(path)

    def load(state):
        with parallel_state(state):
            model = Qwen3MoeForCausalLM(cfg, 64)
        load_weights(model, path)
        return model.model.layers[0].mlp.experts

    full = load(ParallelState())
    group = object()  # layers only keep the group for their forward, which does not run here
    for r in range(2):
        ep = load(ParallelState(world_size=2, rank=r, ep_size=2, ep_rank=r, ep_group=group,
                                expert_placement="round_robin"))
        assert ep.local_experts == [r, r + 2, r + 4, r + 6]
        assert torch.equal(ep.w13_weight, full.w13_weight[ep.local_experts])
        assert torch.equal(ep.w2_weight, full.w2_weight[ep.local_experts])
        tp = load(ParallelState(world_size=2, rank=r, tp_size=2, tp_rank=r, tp_group=group))
        i, li = full.intermediate_size, tp.local_intermediate
        assert torch.equal(tp.w13_weight[:, :li], full.w13_weight[:, r * li:(r + 1) * li])  # gate
        assert torch.equal(tp.w13_weight[:, li:], full.w13_weight[:, i + r * li:i + (r + 1) * li])  # up
        assert torch.equal(tp.w2_weight, full.w2_weight[:, :, r * li:(r + 1) * li])
