"""Signing kv_transfer_params, so that only what a prefill server handed out is ever pulled.

A prefill server signs the params it hands out with HMAC-SHA256 under a secret every server of
the deployment shares (`--pd-secret` / DLENGINE_PD_SECRET). A decode server (and a prefill
server's /pd/free and /pd/hold) accepts params only with a valid, unexpired signature: a client
that forges or edits them (another request's blocks, another prefill engine, another nonce) is
refused before anything is pulled or freed.

The signature covers every field, the two this module adds included: `prefill_url` (the HTTP
address of the prefill server, where a decode server holds its liveness stream) and
`expires_at` (wall-clock seconds; the pin timeout after hand-off, past which the blocks are
gone anyway).

An encoder server signs its `ec_transfer_params` the same way (same secret), with its own
address under `encoder_url` (`url_key`) instead of `prefill_url`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

SIGNATURE = "signature"
PREFILL_URL = "prefill_url"
ENCODER_URL = "encoder_url"
EXPIRES_AT = "expires_at"
SECRET_ENV = "DLENGINE_PD_SECRET"
_ADDED = (SIGNATURE, PREFILL_URL, ENCODER_URL, EXPIRES_AT)


class PDAuthError(Exception):
    """kv_transfer_params without a valid signature (answered 403)."""


def _digest(secret: str, fields: dict) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(secret.encode(), canonical.encode(), hashlib.sha256).hexdigest()


def sign(secret: str, params: dict, *, prefill_url: str, ttl_s: float, url_key: str = PREFILL_URL) -> dict:
    """The engine's params plus its server's URL (under `url_key`), expires_at and their signature."""
    fields = {**params, url_key: prefill_url, EXPIRES_AT: time.time() + ttl_s}
    return {**fields, SIGNATURE: _digest(secret, fields)}


def verify(secret: str | None, signed: Any, url_key: str = PREFILL_URL, what: str = "kv_transfer_params"
           ) -> tuple[dict, str]:
    """(the engine's params, its server's URL) of signed params; PDAuthError when the server has
    no secret, or the params are unsigned, altered or expired."""
    server = "prefill" if url_key == PREFILL_URL else "encoder"
    if not secret:
        raise PDAuthError(f"this server has no PD secret (--pd-secret or DLENGINE_PD_SECRET), so it accepts no {what}")
    if not isinstance(signed, dict) or not isinstance(signed.get(SIGNATURE), str):
        raise PDAuthError(f"{what} are not signed: pass them exactly as the {server} server returned them")
    fields = {k: v for k, v in signed.items() if k != SIGNATURE}
    if not hmac.compare_digest(_digest(secret, fields), signed[SIGNATURE]):
        raise PDAuthError(f"{what} signature does not match: they were altered, or signed with another secret")
    expires = fields.get(EXPIRES_AT)
    if not isinstance(expires, (int, float)) or expires < time.time():
        raise PDAuthError(f"{what} have expired (the {server} server has freed what they name)")
    url = fields.get(url_key)
    return {k: v for k, v in fields.items() if k not in _ADDED}, url if isinstance(url, str) else ""
