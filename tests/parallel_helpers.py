"""Functions the multi-process tests run on each rank (spawned ranks import them from here)."""

import os
import time

import torch
import torch.distributed as dist


def rank_sum() -> float:
    t = torch.tensor([dist.get_rank() + 1.0])
    dist.all_reduce(t)
    return t.item()


def uneven_all_to_all() -> list:
    """all_to_all_single with uneven and empty splits, as EP dispatch uses it on gloo."""
    rank = dist.get_rank()
    send = [3, 0] if rank == 0 else [1, 2]
    recv = [3, 1] if rank == 0 else [0, 2]
    x = torch.arange(sum(send), dtype=torch.float32) + 100 * rank
    out = x.new_empty(sum(recv))
    dist.all_to_all_single(out, x, recv, send)
    return out.tolist()


def raise_on_rank(bad_rank: int, message: str) -> int:
    if dist.get_rank() == bad_rank:
        time.sleep(0.5)  # the others are already waiting in the barrier
        raise ValueError(message)
    dist.barrier()  # never completes: the failing rank does not join
    return dist.get_rank()


def die_on_rank(bad_rank: int, code: int) -> int:
    if dist.get_rank() == bad_rank:
        os._exit(code)  # no traceback, no message: only the exit code tells
    dist.barrier()
    return dist.get_rank()


def sleep_forever() -> None:
    time.sleep(3600)


def distributed_engine_job(kind: str, parallel: dict, prompts: list, max_tokens: int) -> list:
    """torchrun-style use inside a launched world: every rank builds its DistributedEngine; rank
    0 drives. Rank 1 first joins one generate() call (SPMD, arguments ignored), then serves rank
    0's commands until rank 0 closes."""
    from dlengine import EngineBuilder, SamplingParams
    from dlengine.parallel import DistributedEngine

    engine = EngineBuilder(kind).dtype("float32").parallel(**parallel).build()
    assert isinstance(engine, DistributedEngine)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    if dist.get_rank() == 0:
        first = engine.generate(prompts, params)
        second = engine.generate(prompts[:1], params)
        engine.close()
        return [[o.token_ids for o in first], [o.token_ids for o in second]]
    first = engine.generate(None)  # collective: rank 0's prompts run
    engine.serve()  # the second generate() and close()
    return [[o.token_ids for o in first]]


def front_then_wait(kind: str) -> None:
    """Run as a script: build a parallel engine, print its workers' pids, then wait to be killed."""
    import sys

    from dlengine import EngineBuilder

    engine = EngineBuilder(kind).dtype("float32").parallel(tp=2).build()
    print("PIDS", " ".join(str(p.pid) for p in engine.processes), flush=True)
    sys.stdin.read()  # until the test kills this process


def stuck() -> None:
    """Rank 0 blocks in a barrier rank 1 never joins; rank 1 sleeps: neither reads its pipe."""
    if dist.get_rank() == 0:
        dist.barrier()
    time.sleep(3600)


def group_then_wait() -> None:
    """Run as a script: start two stuck ranks, print their pids, then wait to be killed."""
    import sys

    from dlengine.parallel import WorkerGroup

    group = WorkerGroup(stuck, 2)
    time.sleep(3)  # let them get into the barrier / sleep
    print("PIDS", " ".join(str(p.pid) for p in group.procs), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "stuck":
        group_then_wait()
    else:
        front_then_wait(sys.argv[1])
