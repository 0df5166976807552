"""Draft-token proposers for speculative decoding (the engine's Speculator seam,
dlengine/engine/seams.py). `EngineBuilder.speculative("ngram", num_tokens=k)` builds the n-gram
proposer; any object with `propose(requests)` plugs in the same way."""

from dlengine.speculative.ngram import NgramProposer

__all__ = ["NgramProposer"]
