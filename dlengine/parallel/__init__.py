"""Distributed execution under torch.distributed: tensor parallelism, attention data-parallel x
MoE expert-parallel ("wide EP"), a process launcher and the parallel engine fronts.

See docs/parallel.md. Public names (imported lazily, so that model layers can import
`dlengine.parallel.state` without pulling the engine in):

* `launch(fn, world_size, *args)`: run fn on N new ranks (gloo on CPU, NCCL on GPUs), raise
  `WorkerError` with the failing rank's traceback if one fails.
* `ParallelEngine` (spawned workers, the caller is the front) and `DistributedEngine` (torchrun:
  rank 0 is the front), both made by `EngineBuilder(...).parallel(...).build()`.
* `ParallelState`, `get_parallel_state`, `init_distributed`: a rank's groups.
* `ExpertPlacement`, `PLACEMENTS`, `dispatch_backends`: expert placement map and MoE
  dispatch/combine backends.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "launch": "launcher", "WorkerError": "launcher", "WorkerGroup": "launcher",
    "ParallelEngine": "front", "DistributedEngine": "front", "assign_least_loaded": "front",
    "ParallelState": "state", "get_parallel_state": "state", "init_distributed": "state",
    "in_distributed_worker": "state",
    "ExpertPlacement": "ep", "PLACEMENTS": "ep", "dispatch_backends": "ep", "make_placement": "ep",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dlengine.parallel.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dlengine.parallel' has no attribute {name!r}")
