"""The engine core's declared seams: what a KV connector, a speculator and the accept decision
of draft verification must provide.

Each is a Protocol the core calls at fixed points of a step (see engine/core.py and
engine/scheduler.py); `EngineBuilder` accepts an object that follows it (`.kv_connector(obj)`,
`.speculative(obj)`) or builds the shipped one from options (`.role("prefill"|"decode")`,
`.speculative("mtp"|"ngram")`). The scheduler policy seam lives beside the scheduler
(`dlengine.engine.scheduler.SchedulerPolicy`), the attention backend's in
`dlengine.kernels` and the cache specs' in `dlengine.cache.specs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from dlengine.engine.request import Request


@dataclass
class PollResult:
    """What a KV connector reports each step."""

    ready: list[Request] = field(default_factory=list)  # their remote KV is in their blocks now
    failed: list[tuple[Request, str]] = field(default_factory=list)  # end these with this error
    recompute: list[Request] = field(default_factory=list)  # compute their prompt locally instead


class KVConnector(Protocol):
    """Moves KV between engines (prefill-decode disaggregation). The shape follows vLLM v1's
    connector: the scheduler asks it how many of a waiting request's tokens arrive from
    elsewhere, tells it when blocks for them are allocated, polls it every step, and the core
    tells it when a request finishes (a prefill engine then keeps the blocks for the decode
    side and returns "kv_transfer" as the finish reason).

    Call order for a request: on_add -> num_external_tokens (each step it waits) ->
    on_allocated -> poll reports it ready / failed / recompute -> ... -> on_finish.
    """

    name: str

    def on_add(self, request: Request) -> None:
        """A request enters the engine (a prefill engine caps it to one token here; a decode
        engine appends the prefill side's first token)."""

    def num_external_tokens(self, request: Request) -> int:
        """How many leading tokens of this waiting request will be loaded rather than computed
        (0: compute it here as usual)."""

    def on_allocated(self, request: Request, num_external_tokens: int) -> bool:
        """Blocks for those tokens are allocated (`request.block_ids`): start loading. False:
        cannot start now (e.g. no staging room); the scheduler frees the blocks and retries."""

    def poll(self) -> PollResult:
        """Called at the start of every schedule(): finished and failed loads."""

    def on_finish(self, request: Request, reason: str) -> str:
        """The request ends with `reason`; returns the reason to report (a prefill engine that
        hands the KV off returns "kv_transfer" and may take `request.block_ids` over, leaving
        the list empty so the scheduler frees nothing)."""

    def abort(self, request_id: str) -> bool:
        """Release what the connector still holds for a request the core no longer knows."""

    def describe(self) -> dict: ...

    def close(self) -> None: ...


class Speculator(Protocol):
    """Proposes draft tokens; the engine verifies them in the step's one target forward.

    Before each schedule() the core calls `propose` with the running requests that decode next
    (their last token is the only one not computed). The step feeds that token and the drafts,
    samples the target at every position, accepts the longest prefix of drafts equal to the
    target's samples and adds the target's token after it. Drafts are treated as deterministic
    proposals (a one-hot draft distribution): accepting a draft exactly when the independently
    sampled target token equals it is then the standard rejection rule, so outputs follow the
    target's distribution (greedy: identical tokens). Rejected positions roll back.
    """

    name: str
    num_tokens: int  # the most drafts proposed per request and step
    # Optional: KV slots the speculator itself writes past a sampling request's positions in a
    # step (MTP: k - 1 for its chained drafts). The scheduler reserves them from free blocks only
    # (never preempting) and the core returns them after the step; absent means 0.
    num_lookahead_tokens: int

    def propose(self, requests: Sequence[Request]) -> list[list[int]]:
        """Up to `num_tokens` draft tokens per request (fewer, or none, is fine)."""

    def on_verified(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """Optional: how many of a request's drafts were accepted (proposer state, statistics)."""


class HiddenStateSpeculator(Speculator, Protocol):
    """A speculator that drafts from the target's hidden states (the MTP proposer). Declared
    with `needs_hidden_states = True`; the engine then:
    - gives it the target model at build (it is built by a factory with `wants_target = True`,
      called as `factory(config, target)`, target: dlengine.assemble.SpeculatorTarget);
    - extends the cache with its layers (`cache_specs(target_specs)`: same blocks, same tables);
    - after every step's forward, before its tokens are applied (requests still hold their
      blocks, even those that finish now), calls `observe_hidden_states(step, gained)` with the
      step's hidden states (dlengine.engine.runner.StepHiddenStates) and, per sampling request id,
      the tokens it gains (accepted drafts + the target's token). Drafts for the next step come
      from there; `propose` hands them out. After a step replayed from a CUDA graph,
      `step.hidden` is the graph's static output (overwritten by the next step: read it within
      the call) in its padded layout, 1 + k rows a request (engine/graph_layout.py).
    """

    needs_hidden_states: bool
    # Optional, for parallel engines: the speculator's own model (an nn.Module) and the most
    # forwards of it one step runs (MTP: k, the pass over the kept positions and k - 1 chained
    # ones). Under expert parallelism its MoE layers exchange tokens with every rank's, so each
    # rank tops its forwards up to this count with empty ones every lockstep step
    # (dlengine/parallel/lockstep.py); a speculator without them is refused under parallel(ffn_ep>1).
    draft_model: object
    max_forwards_per_step: int

    def cache_specs(self, target_specs: list) -> list:
        """The cache specs with this speculator's layers added."""

    def observe_hidden_states(self, step, gained: dict[str, list[int]]) -> None:
        """Run on the step's kept positions (writes its own KV) and draft for the requests that sampled."""

    # Optional: `capture_cuda_graphs(target_graphs)`. Called once at build, after the target's CUDA
    # graphs are captured (target_graphs: engine/cuda_graph.py CUDAGraphRunner, keeping hidden
    # states), so the speculator can capture its own work for the same graph keys; a step then
    # names the graph it replayed in `step.graph` (the MTP proposer: speculative/mtp_graphs.py).


class StateRollback(Protocol):
    """Speculative decoding of a model with recurrent state (cache StateSpec groups): a state is
    updated in place by every token a verify step feeds, drafts included, so rejected drafts must
    be undone in it (their KV needs nothing: it is never read again). The shipped implementation
    is dlengine/cache/state_rollback.py `StateSnapshots`; the engine builds it for a state model
    with a speculator, and:
    - the runner lays out every step with drafts through `layout` (which slot each row of a
      drafting request uses, which snapshot slot keeps the state after it) for the state layers;
    - the core proposes at most `max_drafts` drafts per request, and after each verification,
      once it knows how many drafts a request kept, calls `rollback` (before the step's tokens are
      appended: the request still holds its slot)."""

    max_drafts: int

    def layout(self, state_slots: Sequence[int], num_drafts: Sequence[int], width: int):
        """(slots, snapshot slots), each [width, n]: see StateSnapshots.layout."""

    def rollback(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """Make the request's state slot hold the state after its last token and `num_accepted` drafts."""


class AcceptancePolicy(Protocol):
    """The accept decision of verification: how many of one request's drafts it keeps. The
    runner asks it once per verifying request and step (`StepHandle.accepted_tokens`); the
    request then gains the kept drafts plus `targets[kept]`, the target's sample at the first
    rejected position (or after the last draft). Shipped (dlengine/speculative/acceptance.py):
    `ExactMatchAcceptance` (the default: keep drafts while they equal the target's samples) and
    `ForcedAcceptance(p, seed)` (benchmarking: keep each draft with probability p, so outputs are
    not the model's; `EngineBuilder.speculative(..., forced_acceptance=p)`)."""

    name: str
    forced_rate: float | None  # None: the decision follows the model (outputs are the model's)

    def num_accepted(self, drafts: Sequence[int], targets: Sequence[int]) -> int:
        """How many leading drafts to keep (0..len(drafts)); `targets` holds the target's sampled
        token at each draft position and one more (len(drafts) + 1 tokens)."""
