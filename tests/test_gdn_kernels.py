"""Gated DeltaNet torch references: the chunk-wise and recurrent gated delta rule against a
token-by-token loop and against transformers' own functions; the causal conv1d with a saved window
against a whole-sequence convolution; varlen batches continuing from saved states (a prompt split
across steps gives what one pass gives)."""

import pytest
import torch
import torch.nn.functional as F

from dlengine.kernels.gdn.causal_conv1d_torch import causal_conv1d_update, causal_conv1d_varlen
from dlengine.kernels.gdn.gated_delta_rule_torch import (chunk_gated_delta_rule, gated_delta_rule_naive,
                                                         gated_delta_rule_varlen, prepare_qk,
                                                         recurrent_gated_delta_rule_update)

HK, HV, DK, DV = 2, 4, 8, 6


def inputs(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, HK, DK, generator=g)
    k = torch.randn(L, HK, DK, generator=g)
    v = torch.randn(L, HV, DV, generator=g)
    decay = -torch.rand(L, HV, generator=g) * 0.5  # log-decay <= 0
    beta = torch.rand(L, HV, generator=g)
    return q, k, v, decay, beta


def close(a, b, tol=1e-5):
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("L,chunk", [(1, 64), (5, 4), (37, 16), (130, 64)])
def test_chunk_form_matches_token_loop(L, chunk):
    q, k, v, g, beta = inputs(L)
    qp, kp = prepare_qk(q, k, HV, True)
    s0 = torch.randn(HV, DK, DV)
    for init in (None, s0):
        ref_out, ref_state = gated_delta_rule_naive(qp, kp, v, g, beta, init)
        out, state = chunk_gated_delta_rule(qp, kp, v, g, beta, init, chunk_size=chunk)
        close(out, ref_out)
        close(state, ref_state)


def test_varlen_continues_from_saved_state():
    """Three requests in one batch; then each request's tokens split over two steps (the second
    resuming from the slot the first left) give the same outputs and final states."""
    lens = [7, 1, 40]
    q, k, v, g, beta = inputs(sum(lens), seed=1)
    slots = [2, 0, 1]
    states = torch.full((3, HV, DK, DV), float("nan"))  # a fresh request must not read its slot
    whole = gated_delta_rule_varlen(q, k, v, g, beta, states, lens, slots, [False] * 3, chunk_size=16)
    split_states = torch.full_like(states, float("nan"))
    firsts, seconds = [3, 1, 25], [4, 0, 15]
    starts = [0, 7, 8]
    outs = []
    for parts, offset, resume in ((firsts, [0, 0, 0], [False] * 3), (seconds, firsts, [True] * 3)):
        keep = [i for i, n in enumerate(parts) if n]
        args = [torch.cat([x[starts[i] + offset[i]:starts[i] + offset[i] + parts[i]] for i in keep])
                for x in (q, k, v, g, beta)]
        outs.append(gated_delta_rule_varlen(*args, split_states, [parts[i] for i in keep], [slots[i] for i in keep],
                                            [resume[i] for i in keep], chunk_size=16))
    for i in range(3):
        a = torch.cat([outs[0][sum(firsts[:i]):sum(firsts[:i + 1])],
                       outs[1][sum(seconds[:i]):sum(seconds[:i + 1])]])
        close(a, whole[starts[i]:starts[i] + lens[i]])
        close(split_states[slots[i]], states[slots[i]])


def test_recurrent_update_matches_token_loop():
    B = 3
    q, k, v, g, beta = inputs(B, seed=2)
    states = torch.randn(4, HV, DK, DV)
    slots = torch.tensor([3, 0, 2])
    resume = torch.tensor([True, False, True])
    before = states.clone()
    out = recurrent_gated_delta_rule_update(q, k, v, g, beta, states, slots, resume)
    qp, kp = prepare_qk(q, k, HV, True)
    for b in range(B):
        init = before[slots[b]] if resume[b] else None
        ref_out, ref_state = gated_delta_rule_naive(qp[b:b + 1], kp[b:b + 1], v[b:b + 1], g[b:b + 1], beta[b:b + 1], init)
        close(out[b], ref_out[0])
        close(states[slots[b]], ref_state)
    close(states[1], before[1], tol=0)  # an unused slot is untouched


