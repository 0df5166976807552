"""The accept decision of draft verification (the engine's AcceptancePolicy seam,
dlengine/engine/seams.py): given one request's drafts and the target's tokens sampled at the
same positions, how many leading drafts does the request keep?

- `ExactMatchAcceptance` (the default): a draft is kept exactly when the target's own sample at
  its position equals it, stopping at the first mismatch. With deterministic drafts this is the
  standard rejection rule, so outputs follow the target's distribution (greedy: token-identical
  to plain decoding).
- `ForcedAcceptance(p, seed)`: benchmarking only. Each draft is kept with probability `p`,
  whatever its value, stopping at the first rejection: P(keep draft i | drafts 1..i-1 kept) = p.
  This is how speculative decoding is timed on dummy weights, where real drafts are (almost)
  never accepted: the verify step's cost at a chosen acceptance. The tokens a request gains are
  then drafts the target never chose, i.e. NOT the model's output; the engine labels itself
  ("forced acceptance p") in describe(), its repr, its stats and the bench's results.

Either way the token added after the kept drafts is the target's sample at the first rejected
position (or after the last draft), and everything downstream (KV rollback, stop checks,
max_tokens, statistics, an MTP proposer's chain) treats the result like any other verification.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from dlengine.config import ConfigError


class ExactMatchAcceptance:
    """Keep the longest prefix of drafts equal to the target's samples."""

    name = "exact-match"
    forced_rate: float | None = None

    def num_accepted(self, drafts: Sequence[int], targets: Sequence[int]) -> int:
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
            accepted += 1
        return accepted

    def __repr__(self) -> str:
        return "ExactMatchAcceptance()"


class ForcedAcceptance:
    """Keep each draft with probability `rate`, independently of its value, until the first
    rejection (benchmarking only: the output is not the model's).

    The draws come from a numpy generator seeded with `seed` (the engine seed), one uniform per
    draft whether or not an earlier one was rejected, so a run is reproducible from the seed and
    the schedule, and tensor-parallel ranks (same seed, same schedule) decide alike."""

    name = "forced"

    def __init__(self, rate: float, seed: int = 0) -> None:
        check_forced_rate(rate)
        self.forced_rate = float(rate)
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def num_accepted(self, drafts: Sequence[int], targets: Sequence[int]) -> int:
        k = len(drafts)
        if k == 0:
            return 0
        # u < p is True with probability p for u uniform on [0, 1): p = 0 keeps none, p = 1 all
        kept = self._rng.random(k) < self.forced_rate
        return k if kept.all() else int(np.argmin(kept))

    def __repr__(self) -> str:
        return f"ForcedAcceptance(rate={self.forced_rate}, seed={self.seed})"


def check_forced_rate(rate) -> None:
    """ConfigError unless `rate` is a real number in [0, 1]."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or not 0 <= rate <= 1:
        raise ConfigError(f"speculative forced_acceptance must be a number in [0, 1] (the probability of keeping "
                          f"each draft), got {rate!r}")


def make_acceptance(forced_rate: float | None, seed: int):
    """The policy an engine config asks for: forced at `forced_rate`, else exact match."""
    return ExactMatchAcceptance() if forced_rate is None else ForcedAcceptance(forced_rate, seed)
