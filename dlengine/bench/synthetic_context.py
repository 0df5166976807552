"""A KV connector that skips the prompt: decode cost at any context length, no prefill.

`dlengine bench latency --synthetic-context` builds the engine with this connector
(`EngineBuilder.kv_connector(SyntheticContextConnector)`), so the decode step time at, say,
32 requests x 64k tokens can be measured without computing 2M prompt tokens first (minutes on a
real-size model, and DeepSeek-V4's prefill runs a per-request torch reference).

It uses the KV connector seam (dlengine/engine/seams.py) the way a decode engine does
(dlengine/disagg/decode.py): the prompt's KV "arrives from elsewhere". For each request
- `on_add` appends a first token, as a prefill engine would have sampled one: the prompt's last
  token id (a prompt token, so never an end-of-sequence id the benchmark excluded);
- `num_external_tokens` says every known token but the last counts as computed (at admission the
  whole prompt; after a preemption, the prompt and the tokens generated so far);
- the scheduler allocates the blocks for them (and the request's state slot, on a model with a
  recurrent or sliding-window state: `migrates_state = True` tells the builder that "moving" the
  state is taken care of, by the same fiction) and calls `on_allocated`, which starts nothing;
- the next `poll` reports the request ready, and it decodes from the next step on.

The cache content is NOT the prompt's KV: the blocks and state slots hold whatever the cache
held, so the tokens generated are meaningless; only the cost of the decode steps is real (the
attention kernels read `context` positions per request whatever they hold). So that no NaN or
Inf bit pattern is ever read, the constructor zeroes the whole cache once, at build, off every
timed step (KVCache allocates it zeroed today; this keeps the connector independent of that).
Afterwards the cache only ever holds values real steps wrote, or zeros.

Requests this connector leaves to be computed as usual (num_external_tokens 0, nothing
appended): scoring requests, and any with max_tokens <= 1 (the appended token would be their
only one, and nothing would end them).

The pretend-computed blocks enter the prefix cache like pulled ones (the scheduler publishes them
when the request is ready): a later real request with the same prefix would hit synthetic KV.
Build such an engine with prefix caching off (the benchmark does) and use it for nothing else.
"""

from __future__ import annotations

from dlengine.engine.request import Request
from dlengine.engine.seams import PollResult


class SyntheticContextConnector:
    """KVConnector (dlengine.engine.seams) that treats every prompt as already computed.

    Built by the engine as `SyntheticContextConnector(kv_cache, block_manager, config)`: the class
    itself is the factory `EngineBuilder.kv_connector(...)` takes."""

    name = "synthetic-context"
    migrates_state = True  # a state model's slot is allocated and left as it is, like the KV blocks

    def __init__(self, kv_cache, block_manager, config) -> None:
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.config = config
        _zero_cache(kv_cache)
        self._waiting: dict[str, Request] = {}  # added, blocks not allocated yet
        self._ready: list[Request] = []  # blocks allocated: reported ready at the next poll
        self.num_requests = 0  # requests given a synthetic context since construction
        self.num_tokens = 0  # context tokens those requests skipped computing

    # ------------------------------------------------------------------ the seam
    def on_add(self, request: Request) -> None:
        if not _takes(request):
            return
        request.append_token(request.prompt_token_ids[-1])
        self._waiting[request.request_id] = request

    def num_external_tokens(self, request: Request) -> int:
        return request.num_tokens - 1 if _takes(request) else 0

    def on_allocated(self, request: Request, num_external_tokens: int) -> bool:
        self._waiting.pop(request.request_id, None)
        self._ready.append(request)
        self.num_requests += 1
        self.num_tokens += num_external_tokens
        return True

    def poll(self) -> PollResult:
        ready, self._ready = self._ready, []
        return PollResult(ready=ready)

    def on_finish(self, request: Request, reason: str) -> str:
        self._waiting.pop(request.request_id, None)
        if request in self._ready:  # aborted between allocation and the next poll
            self._ready.remove(request)
        return reason

    def abort(self, request_id: str) -> bool:
        return False  # nothing is held for a request once the core has let it go

    # ------------------------------------------------------------------ for the benchmark
    @property
    def num_waiting_for_blocks(self) -> int:
        """Requests added whose synthetic context has no blocks yet (the scheduler allocates them
        at its next admission)."""
        return len(self._waiting)

    def describe(self) -> dict:
        return {"connector": self.name, "context": "synthetic (not computed; KV content meaningless)",
                "requests": self.num_requests, "context_tokens": self.num_tokens}

    def close(self) -> None:
        self._waiting.clear()
        self._ready.clear()


def _takes(request: Request) -> bool:
    """Whether the request gets a synthetic context (see the module docstring for the others)."""
    return not request.score_only and request.params.max_tokens > 1


def _zero_cache(kv_cache) -> None:
    """Zero every cache tensor once: one memset of the buffer all cache groups live in
    (dlengine/cache/kv_cache.py)."""
    if kv_cache.buffer is not None:
        kv_cache.buffer.zero_()
