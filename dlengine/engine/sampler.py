"""Batched sampling on the device: penalties, temperature, top-k, top-p, min-p, seeds, logprobs.

One call handles the whole batch with tensor ops; per-row settings are tensors, not a Python loop
over requests. Order: penalties -> temperature -> top-k -> top-p -> min-p (each filter sees the
distribution renormalised over what the previous ones kept) -> sample.

Random rows sample by the "exponential race": argmax(p / E) with E ~ Exp(1) i.i.d. picks token i
with probability p_i. It needs no cumulative sums and lets each seeded request draw its noise
from its own generator, so a seeded request gives the same tokens whatever else is in the batch.
Returned logprobs are those of the model's raw distribution (log_softmax of the logits before
penalties and temperature), as vLLM returns by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlengine.engine.request import Request


@dataclass
class SamplingTensors:
    temperature: torch.Tensor  # [B] float32; 0 = greedy
    top_k: torch.Tensor  # [B] int64; vocab size = disabled
    top_p: torch.Tensor  # [B] float32
    min_p: torch.Tensor  # [B] float32
    repetition_penalty: torch.Tensor | None  # [B] or None when no row uses penalties
    presence_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    prompt_mask: torch.Tensor | None  # [B, V] bool: token occurs in the prompt
    output_counts: torch.Tensor | None  # [B, V] int: occurrences in the generated tokens
    min_tokens_mask: torch.Tensor | None  # [B, V] bool: stop tokens banned until min_tokens
    all_greedy: bool
    any_filter: bool
    seeded_rows: list[tuple[int, torch.Generator]]
    max_logprobs: int  # -1: no row asked for logprobs

    @staticmethod
    def from_requests(requests: list[Request], vocab_size: int, device: torch.device) -> "SamplingTensors":
        ps = [r.params for r in requests]
        b = len(requests)
        # once per step over the whole batch: len() of the list rather than the num_output_tokens property
        if all(p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
               and p.frequency_penalty == 0.0 and len(r.output_token_ids) >= p.min_tokens
               for p, r in zip(ps, requests)):
            # the common benchmark case: argmax only, no per-row tensors to build or copy
            return SamplingTensors(None, None, None, None, None, None, None, None, None, None,
                                   all_greedy=True, any_filter=False, seeded_rows=[], max_logprobs=-1)
        temperature = torch.tensor([p.temperature for p in ps], dtype=torch.float32)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in ps], dtype=torch.int64)
        top_p = torch.tensor([p.top_p for p in ps], dtype=torch.float32)
        min_p = torch.tensor([p.min_p for p in ps], dtype=torch.float32)
        any_filter = bool((top_k < vocab_size).any() or (top_p < 1).any() or (min_p > 0).any())
        use_penalties = any(
            p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in ps
        )
        rep = pres = freq = prompt_mask = output_counts = None
        if use_penalties:
            rep = torch.tensor([p.repetition_penalty for p in ps], dtype=torch.float32, device=device)
            pres = torch.tensor([p.presence_penalty for p in ps], dtype=torch.float32, device=device)
            freq = torch.tensor([p.frequency_penalty for p in ps], dtype=torch.float32, device=device)
            prompt_mask = _token_counts([r.prompt_token_ids for r in requests], vocab_size, device) > 0
            output_counts = _token_counts([r.output_token_ids for r in requests], vocab_size, device)
        min_tokens_mask = None
        if any(r.num_output_tokens < r.params.min_tokens for r in requests):
            min_tokens_mask = torch.zeros(b, vocab_size, dtype=torch.bool)
            for i, r in enumerate(requests):
                if r.num_output_tokens < r.params.min_tokens:
                    banned = list(r.eos_token_ids) + list(r.params.stop_token_ids)
                    if banned:
                        min_tokens_mask[i, banned] = True
            min_tokens_mask = min_tokens_mask.to(device)
        seeded = []
        for i, r in enumerate(requests):
            if r.params.seed is not None and not r.params.greedy:
                if r.generator is None:
                    r.generator = torch.Generator(device=device).manual_seed(r.params.seed)
                seeded.append((i, r.generator))
        max_logprobs = max((p.logprobs for p in ps if p.logprobs is not None), default=-1)
        return SamplingTensors(
            temperature=temperature.to(device),
            top_k=top_k.to(device),
            top_p=top_p.to(device),
            min_p=min_p.to(device),
            repetition_penalty=rep,
            presence_penalty=pres,
            frequency_penalty=freq,
            prompt_mask=prompt_mask,
            output_counts=output_counts,
            min_tokens_mask=min_tokens_mask,
            all_greedy=all(p.greedy for p in ps),
            any_filter=any_filter,
            seeded_rows=seeded,
            max_logprobs=max_logprobs,
        )


def _token_counts(seqs: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    counts = torch.zeros(len(seqs), vocab_size, dtype=torch.int32, device=device)
    longest = max((len(s) for s in seqs), default=0)
    if longest == 0:
        return counts
    ids = torch.full((len(seqs), longest), vocab_size, dtype=torch.int64)  # vocab_size = padding
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
    padded = torch.zeros(len(seqs), vocab_size + 1, dtype=torch.int32, device=device)
    ids = ids.to(device)
    padded.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    return padded[:, :vocab_size].contiguous()


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    sampled_logprobs: torch.Tensor | None  # [B] float32
    top_logprobs: torch.Tensor | None  # [B, n] float32
    top_token_ids: torch.Tensor | None  # [B, n] int64


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    if t.repetition_penalty is None:
        return logits
    seen = t.prompt_mask | (t.output_counts > 0)
    rep = t.repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - t.frequency_penalty[:, None] * t.output_counts
    logits = logits - t.presence_penalty[:, None] * (t.output_counts > 0)
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, then the top-p nucleus, then below min_p times
    the top probability. The most likely token always survives."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # keep a token if the mass strictly before it is below top_p
    drop = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    sorted_logits = sorted_logits.masked_fill(probs < min_p[:, None] * probs[:, :1], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def skip_sampling_steps(request, vocab_size: int, device: torch.device, steps: int = 1) -> None:
    """Advance a seeded request's generator past `steps` sampling steps taken elsewhere (a
    prefill engine sampled its first token), so that its next draws are the ones a single
    engine would make. A step draws one exponential vector of vocab_size float32 numbers
    (`Sampler.__call__`); greedy and unseeded requests draw nothing of their own."""
    p = request.params
    if p.seed is None or p.greedy or steps <= 0:
        return
    if request.generator is None:
        request.generator = torch.Generator(device=device).manual_seed(p.seed)
    buf = torch.empty(vocab_size, dtype=torch.float32, device=device)
    for _ in range(steps):
        buf.exponential_(generator=request.generator)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _default_generator(self, device: torch.device) -> torch.Generator:
        g = self._generators.get(device)
        if g is None:
            g = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return g

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = logits.log_softmax(dim=-1) if t.max_logprobs >= 0 else None
        logits = apply_penalties(logits, t)
        if t.min_tokens_mask is not None:
            logits = logits.masked_fill(t.min_tokens_mask, float("-inf"))
        greedy_ids = logits.argmax(dim=-1)
        if t.all_greedy:
            token_ids = greedy_ids
        else:
            temp = torch.where(t.temperature > 0, t.temperature, torch.ones_like(t.temperature))
            scaled = logits / temp[:, None]
            if t.any_filter:
                scaled = filter_logits(scaled, t.top_k, t.top_p, t.min_p)
            probs = scaled.softmax(dim=-1)
            noise = torch.empty_like(probs).exponential_(generator=self._default_generator(probs.device))
            for row, gen in t.seeded_rows:
                noise[row].exponential_(generator=gen)
            sampled = (probs / noise).argmax(dim=-1)
            token_ids = torch.where(t.temperature > 0, sampled, greedy_ids)
        out = SamplerOutput(token_ids=token_ids, sampled_logprobs=None, top_logprobs=None, top_token_ids=None)
        if raw_logprobs is not None:
            out.sampled_logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
            if t.max_logprobs > 0:
                out.top_logprobs, out.top_token_ids = raw_logprobs.topk(t.max_logprobs, dim=-1)
        return out
