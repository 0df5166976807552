"""N-gram prompt lookup: draft the tokens that followed the last occurrence of the sequence's
current suffix (a model-free proposer, as in vLLM's and SGLang's "ngram" speculative mode).

For each request it tries suffixes of `max_n` down to `min_n` tokens; the first one that also
occurs earlier in the request's tokens (prompt and output) proposes the up to `num_tokens` tokens
that followed its most recent earlier occurrence. No match, no drafts. It pays where outputs copy
from the context (code edits, summaries, retrieval answers, repetitive text).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class NgramProposer:
    name = "ngram"

    def __init__(self, num_tokens: int, min_n: int = 1, max_n: int = 4, max_context: int = 4096) -> None:
        if not (1 <= min_n <= max_n):
            raise ValueError(f"ngram sizes need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.num_tokens, self.min_n, self.max_n = num_tokens, min_n, max_n
        self.max_context = max_context  # search only this many trailing tokens (bounded host work)

    def propose(self, requests: Sequence) -> list[list[int]]:
        return [self.lookup(r.all_token_ids) for r in requests]

    def lookup(self, token_ids: Sequence[int]) -> list[int]:
        """Drafts for one sequence: what followed the latest earlier copy of its longest matching
        suffix."""
        tokens = np.asarray(token_ids[-self.max_context:], dtype=np.int64)
        n_tok = len(tokens)
        for n in range(min(self.max_n, n_tok - 1), self.min_n - 1, -1):
            suffix = tokens[n_tok - n:]
            # windows starting at 0 .. n_tok - n - 1: every earlier position of an n-gram
            windows = np.lib.stride_tricks.sliding_window_view(tokens[: n_tok - 1], n)
            hits = np.nonzero((windows == suffix).all(axis=1))[0]
            if len(hits):
                start = int(hits[-1]) + n  # the token after the latest earlier copy
                return tokens[start : start + self.num_tokens].tolist()
        return []
