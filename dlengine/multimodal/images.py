"""Turning what a caller passes as an image into a PIL image, with errors that name the problem."""

from __future__ import annotations

import base64
import io
import os
from typing import Any

from dlengine.sampling_params import InvalidRequestError


def load_image(image: Any, where: str = "image"):
    """A PIL RGB image from a PIL image, a numpy array ([H, W], [H, W, 3] or [H, W, 4], uint8 or
    floats in [0, 1]), a file path, or raw encoded bytes (PNG, JPEG, ...)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(image, Image.Image):
            img = image
        elif isinstance(image, np.ndarray):
            arr = image
            if arr.dtype != np.uint8:
                if not np.issubdtype(arr.dtype, np.floating):
                    raise InvalidRequestError(f"{where}: a numpy image must be uint8 or float in [0, 1], "
                                              f"not {arr.dtype}")
                arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
            if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
                raise InvalidRequestError(f"{where}: a numpy image must be [H, W] or [H, W, 1|3|4], "
                                          f"got shape {arr.shape}")
            img = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
        elif isinstance(image, (bytes, bytearray)):
            img = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, os.PathLike)):
            if not os.path.isfile(image):
                raise InvalidRequestError(f"{where}: no image file at {os.fspath(image)!r}")
            with Image.open(image) as f:
                img = f.copy()
        else:
            raise InvalidRequestError(f"{where}: an image is a PIL image, a numpy array, a file path or encoded "
                                      f"bytes, not {type(image).__name__}")
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InvalidRequestError(f"{where}: cannot decode the image: {e}") from None
    if img.width < 1 or img.height < 1:
        raise InvalidRequestError(f"{where}: the image is empty ({img.width} x {img.height})")
    return img.convert("RGB")


def decode_data_url(url: str, where: str = "image_url", media: str = "image") -> bytes:
    """The bytes of a `data:<media>/...;base64,...` URL (media "image" or "video")."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith(f"data:{media}/") or not head.endswith(";base64"):
        raise InvalidRequestError(f"{where}: expected a base64 data URL 'data:{media}/<type>;base64,...'")
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise InvalidRequestError(f"{where}: the data URL's payload is not valid base64") from None
