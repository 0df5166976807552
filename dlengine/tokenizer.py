"""Tokenizer loading and incremental detokenization."""

from __future__ import annotations

import os

from dlengine.config import ConfigError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str):
    """The checkpoint's tokenizer through transformers' AutoTokenizer, offline; None when the
    folder holds no tokenizer files (then prompts must be token ids)."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # a broken tokenizer must not look like a missing one
        raise ConfigError(f"could not load the tokenizer in {path!r}: {e}") from e


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text without re-decoding everything each step.

    With a fast (Rust) tokenizer it uses `tokenizers.decoders.DecodeStream`, which keeps the
    state on the Rust side (a few microseconds a token). Otherwise it decodes a small window
    (from `prefix_offset`) and emits what is new relative to the window's previous decode. Both
    hold text back while it ends in an incomplete UTF-8 sequence, since the next token may
    complete it. `update` must be called once for every appended token.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self._rust = getattr(tokenizer, "_tokenizer", None)
        self._stream = None
        if self._rust is not None:
            try:
                from tokenizers.decoders import DecodeStream

                self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            except ImportError:  # tokenizers < 0.21
                self._stream = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def update(self, ids: list[int]) -> str:
        """Feed the full output id list (its last id is new); returns the newly decoded text."""
        if self._stream is not None:
            chunk = self._stream.step(self._rust, ids[-1])
            if chunk:
                self.text += chunk
                return chunk
            return ""
        prefix = self._decode(ids[self.prefix_offset : self.read_offset])
        full = self._decode(ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(ids)
            self.text += new
            return new
        return ""

    def flush(self, ids: list[int]) -> str:
        """Final text: one full decode, so held-back bytes appear exactly as a batch decode shows them."""
        final = self._decode(ids)
        new = final[len(self.text) :] if final.startswith(self.text) else final
        self.text = final
        return new
