"""From an OpenAI request to what the engine takes: token-id prompts and SamplingParams.

Only the mapping lives here; SamplingParams checks every range (and raises InvalidRequestError,
answered as a 400 naming the field) and the engine checks prompts against the vocabulary and
max_model_len.
"""

from __future__ import annotations

from dlengine.sampling_params import SamplingParams
from dlengine.serve.errors import bad_request
from dlengine.serve.protocol import SamplingFields

MAX_N = 128  # choices per request: each is a request in the engine
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64; torch generators take no more, and seed + index must fit too

# request field -> SamplingParams field, where the names agree and None keeps the engine default
_PASSTHROUGH = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                "repetition_penalty", "stop_token_ids")


def sampling_params(req: SamplingFields, *, max_tokens: int | None, default_max_tokens: int,
                    logprobs: int | None, vocab_size: int) -> SamplingParams:
    """The request's SamplingParams. `max_tokens` None means `default_max_tokens` (completions:
    OpenAI's 16; chat: what is left of the context)."""
    if not 1 <= req.n <= MAX_N:
        raise bad_request(f"n must be in [1, {MAX_N}], got {req.n}", param="n")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}", param="logprobs")
    if req.seed is not None and not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]:
        raise bad_request(f"seed must be a 64-bit signed integer, got {req.seed}", param="seed")
    kwargs = {name: getattr(req, name) for name in _PASSTHROUGH if getattr(req, name) is not None}
    if req.top_k is not None and req.top_k > vocab_size:
        kwargs["top_k"] = vocab_size  # the same filter (none), and a number a tensor can hold
    if req.stop is not None:
        kwargs["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    return SamplingParams(
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
        **kwargs)


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of choice `index` of n: seeded requests get seed + index, so the n choices
    differ and each is reproducible."""
    if index == 0 or params.seed is None:
        return params
    fields = {k: getattr(params, k) for k in params.__dataclass_fields__}
    fields["seed"] = params.seed + index
    return SamplingParams(**fields)


def completion_prompts(prompt, tokenizer) -> list[list[int]]:
    """A completions `prompt` (a string, a list of strings, a list of token ids, or a list of
    those) as token-id lists, tokenised as `Engine.add_request` would."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    elif isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise bad_request("this model has no tokenizer: send prompts as token ids", param="prompt")
            out.append(list(tokenizer.encode(p)))
        else:
            out.append(list(p))
    return out
