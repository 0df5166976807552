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

    Decodes a small window (from `prefix_offset`) and emits only what is new relative to the
    window's previous decode, holding text back while it ends in an incomplete UTF-8 sequence
    (U+FFFD) since the next token may complete it.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def update(self, ids: list[int]) -> str:
        """Feed the full output id list; returns the newly decoded text (maybe empty)."""
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
        """Final text: whatever the window still holds back is decoded as is."""
        full = self._decode(ids[self.prefix_offset :])
        prefix = self._decode(ids[self.prefix_offset : self.read_offset])
        new = full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(ids)
        self.text += new
        return new
