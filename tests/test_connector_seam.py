"""A KV connector of the user's own, through `EngineBuilder.kv_connector(factory)`: prefill and
decode engines in one process hand KV over by copying cache blocks (no transport). Decoded
tokens equal one hybrid engine's, the scheduler's waiting-for-remote-KV state is used, and both
pools end full."""

import pytest
import torch

from dlengine import EngineBuilder, InvalidRequestError, SamplingParams
from dlengine.engine.request import RequestStatus
from dlengine.engine.seams import PollResult

from conftest import make_prompts

PROMPTS = make_prompts(5, lengths=(1, 5, 17, 40, 100))
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


class Mailbox:
    """What the prefill side left for the decode side: per key, the prompt's KV per layer."""

    def __init__(self):
        self.items = {}


class CopyPrefill:
    name = "prefill"

    def __init__(self, mailbox, kv_cache, block_manager, config):
        self.mailbox, self.kv_cache, self.config = mailbox, kv_cache, config

    def on_add(self, request):
        request.remote_max_tokens = request.params.max_tokens
        request.params = type(request.params)(**{**request.params.__dict__, "max_tokens": 1})

    def num_external_tokens(self, request):
        return 0

    def on_allocated(self, request, n):
        return True

    def poll(self):
        return PollResult()

    def on_finish(self, request, reason):
        if reason != "length" or not request.remote_max_tokens:
            return reason
        n, bs = request.num_prompt_tokens, self.kv_cache.block_size
        rows = torch.tensor([request.block_ids[t // bs] * bs + t % bs for t in range(n)])
        kv = [(k.flatten(0, 1)[rows].clone(), v.flatten(0, 1)[rows].clone()) for k, v in self.kv_cache.layers]
        key = f"kv-{len(self.mailbox.items)}"
        self.mailbox.items[key] = (kv, request.output_token_ids[0])
        request.kv_transfer_params = {"key": key}
        return "kv_transfer"

    def abort(self, request_id):
        return False

    def describe(self):
        return {"kind": "copy-prefill"}

    def close(self):
        pass


class CopyDecode(CopyPrefill):
    name = "decode"

    def __init__(self, mailbox, kv_cache, block_manager, config):
        super().__init__(mailbox, kv_cache, block_manager, config)
        self.pending, self.ready = {}, []
        self.seen_waiting = 0

    def on_add(self, request):
        if request.remote_kv is None:
            return
        key = request.remote_kv.get("key")
        if key not in self.mailbox.items:
            raise InvalidRequestError(f"no KV under {key!r}")
        kv, first = self.mailbox.items.pop(key)
        request.append_token(first)
        self.pending[request.request_id] = kv

    def num_external_tokens(self, request):
        return request.num_prompt_tokens if request.request_id in self.pending else 0

    def on_allocated(self, request, n):
        bs = self.kv_cache.block_size
        rows = torch.tensor([request.block_ids[t // bs] * bs + t % bs for t in range(n)])
        for (k, v), (sk, sv) in zip(self.kv_cache.layers, self.pending.pop(request.request_id)):
            k.flatten(0, 1)[rows] = sk
            v.flatten(0, 1)[rows] = sv
        self.ready.append(request)
        return True

    def poll(self):
        self.seen_waiting += sum(r.status == RequestStatus.WAITING_FOR_REMOTE_KV for r in self.ready)
        ready, self.ready = self.ready, []
        return PollResult(ready=ready)

    def on_finish(self, request, reason):
        return reason


def test_user_connector_hands_kv_over_in_process():
    mailbox = Mailbox()
    hybrid = EngineBuilder("tiny-qwen3").dtype("float32").build()
    expected = [o.token_ids for o in hybrid.generate(PROMPTS, GREEDY)]
    prefill = (EngineBuilder("tiny-qwen3").dtype("float32")
               .kv_connector(lambda kv, bm, cfg: CopyPrefill(mailbox, kv, bm, cfg)).build())
    decode = (EngineBuilder("tiny-qwen3").dtype("float32")
              .kv_connector(lambda kv, bm, cfg: CopyDecode(mailbox, kv, bm, cfg)).build())
    handed = prefill.generate(PROMPTS, GREEDY)
    assert all(o.finish_reason == "kv_transfer" and len(o.token_ids) == 1 for o in handed)
    rids = [decode.add_request(p, GREEDY, kv_transfer_params=o.kv_transfer_params) for p, o in zip(PROMPTS, handed)]
    finals = {}
    while decode.has_unfinished_requests():
        finals.update((o.request_id, o) for o in decode.step() if o.finished)
    assert [finals[r].token_ids for r in rids] == expected
    assert decode.connector.seen_waiting == len(PROMPTS)  # each waited for its KV as a scheduler state
    assert decode.stats.num_prompt_tokens_computed == 0  # nothing recomputed on the decode side
    for e in (prefill, decode):
        assert e.block_manager.num_free_blocks == e.block_manager.num_blocks
    with pytest.raises(InvalidRequestError, match="no KV"):
        decode.add_request(PROMPTS[0], GREEDY, kv_transfer_params={"key": "missing"})
    assert not decode.has_unfinished_requests()
