"""Images of chat messages (OpenAI `image_url` content parts) for vision models.

A part's URL is a base64 data URL (`data:image/png;base64,...`), or, when the server was started
with --allowed-local-media-path DIR, a `file://` URL of a file under DIR. The server never fetches
http(s) URLs: it would make the server a client of whatever address a request names (and tests
run offline); such a part is answered 400 naming the alternatives.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from dlengine.multimodal.images import decode_data_url
from dlengine.sampling_params import InvalidRequestError
from dlengine.serve.errors import bad_request


def image_bytes(url: str, allowed_local_media_path: str | None, where: str) -> bytes:
    """The encoded image an `image_url` names; APIError 400 when it cannot be had."""
    if url.startswith("data:"):
        try:
            return decode_data_url(url, where)
        except InvalidRequestError as e:
            raise bad_request(str(e), param="messages") from None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if not allowed_local_media_path:
            raise bad_request(f"{where}: file:// image URLs need the server option --allowed-local-media-path",
                              param="messages")
        root = os.path.realpath(allowed_local_media_path)
        path = os.path.realpath(unquote(parsed.path))
        if os.path.commonpath([root, path]) != root:
            raise bad_request(f"{where}: {path!r} is outside the allowed local media path", param="messages")
        if not os.path.isfile(path):
            raise bad_request(f"{where}: no file at {path!r}", param="messages")
        with open(path, "rb") as f:
            return f.read()
    if parsed.scheme in ("http", "https"):
        raise bad_request(f"{where}: this server does not fetch image URLs; send the image inline as a base64 data "
                          "URL (data:image/png;base64,...)", param="messages")
    raise bad_request(f"{where}: unsupported image URL scheme {parsed.scheme!r}; use a base64 data URL",
                      param="messages")
