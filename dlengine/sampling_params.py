"""SamplingParams: per-request decoding choices, range-checked when built, vocabulary-checked when
the request is added (the vocabulary is only known to the engine)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real


class InvalidRequestError(ValueError):
    """A request that cannot be served (bad prompt or bad sampling parameters)."""


def _bad(msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"invalid sampling parameters: {msg}")


def _check_int(name: str, value: object, lo: int | None = None, hi: int | None = None, allow_none: bool = False) -> None:
    """An integer (bool is not one) in [lo, hi]."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise _bad(f"{name} must be an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _bad(f"{name} must be {span}, got {value!r}")


def _check_float(name: str, value: object, lo: float, hi: float = math.inf,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    """A finite real number in the interval lo..hi (nan and inf never pass: every comparison with
    nan is False, so a plain `value < lo` check would let it through)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _bad(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise _bad(f"{name} must be a finite number, got {value!r}")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        left = "(" if lo_open else "["
        right = ")" if hi_open or hi == math.inf else "]"
        raise _bad(f"{name} must be in {left}{lo:g}, {hi:g}{right}, got {value!r}")


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Every field is range-checked when the object is built
    (InvalidRequestError naming the field and its value); `validate(vocab_size)` adds the checks
    that need the vocabulary and is run again by the engine when the request is added.

    >>> SamplingParams(max_tokens=16, temperature=0.0).greedy
    True
    >>> SamplingParams(top_p=2)
    Traceback (most recent call last):
    ...
    dlengine.sampling_params.InvalidRequestError: invalid sampling parameters: top_p must be in (0, 1], got 2
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF semantics, over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs to return per generated token
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise _bad(f"{name} must be a list, got {value!r}")
            setattr(self, name, list(value))
        self.check_ranges()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_ranges(self) -> None:
        """Every field within its range; needs nothing but the parameters themselves."""
        _check_int("max_tokens", self.max_tokens, lo=1)
        _check_float("temperature", self.temperature, 0.0)
        _check_int("top_k", self.top_k, lo=-1, hi=2**31 - 1)  # sampled through an int64 tensor
        _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, lo_open=True)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_int("seed", self.seed, lo=-(2**63), hi=2**64 - 1, allow_none=True)  # torch.Generator's range
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.min_tokens > self.max_tokens:
            raise _bad(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        _check_int("logprobs", self.logprobs, lo=0, allow_none=True)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(f"{name} must be True or False, got {getattr(self, name)!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise _bad(f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids entry", t, lo=0)

    def validate(self, vocab_size: int | None = None) -> None:
        """The range checks again (fields may have been changed since construction) and, given
        the vocabulary size, the checks that depend on it."""
        self.check_ranges()
        if vocab_size is not None:
            if self.logprobs is not None and self.logprobs > vocab_size:
                raise _bad(f"logprobs={self.logprobs} exceeds the vocabulary size {vocab_size}")
            for t in self.stop_token_ids:
                if not 0 <= t < vocab_size:
                    raise _bad(f"stop token id {t} is outside the vocabulary [0, {vocab_size})")
