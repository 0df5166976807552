"""Parallel engines: the same front (`Engine`) over a lockstep group of rank cores.

Each rank builds an ordinary `EngineCore` for its shard (tensor parallel) or its replica
(attention DP) from the EngineConfig, and steps it in lockstep (`parallel/lockstep.py`). Two
ways to reach the ranks, one API (`add_request` / `step` / `stream` / `abort` / `generate`):

* `ParallelEngine` (a plain script or notebook): `EngineBuilder(...).parallel(...).build()`
  spawns one worker process per rank (`WorkerGroup`), each building its rank's core. The
  caller's process is the front: it validates and tokenises prompts, spreads requests over the
  DP ranks (least-loaded first), and each `step()` sends every rank its new requests and aborts
  over a pipe and collects the outputs. A worker's exception stops every worker and is raised in
  the caller with that worker's traceback; `close()` (or the `with` block's end) shuts them down.
* `DistributedEngine` (under torchrun, or inside `dlengine.parallel.launch`): every rank builds
  its own core. Rank 0 is the front: each step broadcasts the new requests and aborts, and the
  output ranks' outputs are gathered to it. The other ranks call `generate()` too (their
  arguments are ignored; every rank gets the full list of outputs) or sit in `serve()` until
  rank 0 closes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

from dlengine.config import EngineConfig
from dlengine.disagg.params import KVTransferParams
from dlengine.engine.core import CoreOutput, EngineStats
from dlengine.engine.engine import Engine, Prompt
from dlengine.engine.request import Request, RequestOutput
from dlengine.parallel.launcher import WorkerGroup
from dlengine.parallel.rank_stats import merge_replica_stats
from dlengine.parallel.state import (ParallelState, build_parallel_state, default_backend, destroy_distributed,
                                     in_distributed_worker, init_distributed, set_parallel_state)
from dlengine.sampling_params import SamplingParams
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


def build_rank(cfg: EngineConfig):
    """Inside an initialised world: make the groups, then this rank's lockstep core."""
    from dlengine.assemble import build_core
    from dlengine.parallel.lockstep import RankCore

    state = build_parallel_state(cfg.parallel)
    set_parallel_state(state)
    if cfg.device.type == "cuda":
        cfg = dataclasses.replace(cfg, device=torch.device("cuda", state.local_rank))
        torch.cuda.set_device(cfg.device)
    return RankCore(build_core(cfg, state), state)


class _Dispatch:
    """The front's bookkeeping of which DP rank holds which request, and what to send next."""

    def __init__(self, dp_size: int, config: EngineConfig | None = None) -> None:
        self.dp_size = dp_size
        # a decode engine's migrated request starts with the prefill side's first token: a local
        # core's connector appends it to the very request the front tracks; the ranks' cores
        # have copies, so the front appends it to its own (the copies it sends carry it along)
        self.appends_first_token = (config is not None and config.role == "decode"
                                    and config.components.kv_connector is None)
        self.owner: dict[str, int] = {}  # request id -> DP rank, while it runs
        self.handed_off: set[str] = set()  # prefill hand-offs (their blocks may still be pinned)
        self.adds: list[list[Request]] = [[] for _ in range(dp_size)]
        self.aborts: list[str] = []
        self.rank_busy = False

    def add(self, request: Request) -> None:
        if self.appends_first_token and request.remote_kv is not None and not request.output_token_ids:
            request.append_token(KVTransferParams.from_dict(request.remote_kv).first_token)
        loads = [0] * self.dp_size
        for d in self.owner.values():
            loads[d] += 1
        [d] = [i for i, share in enumerate(assign_least_loaded([request], self.dp_size, loads)) if share]
        self.owner[request.request_id] = d
        self.adds[d].append(request)

    def abort(self, request_id: str) -> bool:
        known = request_id in self.owner or request_id in self.handed_off
        if known:
            self.aborts.append(request_id)
        return known

    def take(self) -> tuple[list[list[Request]], list[str]]:
        adds, aborts = self.adds, self.aborts
        self.adds, self.aborts = [[] for _ in range(self.dp_size)], []
        return adds, aborts

    def seen(self, outputs: Iterable[CoreOutput]) -> None:
        for o in outputs:
            if o.finished:
                self.owner.pop(o.request_id, None)
                if o.finish_reason == "kv_transfer":
                    self.handed_off.add(o.request_id)

    def has_unfinished(self) -> bool:
        return self.rank_busy or any(self.adds) or bool(self.aborts)


