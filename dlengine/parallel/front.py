"""The parallel engine: rank-local engines stepping in lockstep, and the front the user talks to.

Each rank holds an ordinary `Engine` built for its shard (tensor parallel) or its replica
(attention DP). `RankRuntime.run(requests)` drives it: every step all ranks first agree (one
all-reduce) whether anyone still has work; a rank with work steps its engine, a rank without work
joins the MoE layers' dispatch/combine with no tokens, so expert-parallel collectives always
match up. TP ranks of one DP group are given the same requests and their deterministic
schedulers make the same batches, so they also call the same collectives in the same order.

Two fronts, same `generate()`:

* `ParallelEngine` (a plain script or notebook): `EngineBuilder(...).parallel(...).build()`
  spawns one worker process per rank (`WorkerGroup`), each building its rank's engine. The
  caller's process validates and tokenises prompts, spreads requests over the DP ranks
  (least-loaded first), sends each rank its share over a pipe and collects the outputs. A
  worker's exception stops every worker and is raised in the caller with that worker's
  traceback; `close()` (or the `with` block's end) shuts the workers down.
* `DistributedEngine` (under torchrun, or inside `dlengine.parallel.launch`): every rank builds
  its own engine. Rank 0 is the front: its `generate()` arguments are broadcast; the other ranks
  call `generate()` too (their arguments are ignored) or sit in `serve()` until rank 0 closes.
  Every rank's `generate()` returns the full list of outputs.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

from dlengine.config import EngineConfig
from dlengine.engine.engine import Engine, Prompt
from dlengine.engine.request import Request, RequestOutput
from dlengine.models.layers.parallel_moe import expert_token_counts, moe_layers
from dlengine.parallel.launcher import WorkerGroup
from dlengine.parallel.state import (ParallelState, build_parallel_state, default_backend, in_distributed_worker,
                                     init_distributed, set_parallel_state, destroy_distributed)
from dlengine.sampling_params import InvalidRequestError, SamplingParams
from dlengine.tokenizer import load_tokenizer

BUILD_TIMEOUT_S = 900.0  # building the rank engines, unless ParallelConfig.timeout_s says otherwise


def assign_least_loaded(requests: Sequence[Request], dp_size: int,
                        loads: Sequence[int] | None = None) -> list[list[Request]]:
    """Give each request, in order, to the DP rank with the fewest requests (then the fewest
    tokens, then the lowest rank). `loads` are requests the ranks already hold."""
    counts = list(loads) if loads is not None else [0] * dp_size
    tokens = [0] * dp_size
    shares: list[list[Request]] = [[] for _ in range(dp_size)]
    for r in requests:
        d = min(range(dp_size), key=lambda i: (counts[i], tokens[i], i))
        shares[d].append(r)
        counts[d] += 1
        tokens[d] += r.num_tokens + r.params.max_tokens
    return shares


class RankRuntime:
    """One rank's engine and the lockstep loop around it."""

    def __init__(self, engine: Engine, state: ParallelState) -> None:
        self.engine, self.state = engine, state
        self.moe = moe_layers(engine.model)
        self.idle_steps = 0  # steps this rank joined the MoE collectives with no tokens
        self.lockstep_steps = 0

    def _anyone_busy(self, busy: bool) -> bool:
        if self.state.world_group is None:
            return busy
        flag = torch.tensor([int(busy)], dtype=torch.int32, device=self.engine.config.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.state.world_group)
        return bool(flag.item())

    def run(self, requests: Sequence[Request]) -> list[RequestOutput]:
        """Run this rank's share to completion, stepping in lockstep with every other rank until
        no rank has work; returns this rank's final outputs in the order given."""
        engine = self.engine
        for r in requests:
            engine.add_prepared_request(r)
        pending = {r.request_id for r in requests}
        finals: dict[str, RequestOutput] = {}
        expert_parallel = self.state.ep_group is not None and bool(self.moe)
        while self._anyone_busy(engine.has_unfinished_requests()):
            self.lockstep_steps += 1
            calls = self.moe[0].num_forwards if expert_parallel else 0
            outputs = engine.step() if engine.has_unfinished_requests() else []
            if expert_parallel and self.moe[0].num_forwards == calls:
                # no forward ran here this step (no requests, or none schedulable): the other ranks'
                # MoE layers still exchange tokens with this one
                for layer in self.moe:
                    layer.forward_idle()
                self.idle_steps += 1
            for out in outputs:
                if out.finished and out.request_id in pending:
                    finals[out.request_id] = out
                    pending.discard(out.request_id)
        return [finals[r.request_id] for r in requests]

    def stats(self) -> dict[str, Any]:
        s = self.engine.stats
        return {"rank": self.state.rank, "tp_rank": self.state.tp_rank, "dp_rank": self.state.dp_rank,
                "num_steps": s.num_steps, "lockstep_steps": self.lockstep_steps, "idle_steps": self.idle_steps,
                "num_generated_tokens": s.num_generated_tokens, "num_finished": s.num_finished,
                "num_computed_tokens": s.num_computed_tokens,
                "expert_token_counts": expert_token_counts(self.engine.model)}


