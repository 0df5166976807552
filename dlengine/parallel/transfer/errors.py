"""Errors of KV transfer (shared by the transfer engines and the layout code)."""

from __future__ import annotations


class TransferError(RuntimeError):
    """A KV transfer (or the connection/handshake it needs) failed; the message says why."""


class HandshakeError(TransferError):
    """The two engines cannot exchange KV: different model, cache layout or dtype."""