# ---------------------------------------------------------------------- spawned workers
def _rank_worker(conn, cfg: EngineConfig) -> None:
    """A spawned rank: build, report, then serve the front's commands until "close"."""
    rank_core = build_rank(cfg)
    rank, state = rank_core.state.rank, rank_core.state
    conn.send(("reply", rank, rank_core.core.describe()))
    while True:
        try:
            op, *payload = conn.recv()
        except EOFError:  # the front is gone: nothing left to serve
            return
        if op == "step":
            adds, aborts = payload
            conn.send(("reply", rank, rank_core.step(adds, aborts)))
        elif op == "stats":
            conn.send(("reply", rank, rank_core.stats()))
        elif op == "engine_stats":  # the output ranks' EngineStats (step records included)
            conn.send(("reply", rank, rank_core.core.stats if state.is_output_rank else None))
        elif op == "raise":  # failure injection for tests of the error path
            if rank == payload[1]:
                raise RuntimeError(payload[0])
            dist.barrier()  # the others wait in a collective the failing rank never joins
            conn.send(("reply", rank, None))
        elif op == "close":
            rank_core.core.close()
            return
        else:
            raise ValueError(f"unknown command {op!r}")


class WorkerCores:
    """The core behind a ParallelEngine front: one spawned worker per rank, stepped together."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        p = config.parallel
        self._dispatch = _Dispatch(p.attention_dp, config)
        self._workers = WorkerGroup(_rank_worker, p.world_size, (config,), backend=default_backend(config.device.type),
                                    pass_conn=True, dist_timeout_s=p.timeout_s or 600.0)
        self._closed = False
        try:
            self.rank_info: list[dict] = self._workers.recv_all(timeout=p.timeout_s or BUILD_TIMEOUT_S)
        except BaseException:
            self._closed = True
            raise

    @property
    def processes(self):
        return list(self._workers.procs)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this parallel engine is closed (or one of its workers failed)")

    def command(self, *message, per_rank: Sequence[tuple] | None = None) -> list[Any]:
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

    # the core interface
    def add(self, request: Request) -> None:
        self._check_open()
        self._dispatch.add(request)

    def abort(self, request_id: str) -> bool:
        return self._dispatch.abort(request_id)

    def step(self) -> list[CoreOutput]:
        adds, aborts = self._dispatch.take()
        tp = self.config.parallel.tp
        # rank = dp_rank * tp + tp_rank: each worker gets its DP group's new requests only
        replies = self.command(per_rank=[("step", adds[rank // tp], aborts)
                                         for rank in range(self.config.parallel.world_size)])
        outputs = [o for outs, _ in replies for o in outs]
        self._dispatch.rank_busy = any(busy for _, busy in replies)
        self._dispatch.seen(outputs)
        return outputs

    def has_unfinished(self) -> bool:
        return self._dispatch.has_unfinished()

    def describe(self) -> dict:
        info = dict(self.rank_info[0])
        p = self.config.parallel
        info.update(tp=p.tp, attention_dp=p.attention_dp, ffn_ep=p.ffn_ep, expert_placement=p.expert_placement,
                    dispatch_backend="all_to_all" if p.dispatch_backend == "auto" else p.dispatch_backend)
        return info

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

    def __del__(self) -> None:
        try:
            if not self._closed:
                self._workers.terminate()
        except Exception:
            pass


class ParallelEngine(Engine):
    """The front of a multi-process engine (module docstring): the same API as `Engine`;
    `close()` (or a `with` block) stops the workers.

    >>> from dlengine import EngineBuilder, SamplingParams
    >>> engine = EngineBuilder("tiny-qwen3-moe").dtype("float32").parallel(attention_dp=2, ffn_ep=2).build()
    >>> outs = engine.generate(["a prompt", [12, 7, 99]], SamplingParams(max_tokens=8, temperature=0.0))
    >>> [len(o.token_ids) for o in outs], [s["dp_rank"] for s in engine.stats()]
    ([8, 8], [0, 1])
    >>> rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0))
    >>> while engine.has_unfinished_requests():
    ...     outs = engine.step()
    >>> outs[-1].request_id == rid, len(outs[-1].token_ids)
    (True, 3)
    >>> engine.close()
    """

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config, WorkerCores(config), load_tokenizer(config.model.path))

    @property
    def processes(self):
        """The worker processes (for monitoring; `close()` ends them)."""
        return self.core.processes

    @property
    def rank_info(self) -> list[dict]:
        return self.core.rank_info

    def stats(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """Per rank: steps, idle lockstep steps, tokens and per-expert routed token counts."""
        return self.core.command("stats")

    def engine_stats(self) -> EngineStats:
        """The engine's counters as one EngineStats, like a local engine's `stats`: each DP
        replica's output rank's, merged (parallel/rank_stats.py). Benchmarks read it."""
        return merge_replica_stats([s for s in self.core.command("engine_stats") if s is not None])

    def _inject_failure(self, rank: int, message: str) -> None:
        """Make worker `rank` raise RuntimeError(message) while the others wait (tests only)."""
        self.core.command("raise", message, rank)

    def close(self) -> None:
        if self.core._closed:
            return
        super().close()

    def __enter__(self) -> "ParallelEngine":
        return self


# ---------------------------------------------------------------------- torchrun / launch
class BroadcastCores:
    """The core behind rank 0's front under torchrun: each step is broadcast to every rank."""

    def __init__(self, rank_core, owns_world: bool) -> None:
        self.rank_core = rank_core
        self.config = rank_core.core.config
        self.state: ParallelState = rank_core.state
        self.owns_world = owns_world
        self._dispatch = _Dispatch(self.config.parallel.attention_dp, self.config)
        self.closed = False

    def broadcast(self, message) -> Any:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def execute(self, message) -> Any:
        """Run one broadcast command on this rank (every rank calls it with the same message)."""
        op = message[0]
        if op == "close":
            self.teardown()
            return None
        if op == "result":
            return message[1]
        _, adds, aborts = message
        outs, busy = self.rank_core.step(adds[self.state.dp_rank], aborts)
        gathered: list = [None] * self.state.world_size
        dist.all_gather_object(gathered, (outs, busy))
        return [o for part, _ in gathered for o in part], any(b for _, b in gathered)

    # the core interface (rank 0)
    def add(self, request: Request) -> None:
        self._dispatch.add(request)

    def abort(self, request_id: str) -> bool:
        return self._dispatch.abort(request_id)

    def step(self) -> list[CoreOutput]:
        adds, aborts = self._dispatch.take()
        outputs, busy = self.execute(self.broadcast(("step", adds, aborts)))
        self._dispatch.rank_busy = busy
        self._dispatch.seen(outputs)
        return outputs

    def has_unfinished(self) -> bool:
        return self._dispatch.has_unfinished()

    def describe(self) -> dict:
        return self.rank_core.core.describe()

    def close(self) -> None:
        if not self.closed:
            self.execute(self.broadcast(("close",)))

    def teardown(self) -> None:
        self.closed = True
        self.rank_core.core.close()
        set_parallel_state(ParallelState())
        if self.owns_world:
            destroy_distributed()


