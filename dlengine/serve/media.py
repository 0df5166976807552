"""Images and videos of chat messages (OpenAI `image_url` / `video_url` content parts, and
`video` parts listing frames as image URLs) for vision models.

A part's URL is a base64 data URL (`data:image/png;base64,...`, `data:video/mp4;base64,...`), or,
when the server was started with --allowed-local-media-path DIR, a `file://` URL of a file under
DIR. The server never fetches http(s) URLs: it would make the server a client of whatever address
a request names (and tests run offline); such a part is answered 400 naming the alternatives. A
video file is decoded only when a video decoder is importable (multimodal/videos.py); without one
a `video_url` part is answered 400 pointing at the list-of-frames form.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse

from dlengine.multimodal.images import decode_data_url
from dlengine.multimodal.videos import video_decoder
from dlengine.sampling_params import InvalidRequestError
from dlengine.serve.errors import bad_request
from dlengine.serve.protocol import VideoFramesPart, VideoURLPart


def image_bytes(url: str, allowed_local_media_path: str | None, where: str) -> bytes:
    """The encoded image an `image_url` names; APIError 400 when it cannot be had."""
    return _media_bytes(url, allowed_local_media_path, where, "image")


def video_bytes(url: str, allowed_local_media_path: str | None, where: str) -> bytes:
    """The encoded video a `video_url` names; APIError 400 when it cannot be had or decoded."""
    if video_decoder() is None:
        raise bad_request(f"{where}: this server cannot decode video files (no video decoder such as PyAV is "
                          "installed); send the frames as a {\"type\": \"video\", \"video\": [image data URLs]} "
                          "part", param="messages")
    return _media_bytes(url, allowed_local_media_path, where, "video")


def video_input(part: VideoURLPart | VideoFramesPart, allowed_local_media_path: str | None, where: str):
    """What the engine takes as the video of a part: the encoded file of a `video_url` part, or
    the frames (and fps) of a `video` part. A chat server and an encoder server (EPD) both make
    it here, so a video's content hash is the same on both."""
    if isinstance(part, VideoURLPart):
        return video_bytes(part.video_url.url, allowed_local_media_path, where)
    frames = [image_bytes(url, allowed_local_media_path, f"{where} frame {f}") for f, url in enumerate(part.video)]
    return {"frames": frames, "fps": part.fps}


def _media_bytes(url: str, allowed_local_media_path: str | None, where: str, media: str) -> bytes:
    if url.startswith("data:"):
        try:
            return decode_data_url(url, where, media)
        except InvalidRequestError as e:
            raise bad_request(str(e), param="messages") from None
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if not allowed_local_media_path:
            raise bad_request(f"{where}: file:// {media} URLs need the server option --allowed-local-media-path",
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
        raise bad_request(f"{where}: this server does not fetch {media} URLs; send the {media} inline as a base64 "
                          f"data URL (data:{media}/{'png' if media == 'image' else 'mp4'};base64,...)",
                          param="messages")
    raise bad_request(f"{where}: unsupported {media} URL scheme {parsed.scheme!r}; use a base64 data URL",
                      param="messages")
