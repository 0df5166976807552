"""Logprobs in OpenAI's two shapes, from the engine's per-token {token id: logprob} dicts.

Completions (legacy): parallel lists `tokens`, `token_logprobs`, `top_logprobs` ({token text:
logprob}) and `text_offset`. Chat: `content`, one entry per token with its bytes and its top
alternatives. The engine's dict for a token holds the top-n tokens and the chosen one; both
shapes list them best first. Prompt tokens (`echo` with `logprobs`) are scored from
`Engine.prompt_logits`: position j's logprob comes from the logits at position j - 1, and the
first prompt token has none (None, as OpenAI and vLLM answer).
"""

from __future__ import annotations

from typing import Sequence

import torch

from dlengine.serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


class TokenText:
    """Token id -> its text, decoded alone (what a client sees as a token), memoised."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            if self.tokenizer is None:
                s = f"token_id:{token_id}"
            else:
                s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = s
        return s


def _best_first(d: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(d.items(), key=lambda kv: -kv[1])


def prompt_logprobs(logits: torch.Tensor, token_ids: Sequence[int], top_n: int) -> list[dict[int, float] | None]:
    """{token id: logprob} per prompt position (None for the first): the actual token and the
    top `top_n` of the distribution the model predicted it from."""
    lsm = torch.log_softmax(logits.float(), dim=-1)
    out: list[dict[int, float] | None] = [None]
    if len(token_ids) < 2:
        return out
    rows = lsm[:-1]  # row j - 1 predicts token j
    actual = torch.tensor(token_ids[1:], dtype=torch.long)
    actual_lp = rows.gather(1, actual[:, None]).squeeze(1).tolist()
    top_lp, top_ids = (rows.topk(top_n, dim=-1) if top_n > 0 else (None, None))
    for j, (tok, lp) in enumerate(zip(token_ids[1:], actual_lp)):
        d = {}
        if top_n > 0:
            d.update(zip(top_ids[j].tolist(), top_lp[j].tolist()))
        d[tok] = lp
        out.append(d)
    return out


def completion_logprobs(token_ids: Sequence[int], dicts: Sequence[dict[int, float] | None], text_of: TokenText,
                        start_offset: int = 0) -> CompletionLogprobs:
    result = CompletionLogprobs()
    offset = start_offset
    for tok, d in zip(token_ids, dicts):
        text = text_of(tok)
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += len(text)
        if d is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        result.token_logprobs.append(d.get(tok))
        top: dict[str, float] = {}
        for t, lp in _best_first(d):
            top.setdefault(text_of(t), lp)  # two tokens with the same text: keep the likelier
        result.top_logprobs.append(top)
    return result


def chat_logprobs(token_ids: Sequence[int], dicts: Sequence[dict[int, float]], text_of: TokenText,
                  top_n: int) -> ChatLogprobs:
    content = []
    for tok, d in zip(token_ids, dicts):
        text = text_of(tok)
        top = [TopLogprob(token=text_of(t), logprob=lp, bytes=list(text_of(t).encode()))
               for t, lp in _best_first(d)[:top_n]]
        content.append(TokenLogprob(token=text, logprob=d.get(tok, -9999.0), bytes=list(text.encode()),
                                    top_logprobs=top))
    return ChatLogprobs(content=content)