def test_matches_transformers_functions():
    from transformers.models.qwen3_next.modeling_qwen3_next import (torch_chunk_gated_delta_rule,
                                                                    torch_recurrent_gated_delta_rule)
    L = 70
    q, k, v, g, beta = inputs(L, seed=3)
    s0 = torch.randn(1, HV, DK, DV)
    ref, ref_state = torch_chunk_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None], initial_state=s0,
                                                  output_final_state=True, use_qk_l2norm_in_kernel=True)
    states = s0.clone()
    out = gated_delta_rule_varlen(q, k, v, g, beta, states, [L], [0], [True])
    close(out, ref[0])
    close(states[0], ref_state[0])
    one, one_state = torch_recurrent_gated_delta_rule(q[None, :1], k[None, :1], v[None, :1], g[None, :1],
                                                      beta[None, :1], initial_state=s0, output_final_state=True,
                                                      use_qk_l2norm_in_kernel=True)
    states = s0.clone()
    out = recurrent_gated_delta_rule_update(q[:1], k[:1], v[:1], g[:1], beta[:1], states, torch.tensor([0]),
                                            torch.tensor([True]))
    close(out, one[0])
    close(states[0], one_state[0])


# ------------------------------------------------------------------------- causal conv1d
D, K = 10, 4


def test_conv1d_varlen_split_equals_whole_sequence():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(D, K, generator=g)
    x = torch.randn(23, D, generator=g)
    ref = F.silu(F.conv1d(x.t()[None], w[:, None], padding=K - 1, groups=D)[0, :, :23]).t()
    states = torch.full((2, D, K - 1), float("nan"))
    out = []
    # chunks of 2 (shorter than the window), then 1, then 20: each resumes the saved window
    for i, (a, b) in enumerate(((0, 2), (2, 3), (3, 23))):
        out.append(causal_conv1d_varlen(x[a:b], w, states, [b - a], [1], [i > 0]))
    close(torch.cat(out), ref)
    close(states[1], x[-(K - 1):].t())


def test_conv1d_update_matches_transformers():
    from transformers.models.mamba.modeling_mamba import causal_conv1d_update as hf_update
    g = torch.Generator().manual_seed(5)
    w = torch.randn(D, K, generator=g)
    x = torch.randn(3, D, generator=g)
    states = torch.randn(5, D, K - 1, generator=g)
    slots = torch.tensor([4, 1, 0])
    hf_state = torch.cat([torch.zeros(3, D, 1), states[slots]], dim=-1)  # transformers keeps K inputs
    hf_state[1] = 0  # the second request starts fresh
    ref = hf_update(x[..., None], hf_state, w, None, activation="silu")[..., 0]
    out = causal_conv1d_update(x, w, states, slots, torch.tensor([True, False, True]))
    close(out, ref)
    close(states[slots], hf_state[..., 1:])


# ------------------------------------------------------------------------- Triton kernels (interpreter on CPU)
# Each Triton kernel against its torch reference at tiny sizes, checkpoints included (the state
# before a token inside the step, saved in another slot: prefix caching's block boundaries).
from dlengine.kernels.gdn import causal_conv1d_torch, causal_conv1d_triton  # noqa: E402
from dlengine.kernels.gdn import gated_delta_rule_torch, gated_delta_rule_triton  # noqa: E402

VARLEN = dict(lens=[7, 1, 2, 40], slots=[3, 0, 2, 1], resume=[True, False, True, True],
              ckpt_slots=[4, -1, -1, 5], ckpt_offsets=[3, 0, 0, 17])


def _nan_fresh(states, slots, resume):
    """Fresh requests' slots hold NaN: a kernel that reads them instead of zeros shows it."""
    for s, r in zip(slots, resume):
        if not r:
            states[s] = float("nan")
    return states


@pytest.mark.parametrize("checkpoints", [False, True])
def test_triton_conv1d_varlen_matches_reference(checkpoints):
    v = VARLEN
    g = torch.Generator().manual_seed(6)
    d = 40  # not a multiple of the kernel's channel block
    x, w, b = torch.randn(sum(v["lens"]), d, generator=g), torch.randn(d, K, generator=g), torch.randn(d, generator=g)
    states = _nan_fresh(torch.randn(6, d, K - 1, generator=g), v["slots"], v["resume"])
    ck = dict(checkpoint_slots=v["ckpt_slots"], checkpoint_offsets=v["ckpt_offsets"]) if checkpoints else {}
    s_ref, s_tri = states.clone(), states.clone()
    ref = causal_conv1d_torch.causal_conv1d_varlen(x, w, s_ref, v["lens"], v["slots"], v["resume"], b, **ck)
    out = causal_conv1d_triton.causal_conv1d_varlen(x, w, s_tri, v["lens"], v["slots"], v["resume"], b, **ck)
    close(out, ref)
    assert torch.equal(s_tri.isnan(), s_ref.isnan())
    close(s_tri.nan_to_num(), s_ref.nan_to_num())


