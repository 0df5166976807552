"""Benchmark workloads: lists of `BenchRequest` (a prompt and how many tokens to generate).

- `random_requests`: random token-id prompts, like vLLM's random dataset. Lengths are drawn
  uniformly from [len*(1-r), len*(1+r)] with r = `range_ratio`; an optional shared prefix of
  `prefix_len` tokens is put in front of every prompt (it exercises the prefix cache).
- `load_jsonl_requests`: one JSON object per line, `{"prompt": "text" | [token ids],
  "output_len": 32}` (`output_len` optional; the default applies when it is missing).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Iterable, Union

import numpy as np

from dlengine.bench.common import BenchError

Prompt = Union[str, list[int]]


@dataclass
class BenchRequest:
    prompt: Prompt
    output_len: int

    @property
    def prompt_len(self) -> int | None:
        """Token count when the prompt is token ids (None for text: the engine tokenizes it)."""
        return None if isinstance(self.prompt, str) else len(self.prompt)


def length_bounds(length: int, range_ratio: float) -> tuple[int, int]:
    """Inclusive [low, high] of lengths drawn around `length` (vLLM's random dataset rule); low >= 1."""
    if length < 1:
        raise BenchError(f"lengths must be >= 1, got {length}")
    if not 0.0 <= range_ratio < 1.0:
        raise BenchError(f"range_ratio must be in [0, 1), got {range_ratio}")
    low = max(1, math.floor(length * (1.0 - range_ratio)))
    high = max(low, math.ceil(length * (1.0 + range_ratio)))
    return low, high


def allowed_token_ids(vocab_size: int, exclude: Iterable[int | None] = ()) -> np.ndarray:
    """Token ids in [0, vocab_size) minus `exclude` (eos, pad, other special ids)."""
    bad = np.array(sorted({int(t) for t in exclude if t is not None and 0 <= int(t) < vocab_size}), dtype=np.int64)
    ids = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), bad, assume_unique=True)
    if ids.size == 0:
        raise BenchError(f"no token ids left to sample from a vocabulary of {vocab_size} after removing {bad.tolist()}")
    return ids


def random_requests(
    num_prompts: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    *,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    exclude_ids: Iterable[int | None] = (),
    seed: int = 0,
) -> list[BenchRequest]:
    """`num_prompts` prompts of random token ids drawn from the vocabulary minus `exclude_ids`
    (pass the eos ids so prompts hold no end-of-sequence token). Prompt length is `prefix_len`
    plus a length from `length_bounds(input_len, range_ratio)`; output length likewise from
    `length_bounds(output_len, range_ratio)`. Deterministic for a given seed."""
    if num_prompts < 1:
        raise BenchError(f"num_prompts must be >= 1, got {num_prompts}")
    if prefix_len < 0:
        raise BenchError(f"prefix_len must be >= 0, got {prefix_len}")
    in_lo, in_hi = length_bounds(input_len, range_ratio)
    out_lo, out_hi = length_bounds(output_len, range_ratio)
    ids = allowed_token_ids(vocab_size, exclude_ids)
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(in_lo, in_hi + 1, size=num_prompts)
    out_lens = rng.integers(out_lo, out_hi + 1, size=num_prompts)
    prefix = ids[rng.integers(0, ids.size, size=prefix_len)].tolist()
    reqs = []
    for n_in, n_out in zip(in_lens.tolist(), out_lens.tolist()):
        body = ids[rng.integers(0, ids.size, size=n_in)].tolist()
        reqs.append(BenchRequest(prompt=prefix + body, output_len=int(n_out)))
    return reqs


def load_jsonl_requests(
    path: str | os.PathLike, num_prompts: int | None, default_output_len: int
) -> list[BenchRequest]:
    """The first `num_prompts` requests of a JSONL file (all of them when None, or when the file
    holds fewer). Blank lines are skipped; anything else that is not a valid request raises
    BenchError naming the file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BenchError(f"dataset file {path!r} does not exist")
    if default_output_len < 1:
        raise BenchError(f"output_len must be >= 1, got {default_output_len}")
    reqs: list[BenchRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if num_prompts is not None and len(reqs) >= num_prompts:
                break
            line = line.strip()
            if not line:
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise BenchError(f"{where}: each line must be a JSON object with a \"prompt\" field")
            prompt = obj["prompt"]
            if isinstance(prompt, str):
                if not prompt:
                    raise BenchError(f"{where}: \"prompt\" is empty")
            elif isinstance(prompt, list):
                if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
                    raise BenchError(f"{where}: a token-id \"prompt\" must be a non-empty list of integers >= 0")
            else:
                raise BenchError(f"{where}: \"prompt\" must be a string or a list of token ids")
            out_len = obj.get("output_len", default_output_len)
            if not isinstance(out_len, int) or isinstance(out_len, bool) or out_len < 1:
                raise BenchError(f"{where}: \"output_len\" must be a positive integer, got {out_len!r}")
            reqs.append(BenchRequest(prompt=prompt, output_len=out_len))
    if not reqs:
        raise BenchError(f"dataset file {path!r} holds no requests")
    return reqs