class TPLeaderSampler:
    """Sample on the first TP rank of the group and broadcast its tokens to the others.

    TP ranks hold identical logits (all-gathered) and identically seeded samplers, so they would
    draw the same tokens anyway; the broadcast makes that a guarantee rather than an assumption
    (a single differing token would make the ranks' schedulers, and so their collectives, part
    ways)."""

    def __init__(self, sampler, state: ParallelState) -> None:
        self.sampler, self.group = sampler, state.tp_group
        self.src = state.dp_rank * state.tp_size  # global rank of this group's first TP rank

    def __call__(self, logits: torch.Tensor, tensors) -> Any:
        out = self.sampler(logits, tensors)
        dist.broadcast(out.token_ids, src=self.src, group=self.group)
        return out

    def __getattr__(self, name: str) -> Any:  # the rest of the Sampler's interface
        return getattr(self.sampler, name)


def _error_output(err: str) -> RequestOutput:
    return RequestOutput(request_id="", prompt=None, prompt_token_ids=[], token_ids=[], text="", new_token_ids=[],
                         finished=True, finish_reason="error", stop_reason=None,
                         metrics=Request("", [], SamplingParams()).metrics, error=err)


def _prepare(front: Engine, prompts, params, raise_on_error: bool):
    reqs, errors = front._prepare_batch(prompts, params)
    if raise_on_error and any(errors):
        raise InvalidRequestError("; ".join(f"prompt {i}: {e}" for i, e in enumerate(errors) if e))
    return reqs, errors


def _assemble(ids: Sequence[str | None], errors, finals: dict[str, RequestOutput]) -> list[RequestOutput]:
    """Outputs in input order: the finished output of each request id, an "error" output for
    each prompt that was refused (id None)."""
    return [finals[i] if i is not None else _error_output(err) for i, err in zip(ids, errors)]


def _ids(reqs) -> list[str | None]:
    return [r.request_id if r is not None else None for r in reqs]


def _build_rank(builder, cfg: EngineConfig) -> RankRuntime:
    """Inside an initialised world: make the groups, then this rank's engine."""
    import dataclasses

    state = build_parallel_state(cfg.parallel)
    set_parallel_state(state)
    if cfg.device.type == "cuda":
        cfg = dataclasses.replace(cfg, device=torch.device("cuda", state.local_rank))
        torch.cuda.set_device(cfg.device)
    engine = builder._build_local(cfg, state)
    if state.tp_group is not None:
        engine.runner.sampler = TPLeaderSampler(engine.runner.sampler, state)
    return RankRuntime(engine, state)


# ---------------------------------------------------------------------- spawned workers
def _engine_worker(conn, builder) -> None:
    """A spawned rank: build, report, then serve the front's commands until "close"."""
    runtime = _build_rank(builder, builder._make_config())
    rank, state = runtime.state.rank, runtime.state
    conn.send(("reply", rank, runtime.engine.describe()))
    while True:
        try:
            op, *payload = conn.recv()
        except EOFError:  # the front is gone: nothing left to serve
            return
        if op == "generate":
            outs = runtime.run(payload[0])
            conn.send(("reply", rank, outs if state.is_output_rank else []))
        elif op == "stats":
            conn.send(("reply", rank, runtime.stats()))
        elif op == "raise":  # failure injection for tests of the error path
            if rank == payload[1]:
                raise RuntimeError(payload[0])
            dist.barrier()  # the others wait in a collective the failing rank never joins
            conn.send(("reply", rank, None))
        elif op == "close":
            runtime.engine.close()
            return
        else:
            raise ValueError(f"unknown command {op!r}")


