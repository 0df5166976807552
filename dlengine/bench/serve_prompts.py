"""Prompts for `dlengine bench serve`, built from the offline bench's datasets (datasets.py).

An online benchmark may not know the server's tokenizer, so a random prompt takes one of three
forms, best first:
- "token ids": random ids from `--tokenizer`'s vocabulary (special ids left out), sent as a
  token-id `prompt` to /v1/completions (OpenAI's API allows a list of ints there). Exact lengths.
  A config-only preset (qwen3-0.6b, served with --load-format dummy) has no tokenizer: its
  config's vocab_size gives the ids (`VocabularyOnly`), which is all such a server accepts.
- "tokenizer text": the same ids decoded to text with `--tokenizer`, for the chat endpoint or a
  server that refuses token ids; the length is re-counted with the tokenizer (decoding and
  re-encoding random ids does not give back the same count).
- "random words": without a tokenizer, words drawn from a fixed list, `input_len` words per
  prompt (most are one token in common BPE vocabularies, plus a leading space).
The same lengths, range ratio, shared prefix and seed rules as the offline random dataset apply
in every form: the words are `random_requests` ids used as indices into the word list.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence, Union

from dlengine.bench.common import BenchError
from dlengine.bench.datasets import BenchRequest, load_jsonl_requests, random_requests

Prompt = Union[str, list[int]]

WORDS = tuple("""
the of and to in is it you that he was for on are with as his they be at one have this from or had by
hot word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than call first who may down side
been now find any new work part take get place made live where after back little only round man year came
show every good me give our under name very through just form sentence great think say help low line differ
turn cause much mean before move right boy old too same tell does set three want air well also play small
end put home read hand port large spell add even land here must big high such follow act why ask men change
went light kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food sun four
between state keep eye never last let thought city tree cross farm hard start might story saw far sea draw
left late run while press close night real life few north open seem together next white children begin got
walk example ease paper group always music those both mark often letter until mile river car feet care
second book carry took science eat room friend began idea fish mountain stop once base hear horse cut sure
watch color face wood main enough plain girl usual young ready above ever red list though feel talk bird
""".split())


@dataclass
class ServePrompt:
    prompt: Prompt
    output_len: int
    prompt_len: int | None  # tokens, when known before the server answers (its usage says for sure)


def special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            ids.add(v)
    return ids


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def random_prompts(num_prompts: int, input_len: int, output_len: int, *, range_ratio: float = 0.0,
                   prefix_len: int = 0, seed: int = 0, tokenizer=None) -> tuple[list[ServePrompt], str]:
    """Random prompts and their kind: token ids with a tokenizer, else random words."""
    if tokenizer is not None:
        reqs = random_requests(num_prompts, input_len, output_len, len(tokenizer), range_ratio=range_ratio,
                               prefix_len=prefix_len, exclude_ids=special_ids(tokenizer), seed=seed)
        return [ServePrompt(r.prompt, r.output_len, len(r.prompt)) for r in reqs], "token ids"
    reqs = random_requests(num_prompts, input_len, output_len, len(WORDS), range_ratio=range_ratio,
                           prefix_len=prefix_len, seed=seed)
    return [ServePrompt(" ".join(WORDS[i] for i in r.prompt), r.output_len, None) for r in reqs], "random words"


def jsonl_prompts(path: str, num_prompts: int, output_len: int, tokenizer=None) -> tuple[list[ServePrompt], str]:
    """The first `num_prompts` requests of a JSONL file (datasets.load_jsonl_requests' format)."""
    reqs: list[BenchRequest] = load_jsonl_requests(path, num_prompts, output_len)
    out = []
    for r in reqs:
        if isinstance(r.prompt, str):
            n = count_tokens(tokenizer, r.prompt) if tokenizer is not None else None
        else:
            n = len(r.prompt)
        out.append(ServePrompt(r.prompt, r.output_len, n))
    kinds = {isinstance(p.prompt, str) for p in out}
    kind = "text" if kinds == {True} else ("token ids" if kinds == {False} else "text and token ids")
    return out, kind


def as_text(prompts: Sequence[ServePrompt], tokenizer, why: str) -> list[ServePrompt]:
    """Token-id prompts decoded to text (lengths re-counted); text prompts unchanged. `why` says
    in the error why text is needed when there is no tokenizer to decode with."""
    if all(isinstance(p.prompt, str) for p in prompts):
        return list(prompts)
    if tokenizer is None:
        raise BenchError(f"{why}, and token-id prompts need --tokenizer to be turned into text")
    out = []
    for p in prompts:
        if isinstance(p.prompt, str):
            out.append(p)
            continue
        text = tokenizer.decode(p.prompt, skip_special_tokens=True)
        out.append(replace(p, prompt=text, prompt_len=count_tokens(tokenizer, text)))
    return out


class VocabularyOnly:
    """A config's vocabulary without a tokenizer: random token ids can be drawn from it, nothing
    can be decoded (a dummy-weight server of a config-only preset takes token ids only)."""

    def __init__(self, vocab_size: int, special: set[int], source: str) -> None:
        self.vocab_size = vocab_size
        self.all_special_ids = sorted(special)
        self.source = source

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise BenchError(f"{self.source} has a vocabulary but no tokenizer files: prompts can only be "
                         "token ids (use --endpoint completions, or a --tokenizer folder with tokenizer files)")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.decode([])  # raises: there is nothing to encode with
        return []


def _config_vocabulary(path: str, name: str) -> VocabularyOnly | None:
    import json
    import os

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)  # multimodal configs keep the language model's apart
    vocab = cfg.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        return None
    special: set[int] = set()
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        v = cfg.get(key)
        for i in (v if isinstance(v, list) else [v]):
            if isinstance(i, int):
                special.add(i)
    return VocabularyOnly(vocab, special, f"--tokenizer {name!r}")


def load_bench_tokenizer(name_or_path: str):
    """--tokenizer: a dlengine preset ("tiny-qwen3") or a local Hugging Face folder, offline. A
    folder with a config but no tokenizer files (the config-only presets) gives a
    `VocabularyOnly`: token-id prompts of exact lengths, nothing decoded."""
    import os

    from dlengine.builder import resolve_model_path
    from dlengine.tokenizer import load_tokenizer

    path = resolve_model_path(name_or_path)
    if not os.path.isdir(path):
        raise BenchError(f"--tokenizer {name_or_path!r} is neither a dlengine preset nor a folder")
    tok = load_tokenizer(path)
    if tok is None:
        tok = _config_vocabulary(path, name_or_path)
    if tok is None:
        raise BenchError(f"--tokenizer {name_or_path!r}: {path} holds no tokenizer files and no config "
                         "with a vocab_size")
    return tok
