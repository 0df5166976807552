"""Prefill-decode disaggregation of Gated DeltaNet hybrids (tiny Qwen3-Next, Qwen3.5): the
recurrent state after the prompt (conv window + delta-rule state) travels with the paged KV of the
full-attention layers (Qwen3.5-MoE too), over DLSlime's TCP transport on 127.0.0.1 (engines in this process).

Greedy tokens must equal a hybrid engine's for prompts of lengths 1..200, and afterwards every
block, state slot and staging slot is back on both sides; a pull that finds the prefill side's
pin released fails clearly and frees the decode side's slots."""

import time

import pytest

try:
    import dlslime  # noqa: F401
except ImportError as e:  # CI installs it (.ci/run); say why when it is not there
    pytest.skip(f"dlslime is not importable ({e}): pip install 'dlengine[dlslime]' and apt-get install libibverbs1",
                allow_module_level=True)

from dlengine import EngineBuilder, InvalidRequestError, SamplingParams
from dlengine.config import ConfigError
from dlengine.disagg import PDRouter
from dlengine.testing import tiny_checkpoint

from conftest import make_prompts

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
PROMPTS = make_prompts(6, lengths=(1, 2, 17, 31, 100, 200))


def build(kind, role, block_size=16, **transfer):
    b = EngineBuilder(tiny_checkpoint(kind)).dtype("float32").cache(block_size=block_size)
    b.scheduler(max_model_len=512)
    if role != "hybrid":
        b.role(role).transfer("dlslime", transport="tcp", **transfer)
    return b.build()


def assert_all_free(engine):
    """Every block and state slot back in the pool, and every staging block and state slot back."""
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.state_slots.num_free == bm.state_slots.num_slots
    assert not engine.scheduler.running and not engine.scheduler.waiting
    region = engine.connector.region
    assert region.num_free == region.layout.num_blocks
    assert region.num_free_state_slots == region.layout.num_state_slots


def step_until(engines, cond, timeout_s=60.0):
    """Step until cond(): bounded by time, not steps (a failed pull ends on a peer's notice or a
    timeout, however many idle steps that takes on a fast machine)."""
    outs = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return outs
        for e in engines:
            outs += e.step()
    raise AssertionError(f"condition not reached within {timeout_s}s")


@pytest.fixture(scope="module", params=["qwen3-next", "qwen3.5", "qwen3.5-moe"])
def pd(request):
    kind = request.param
    prefill, decode = build(kind, "prefill"), build(kind, "decode", block_size=8)
    yield kind, prefill, decode
    prefill.close()
    decode.close()


def test_state_migrates_with_kv(pd):
    """Prompt lengths around the conv window and block boundaries; the decode engine uses another
    block size. Its staging starts as NaN bit patterns, so an unpulled state byte would show."""
    kind, prefill, decode = pd
    expected = [o.token_ids for o in build(kind, "hybrid").generate(PROMPTS, GREEDY)]
    decode.connector.region.tensor.fill_(255)
    outs = PDRouter(prefill, decode).generate(PROMPTS, GREEDY)
    for i, (out, exp) in enumerate(zip(outs, expected)):
        assert out.error is None, out.error
        assert out.token_ids == exp, f"prompt {i} ({len(PROMPTS[i])} tokens)"
    step_until([prefill], lambda: not prefill.connector.pinned)
    assert_all_free(prefill)
    assert_all_free(decode)
    assert decode.connector.counts["pulled"] == len(PROMPTS)
    state_bytes = sum(g.slot_bytes for g in decode.connector.region.layout.state_groups)
    assert all(m.nbytes >= state_bytes for m in decode.connector.migrations[-len(PROMPTS):])


def test_prefill_released_before_pull_fails_and_frees(pd):
    kind, prefill, decode = pd
    [p] = prefill.generate([PROMPTS[4]], GREEDY)
    assert p.kv_transfer_params["state_slot"] >= 0
    assert prefill.abort(p.request_id)  # the pin is gone before the decode side reads
    assert_all_free(prefill)
    rid = decode.add_request(PROMPTS[4], GREEDY, kv_transfer_params=p.kv_transfer_params)
    outs = step_until([decode], lambda: not decode.has_unfinished_requests() and not decode.connector.active)
    [out] = [o for o in outs if o.request_id == rid and o.finished]
    assert out.finish_reason == "error" and "released the KV blocks" in out.error
    assert_all_free(decode)


def test_params_without_state_are_refused(pd):
    """A decode engine of a state model refuses params that carry no state slot (an older prefill
    engine's), before decoding from a zero state."""
    kind, prefill, decode = pd
    [p] = prefill.generate([PROMPTS[3]], GREEDY)
    with pytest.raises(InvalidRequestError, match="state_slot"):
        decode.add_request(PROMPTS[3], GREEDY, kv_transfer_params={**p.kv_transfer_params, "state_slot": -2})
    kv = {k: v for k, v in p.kv_transfer_params.items() if k != "state_slot"}
    rid = decode.add_request(PROMPTS[3], GREEDY, kv_transfer_params=kv)
    outs = step_until([decode, prefill], lambda: not decode.has_unfinished_requests() and not prefill.connector.pinned)
    [out] = [o for o in outs if o.request_id == rid and o.finished]
    assert out.finish_reason == "error" and "carry no recurrent state" in out.error
    assert_all_free(decode)
    assert_all_free(prefill)


def test_failed_pull_recomputes_from_a_fresh_state(pd):
    """on_pull_failure="recompute": the failed pull's request computes its prompt on the decode
    engine, from a zero state in a fresh slot, and still gives the hybrid engine's tokens."""
    kind, prefill, _ = pd
    decode = build(kind, "decode", on_pull_failure="recompute")
    try:
        expected = build(kind, "hybrid").generate([PROMPTS[5]], GREEDY)[0].token_ids
        [p] = prefill.generate([PROMPTS[5]], GREEDY)
        assert prefill.abort(p.request_id)
        rid = decode.add_request(PROMPTS[5], GREEDY, kv_transfer_params=p.kv_transfer_params)
        outs = step_until([decode], lambda: not decode.has_unfinished_requests() and not decode.connector.active)
        [out] = [o for o in outs if o.request_id == rid and o.finished]
        assert out.error is None and out.token_ids == expected
        assert decode.connector.counts["recomputed"] == 1
        assert_all_free(decode)
    finally:
        decode.close()


def test_direct_cache_registration_is_refused_for_state_models():
    with pytest.raises(ConfigError, match="staging_blocks=0"):
        build("qwen3-next", "prefill", staging_blocks=0)