def test_triton_conv1d_update_matches_reference_and_skips_padding():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(D, K, generator=g)
    x = torch.randn(4, D, generator=g)
    states = torch.randn(5, D, K - 1, generator=g)
    slots = torch.tensor([4, 1, -1, 0])  # row 2: a padded row of a captured batch
    resume = torch.tensor([True, False, True, True])
    keep = [0, 1, 3]
    s_ref, s_tri = states.clone(), states.clone()
    ref = causal_conv1d_torch.causal_conv1d_update(x[keep], w, s_ref, slots[keep], resume[keep])
    out = causal_conv1d_triton.causal_conv1d_update(x, w, s_tri, slots, resume)
    close(out[keep], ref)
    close(s_tri, s_ref)


@pytest.mark.parametrize("checkpoints", [False, True])
@pytest.mark.parametrize("chunk", [16, 32])
def test_triton_chunk_gated_delta_rule_matches_reference(chunk, checkpoints):
    v = VARLEN
    q, k, val, g, beta = inputs(sum(v["lens"]), seed=8)
    states = _nan_fresh(torch.randn(6, HV, DK, DV), v["slots"], v["resume"])
    ck = dict(checkpoint_slots=v["ckpt_slots"], checkpoint_offsets=v["ckpt_offsets"]) if checkpoints else {}
    s_ref, s_tri = states.clone(), states.clone()
    ref = gated_delta_rule_torch.gated_delta_rule_varlen(q, k, val, g, beta, s_ref, v["lens"], v["slots"], v["resume"],
                                                         chunk_size=chunk, **ck)
    out = gated_delta_rule_triton.gated_delta_rule_varlen(q, k, val, g, beta, s_tri, v["lens"], v["slots"],
                                                          v["resume"], chunk_size=chunk, **ck)
    close(out, ref)
    assert torch.equal(s_tri.isnan(), s_ref.isnan())
    close(s_tri.nan_to_num(), s_ref.nan_to_num())


def test_checkpoint_equals_state_of_a_split_step():
    """The checkpoint a step saves at offset p is the state a step ending at p would leave."""
    q, k, val, g, beta = inputs(30, seed=9)
    for mod in (gated_delta_rule_torch, gated_delta_rule_triton):
        states = torch.zeros(3, HV, DK, DV)
        mod.gated_delta_rule_varlen(q, k, val, g, beta, states, [30], [0], [False], chunk_size=16,
                                    checkpoint_slots=[2], checkpoint_offsets=[11])
        split = torch.zeros(3, HV, DK, DV)
        mod.gated_delta_rule_varlen(q[:11], k[:11], val[:11], g[:11], beta[:11], split, [11], [1], [False],
                                    chunk_size=16)
        close(states[2], split[1])
    x, w = torch.randn(30, D), torch.randn(D, K)
    for mod in (causal_conv1d_torch, causal_conv1d_triton):
        conv = torch.zeros(3, D, K - 1)
        mod.causal_conv1d_varlen(x, w, conv, [30], [0], [False], checkpoint_slots=[2], checkpoint_offsets=[2])
        split = torch.zeros(3, D, K - 1)
        mod.causal_conv1d_varlen(x[:2], w, split, [2], [1], [False])
        close(conv[2], split[1])


def test_triton_recurrent_update_matches_reference_and_skips_padding():
    q, k, val, g, beta = inputs(4, seed=10)
    states = torch.randn(5, HV, DK, DV)
    slots = torch.tensor([3, 0, -1, 1])
    resume = torch.tensor([True, False, True, True])
    keep = [0, 1, 3]
    s_ref, s_tri = states.clone(), states.clone()
    ref = gated_delta_rule_torch.recurrent_gated_delta_rule_update(q[keep], k[keep], val[keep], g[keep], beta[keep],
                                                                   s_ref, slots[keep], resume[keep])
    out = gated_delta_rule_triton.recurrent_gated_delta_rule_update(q, k, val, g, beta, s_tri, slots, resume)
    close(out[keep], ref)
    close(s_tri, s_ref)


# ------------------------------------------------------------------------- padded rows (CUDA-graph batches)
# A captured decode graph pads its batch with rows whose state slot is PAD_STATE_SLOT: every decode
# kernel (torch reference and Triton) must leave every slot as it was for them, output zeros there,
# and give the live rows exactly what a batch without the padding gives.
from dlengine.kernels.context import PAD_STATE_SLOT  # noqa: E402