class ParallelEngine:
    """The front of a multi-process engine (see the module docstring). Use it like `Engine` for
    `generate()`; `close()` (or a `with` block) stops the workers.

    >>> from dlengine import EngineBuilder, SamplingParams
    >>> engine = EngineBuilder("tiny-qwen3-moe").dtype("float32").parallel(attention_dp=2, ffn_ep=2).build()
    >>> outs = engine.generate(["a prompt", [12, 7, 99]], SamplingParams(max_tokens=8, temperature=0.0))
    >>> [len(o.token_ids) for o in outs], [s["dp_rank"] for s in engine.stats()]
    ([8, 8], [0, 1])
    >>> engine.close()
    """

    def __init__(self, builder, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model.path)
        # validation and tokenisation only: the front holds no model, cache or scheduler
        self._front = Engine(config, None, self.tokenizer, None, None, None, None)
        p = config.parallel
        self._workers = WorkerGroup(_engine_worker, p.world_size, (builder,), backend=default_backend(config.device.type),
                                    pass_conn=True, dist_timeout_s=p.timeout_s or 600.0)
        self._closed = False
        try:
            self.rank_info: list[dict] = self._workers.recv_all(timeout=p.timeout_s or BUILD_TIMEOUT_S)
        except BaseException:
            self._closed = True
            raise

    def __repr__(self) -> str:
        p = self.config.parallel
        return (f"ParallelEngine(model={self.config.model.architecture} @ {self.config.model.path}, tp={p.tp}, "
                f"attention_dp={p.attention_dp}, ffn_ep={p.ffn_ep}, device={self.config.device}, "
                f"workers={[proc.pid for proc in self._workers.procs]})")

    @property
    def processes(self):
        """The worker processes (for monitoring; `close()` ends them)."""
        return list(self._workers.procs)

    def describe(self) -> dict:
        info = dict(self.rank_info[0])
        p = self.config.parallel
        info.update(tp=p.tp, attention_dp=p.attention_dp, ffn_ep=p.ffn_ep, expert_placement=p.expert_placement,
                    dispatch_backend="all_to_all" if p.dispatch_backend == "auto" else p.dispatch_backend)
        return info

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this parallel engine is closed (or one of its workers failed)")

    def _command(self, *message, per_rank: Sequence[tuple] | None = None) -> list[Any]:
        """Send `message` to every worker (or `per_rank[r]` to worker r) and collect one reply
        from each, within ParallelConfig.timeout_s if set."""
        self._check_open()
        try:
            if per_rank is None:
                self._workers.send_all(message)
            else:
                for rank, msg in enumerate(per_rank):
                    self._workers.send(rank, msg)
            return self._workers.recv_all(timeout=self.config.parallel.timeout_s)
        except BaseException:
            self._closed = True  # the workers were stopped: a failure mid-collective is not recoverable
            self._workers.terminate()
            raise

    def generate(self, prompts: Prompt | Iterable[Prompt], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, raise_on_error: bool = True) -> list[RequestOutput]:
        """As `Engine.generate`: outputs in input order, bad prompts raise (or come back as
        "error" outputs with raise_on_error=False). Requests go to DP ranks least-loaded first."""
        self._check_open()
        reqs, errors = _prepare(self._front, prompts, params, raise_on_error)
        p = self.config.parallel
        shares = assign_least_loaded([r for r in reqs if r is not None], p.attention_dp)
        # rank = dp_rank * tp + tp_rank: each worker gets its DP group's share only
        messages = [("generate", shares[rank // p.tp]) for rank in range(p.world_size)]
        finals: dict[str, RequestOutput] = {}
        for outs in self._command(per_rank=messages):
            finals.update((o.request_id, o) for o in outs)
        return _assemble(_ids(reqs), errors, finals)

    def stats(self) -> list[dict[str, Any]]:
        """Per rank: steps, idle lockstep steps, tokens and per-expert routed token counts."""
        return self._command("stats")

    def _inject_failure(self, rank: int, message: str) -> None:
        """Make worker `rank` raise RuntimeError(message) while the others wait (tests only)."""
        self._command("raise", message, rank)

    def close(self) -> None:
        """Stop the workers (they release their engines first) and wait for them to exit."""
        if self._closed:
            return
        self._closed = True
        try:
            self._workers.send_all(("close",))
            self._workers.join(timeout=60.0)
        finally:
            self._workers.terminate()

    def __enter__(self) -> "ParallelEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed:
                self._workers.terminate()
        except Exception:
            pass


# ---------------------------------------------------------------------- torchrun / launch
class DistributedEngine:
    """This rank's engine under torchrun (or `launch`); rank 0 is the front (module docstring).

    Under `torchrun --nproc-per-node 2 script.py`, every rank running (not a doctest: it needs
    the torchrun environment)::

        engine = EngineBuilder("tiny-qwen3").parallel(tp=2).build()
        outs = engine.generate(["a prompt"], SamplingParams(max_tokens=8, temperature=0.0))  # rank 0's prompts
        engine.close()
    """

    def __init__(self, runtime: RankRuntime, owns_world: bool = False) -> None:
        self.runtime = runtime
        self.owns_world = owns_world  # build() initialised torch.distributed: close() tears it down
        self.engine = runtime.engine
        self.config = runtime.engine.config
        self.state = runtime.state
        self.rank = runtime.state.rank
        self._closed = False

    def __repr__(self) -> str:
        p = self.config.parallel
        return f"DistributedEngine(rank={self.rank}, tp={p.tp}, attention_dp={p.attention_dp}, ffn_ep={p.ffn_ep})"

    def _broadcast(self, message) -> Any:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _execute(self, message) -> list[RequestOutput] | None:
        op = message[0]
        if op == "close":
            self._teardown()
            return None
        _, shares, ids, errors = message
        outs = self.runtime.run(shares[self.state.dp_rank])
        gathered: list = [None] * self.state.world_size
        dist.all_gather_object(gathered, outs if self.state.is_output_rank else [])
        return _assemble(ids, errors, {o.request_id: o for part in gathered for o in part})

    def generate(self, prompts: Prompt | Iterable[Prompt] | None = None,
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 raise_on_error: bool = True) -> list[RequestOutput]:
        """Collective: every rank calls it; rank 0's arguments are used. Returns every output
        (in rank 0's input order) on every rank; [] on a rank whose front closed meanwhile."""
        if self._closed:
            raise RuntimeError("this engine is closed")
        if self.rank == 0:
            reqs, errors = _prepare(self.engine, prompts, params, raise_on_error)
            shares = assign_least_loaded([r for r in reqs if r is not None], self.config.parallel.attention_dp)
            return self._execute(self._broadcast(("generate", shares, _ids(reqs), errors)))
        outs = self._execute(self._broadcast(None))
        return outs or []

    def serve(self) -> None:
        """On ranks other than 0: run rank 0's commands until it closes the engine."""
        while not self._closed:
            self._execute(self._broadcast(None))

    def stats(self) -> dict[str, Any]:
        """This rank's counters (not collective)."""
        return self.runtime.stats()

    def close(self) -> None:
        """Collective: rank 0 tells the others to stop; they return from serve()/generate()."""
        if self._closed:
            return
        if self.rank == 0:
            self._execute(self._broadcast(("close",)))
        else:
            self.serve()

    def _teardown(self) -> None:
        self._closed = True
        self.engine.close()
        set_parallel_state(ParallelState())
        if self.owns_world:
            destroy_distributed()

    def __enter__(self) -> "DistributedEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_parallel_engine(builder, config: EngineConfig):
    """`EngineBuilder.build()` for world size > 1: this rank's engine inside a distributed
    worker, else a front over freshly spawned workers."""
    if in_distributed_worker():
        owns_world = not dist.is_initialized()
        init_distributed(default_backend(config.device.type), timeout_s=config.parallel.timeout_s or 600.0)
        return DistributedEngine(_build_rank(builder, config), owns_world)
    return ParallelEngine(builder, config)
