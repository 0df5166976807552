"""Which backend of a role a request goes to.

- round-robin: the healthy backends in turn (one counter per role).
- least-load: the one holding the fewest requests (ties: URL order): the count its /metrics reported
  at the last health round plus what this router sent it since (router/load.py), or this
  router's in-flight count where a backend reports none.
- prefix-affinity: rendezvous hashing of the prompt's first `prefix_chars` characters (a chat's
  messages as JSON): requests sharing that prefix go to the same backend, whose prefix cache then
  hits; a backend leaving moves only its own prefixes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Sequence

from dlengine.router.backends import Backend


def prefix_key(body: dict, prefix_chars: int) -> str:
    if "messages" in body:
        text = json.dumps(body.get("messages"), sort_keys=True, separators=(",", ":"))
    else:
        prompt = body.get("prompt", "")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt, separators=(",", ":"))
    return text[:prefix_chars]


class Policy:
    def __init__(self, name: str, prefix_chars: int = 256) -> None:
        self.name, self.prefix_chars = name, prefix_chars
        self._turns: dict[str, itertools.count] = {}

    def choose(self, candidates: Sequence[Backend], body: dict, role: str) -> Backend:
        """One of `candidates` (non-empty, in a stable order)."""
        if self.name == "least-load":
            return min(candidates, key=lambda b: b.load)
        if self.name == "prefix-affinity":
            key = prefix_key(body, self.prefix_chars).encode()
            return max(candidates, key=lambda b: hashlib.sha256(key + b"\0" + b.url.encode()).digest())
        turn = next(self._turns.setdefault(role, itertools.count()))
        return candidates[turn % len(candidates)]