PAD = PAD_STATE_SLOT
# live rows use slot 0 (the slot a padded row of the torch reference rewrites) and the last slot
# (what a plain states[-1] index would hit); the all-padding batch is what a graph capture runs
PAD_CASES = {"mixed": ([0, PAD, 4, PAD, 2], [True, True, False, False, True]),
             "padding-first": ([PAD, PAD, 0, 4], [False, True, True, True]),
             "all-padding": ([PAD, PAD, PAD], [False, True, False])}


def _live(slots):
    return [i for i, s in enumerate(slots) if s >= 0]


@pytest.mark.parametrize("case", list(PAD_CASES))
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_conv1d_update_padded_rows_touch_no_state(case, impl):
    mod = {"torch": causal_conv1d_torch, "triton": causal_conv1d_triton}[impl]
    slots, resume = PAD_CASES[case]
    g = torch.Generator().manual_seed(11)
    w = torch.randn(D, K, generator=g)
    x = torch.randn(len(slots), D, generator=g)
    states = torch.randn(5, D, K - 1, generator=g)
    keep = _live(slots)
    s_pad, s_live = states.clone(), states.clone()
    out = mod.causal_conv1d_update(x, w, s_pad, torch.tensor(slots), torch.tensor(resume))
    assert torch.equal(out[[i for i in range(len(slots)) if i not in keep]], torch.zeros(len(slots) - len(keep), D))
    if keep:
        ref = causal_conv1d_torch.causal_conv1d_update(x[keep], w, s_live, torch.tensor(slots)[keep],
                                                       torch.tensor(resume)[keep])
        close(out[keep], ref)
    untouched = [s for s in range(5) if s not in slots]
    assert torch.equal(s_pad[untouched], states[untouched])  # bit for bit
    close(s_pad, s_live)
    if impl == "torch":
        assert torch.equal(s_pad, s_live)


@pytest.mark.parametrize("case", list(PAD_CASES))
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_recurrent_update_padded_rows_touch_no_state(case, impl):
    mod = {"torch": gated_delta_rule_torch, "triton": gated_delta_rule_triton}[impl]
    slots, resume = PAD_CASES[case]
    q, k, val, g, beta = inputs(len(slots), seed=12)
    states = torch.randn(5, HV, DK, DV)
    keep = _live(slots)
    s_pad, s_live = states.clone(), states.clone()
    out = mod.recurrent_gated_delta_rule_update(q, k, val, g, beta, s_pad, torch.tensor(slots), torch.tensor(resume))
    pads = [i for i in range(len(slots)) if i not in keep]
    assert torch.equal(out[pads], torch.zeros(len(pads), HV, DV))
    if keep:
        ref = gated_delta_rule_torch.recurrent_gated_delta_rule_update(
            q[keep], k[keep], val[keep], g[keep], beta[keep], s_live, torch.tensor(slots)[keep],
            torch.tensor(resume)[keep])
        close(out[keep], ref)
    untouched = [s for s in range(5) if s not in slots]
    assert torch.equal(s_pad[untouched], states[untouched])
    close(s_pad, s_live)
    if impl == "torch":
        assert torch.equal(s_pad, s_live)


def test_padded_rows_never_read_their_slot():
    """A padded row reads zeros, not slot 0 or the last slot: NaN-filled slots stay out of the
    live rows' outputs and states (torch reference and Triton)."""
    slots, resume = torch.tensor([PAD, 1, PAD]), torch.tensor([True, True, True])
    q, k, val, g, beta = inputs(3, seed=13)
    x, w = torch.randn(3, D), torch.randn(D, K)
    for conv_mod, gdr_mod in ((causal_conv1d_torch, gated_delta_rule_torch),
                              (causal_conv1d_triton, gated_delta_rule_triton)):
        conv = torch.randn(3, D, K - 1)
        conv[0], conv[2] = float("nan"), float("nan")
        ssm = torch.randn(3, HV, DK, DV)
        ssm[0], ssm[2] = float("nan"), float("nan")
        y = conv_mod.causal_conv1d_update(x, w, conv, slots, resume)
        o = gdr_mod.recurrent_gated_delta_rule_update(q, k, val, g, beta, ssm, slots, resume)
        assert not y.isnan().any() and not o.isnan().any()
        assert not conv[1].isnan().any() and not ssm[1].isnan().any()
        assert conv[0].isnan().all() and ssm[2].isnan().all()  # untouched
