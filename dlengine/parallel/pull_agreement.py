"""The ranks of a tensor-parallel decode engine agree on which migrated requests may decode.

Each rank pulls its own kv heads of a request's prompt (disagg/decode.py, transfer/kv_shards.py),
from whichever prefill rank(s) hold them, over its own transfer endpoint, so the pulls land at
different times on different ranks, and may fail on one rank only (a dead or stalled prefill
rank that only some decode ranks read from, a handshake, a timeout). The ranks' schedulers must
still make identical decisions, because they run the same batches through the same collectives
(parallel/lockstep.py). So the connector's poll reports nothing by itself: every rank sends what
it has (pulls landed, pulls failed with their reasons) to every other one, and each applies the
same `decide(reports)`: a request is ready once every rank's pull has landed, in the order rank
0 saw them land, and it fails on every rank as soon as one rank's pull has failed, with that
rank's reason. The exchange runs only while a migrated request is undecided, which every rank
knows alike (same requests added and aborted in the same steps), so ranks never disagree on
whether to join it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.distributed as dist


@dataclass
class PullReport:
    """One rank's news since the last exchange, about requests not decided yet."""

    landed: list[str] = field(default_factory=list)  # request ids whose KV is in this rank's cache
    failed: dict[str, str] = field(default_factory=dict)  # request id -> why this rank's pull failed


@dataclass
class PullDecision:
    ready: list[str] = field(default_factory=list)  # decode these now, in this order, on every rank
    failed: dict[str, str] = field(default_factory=dict)  # end these with this error on every rank


def decide(reports: Sequence[PullReport]) -> PullDecision:
    """Every rank's reports (in rank order) -> what every rank does; the same on every rank."""
    failed: dict[str, str] = {}
    for rank, report in enumerate(reports):
        for rid, error in report.failed.items():
            failed.setdefault(rid, f"decode rank {rank}: {error}")
    others = [set(r.landed) for r in reports[1:]]
    ready = [rid for rid in reports[0].landed if rid not in failed and all(rid in s for s in others)]
    return PullDecision(ready, failed)


class PullAgreement:
    """`decide` over the tensor-parallel group of this rank (one all_gather_object per call)."""

    def __init__(self, group: Any, tp_rank: int, tp_size: int) -> None:
        self.group, self.tp_rank, self.tp_size = group, tp_rank, tp_size

    def decide(self, report: PullReport) -> PullDecision:
        reports: list = [None] * self.tp_size
        dist.all_gather_object(reports, report, group=self.group)
        return decide(reports)
