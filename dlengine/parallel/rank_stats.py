"""One EngineStats for a parallel engine, from its output ranks' (one per DP replica).

The TP ranks of a DP group run the same schedule, so the group's output rank (its first TP rank)
speaks for it. DP replicas step in lockstep: their k-th steps ran at the same time, so the
merged k-th StepRecord adds up their batches and takes the longest duration; the counters add up.
"""

from __future__ import annotations

import dataclasses
from itertools import zip_longest
from typing import Sequence

from dlengine.engine.core import EngineStats, StepRecord

_COUNTERS = ("num_steps", "num_computed_tokens", "num_prompt_tokens_computed", "num_cached_tokens",
             "num_generated_tokens", "num_preemptions", "num_finished", "num_draft_tokens", "num_accepted_tokens",
             "num_spec_verifications")


def merge_replica_stats(replicas: Sequence[EngineStats]) -> EngineStats:
    """The DP replicas' counters summed and their lockstep steps merged (module docstring);
    `num_steps` is the most steps any replica ran (lockstep steps, not their sum)."""
    if len(replicas) == 1:
        return replicas[0]
    merged = EngineStats(forced_acceptance=replicas[0].forced_acceptance)
    for name in _COUNTERS:
        setattr(merged, name, sum(getattr(s, name) for s in replicas))
    merged.num_steps = max(s.num_steps for s in replicas)
    for records in zip_longest(*(s.steps for s in replicas)):
        ran = [r for r in records if r is not None]
        merged.steps.append(StepRecord(
            **{f.name: sum(getattr(r, f.name) for r in ran) for f in dataclasses.fields(StepRecord)
               if f.name != "duration_s"},
            duration_s=max(r.duration_s for r in ran)))
    return merged