class DistributedEngine(Engine):
    """This rank's engine under torchrun (or `launch`); rank 0 is the front (module docstring).

    Under `torchrun --nproc-per-node 2 script.py`, every rank running (not a doctest: it needs
    the torchrun environment)::

        engine = EngineBuilder("tiny-qwen3").parallel(tp=2).build()
        outs = engine.generate(["a prompt"], SamplingParams(max_tokens=8, temperature=0.0))  # rank 0's prompts
        engine.close()

    On rank 0, `add_request` / `step` / `stream` / `abort` work as on any engine (the other ranks
    must sit in `serve()` meanwhile).
    """

    def __init__(self, rank_core, owns_world: bool = False) -> None:
        cfg = rank_core.core.config
        super().__init__(cfg, BroadcastCores(rank_core, owns_world), load_tokenizer(cfg.model.path))
        self.state = rank_core.state
        self.rank = rank_core.state.rank
        self.owns_world = owns_world

    def __repr__(self) -> str:
        p = self.config.parallel
        return f"DistributedEngine(rank={self.rank}, tp={p.tp}, attention_dp={p.attention_dp}, ffn_ep={p.ffn_ep})"

    def generate(self, prompts: Prompt | Iterable[Prompt] | None = None,
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 raise_on_error: bool = True, use_tqdm: bool = False) -> list[RequestOutput]:
        """Collective: every rank calls it; rank 0's arguments are used. Returns every output
        (in rank 0's input order) on every rank; [] on a rank whose front closed meanwhile."""
        if self.core.closed:
            raise RuntimeError("this engine is closed")
        if self.rank == 0:
            outs = super().generate(prompts, params, raise_on_error=raise_on_error, use_tqdm=use_tqdm)
            self.core.execute(self.core.broadcast(("result", outs)))
            return outs
        return self.serve(until_result=True) or []

    def serve(self, until_result: bool = False) -> Any:
        """On ranks other than 0: run rank 0's commands until it closes the engine (or, with
        `until_result`, until its generate() returns, giving its outputs)."""
        while not self.core.closed:
            message = self.core.broadcast(None)
            value = self.core.execute(message)
            if until_result and message[0] == "result":
                return value
        return None

    def stats(self) -> dict[str, Any]:  # type: ignore[override]
        """This rank's counters (not collective)."""
        return self.core.rank_core.stats()

    def close(self) -> None:
        """Collective: rank 0 tells the others to stop; they return from serve()/generate()."""
        if self.core.closed:
            return
        if self.rank == 0:
            super().close()
        else:
            self.serve()


def build_parallel_engine(config: EngineConfig):
    """`EngineBuilder.build()` for world size > 1: this rank's engine inside a distributed
    worker, else a front over freshly spawned workers."""
    if in_distributed_worker():
        owns_world = not dist.is_initialized()
        init_distributed(default_backend(config.device.type), timeout_s=config.parallel.timeout_s or 600.0)
        return DistributedEngine(build_rank(config), owns_world)
    return ParallelEngine(config)
