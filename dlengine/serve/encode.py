"""`dlengine serve --mode encode`: an encoder engine (docs/vision.md, EPD) over HTTP.

- POST /v1/encode takes the body of a chat completion request (the router sends the client's
  request unchanged) and encodes the images of its messages' `image_url` parts and the videos of
  their `video` (frames) and `video_url` parts, each kind in message order, exactly as a chat
  server reads them (serve/media.py), so the content hashes agree. The answer is
  `{"ec_transfer_params": signed params, "num_images": n, "num_image_tokens": t, "num_videos": v,
  "num_video_tokens": u}`; a request without images or videos gets `{"ec_transfer_params": null,
  ...}`. The params are signed with the deployment's --pd-secret (serve/pd_auth.py, under
  `encoder_url`); a prefill or hybrid server given them in its chat request
  (`ec_transfer_params`) pulls the embeddings over DLSlime.
- POST /ec/free {"ec_transfer_params": signed} releases the pinned embeddings now (a router
  calls it when the request will not reach a prefill server); the prefill side's pull and the
  pin timeout release them otherwise.
- GET /health, GET /v1/models, GET /metrics (the encoder's counters as Prometheus gauges).

The vision tower runs on one worker thread (one request at a time, in arrival order); a
background thread polls the pins every few milliseconds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import ValidationError

from dlengine import __version__
from dlengine.disagg.encoder import EncoderBusyError, EncoderEngine
from dlengine.serve.errors import APIError, bad_request, install_error_handlers
from dlengine.serve.guards import BodyLimitMiddleware, require_api_key
from dlengine.serve.media import image_bytes, video_input
from dlengine.serve.pd_auth import ENCODER_URL, PDAuthError, sign, verify
from dlengine.serve.protocol import ModelCard, ModelList, VideoFramesPart, VideoURLPart
from dlengine.serve.state import ServeConfig

logger = logging.getLogger("dlengine.serve")
POLL_INTERVAL_S = 0.005


VIDEO_PARTS = {"video": VideoFramesPart, "video_url": VideoURLPart}


def chat_media(body: dict, allowed_local_media_path: str | None) -> tuple[list[bytes], list]:
    """(the encoded images of a chat request's `image_url` parts, the videos of its `video` and
    `video_url` parts), each in message order: what a chat server hands its engine."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("the body must be a chat completion request with 'messages'", param="messages")
    images, videos = [], []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
                if not isinstance(url, str):
                    raise bad_request(f"messages[{i}]: an image_url part needs image_url.url", param="messages")
                images.append(image_bytes(url, allowed_local_media_path, f"messages[{i}] image {len(images)}"))
            elif kind in VIDEO_PARTS:
                where = f"messages[{i}] video {len(videos)}"
                try:
                    parsed = VIDEO_PARTS[kind].model_validate(part)
                except ValidationError as e:
                    raise bad_request(f"{where}: not a valid {kind!r} part: {e.errors()[0]['msg']} at "
                                      f"{'.'.join(str(x) for x in e.errors()[0]['loc'])}", param="messages") from None
                videos.append(video_input(parsed, allowed_local_media_path, where))
    return images, videos


@dataclass
class EncodeServerState:
    """What the routes (and the shared guards, which read `config`) need."""

    encoder: EncoderEngine
    config: ServeConfig


def create_encode_app(encoder: EncoderEngine, config: ServeConfig) -> FastAPI:
    """The encoder server's app; the encoder belongs to the caller (close it after the server stops)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlengine-encoder")
    stop = threading.Event()

    def poll_pins() -> None:
        while not stop.wait(POLL_INTERVAL_S):
            try:
                encoder.poll()
            except Exception:  # keep releasing what can be released; say why once per failure
                logger.exception("encoder pin poll failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        poller = threading.Thread(target=poll_pins, name="dlengine-encoder-pins", daemon=True)
        poller.start()
        registration = None
        try:
            if config.ctrl_address:
                from dlengine.serve.registration import register_server

                registration = register_server(config.ctrl_address, http_url=config.public_url or "", role="encode",
                                               model=config.served_model_name, scope=config.ctrl_scope,
                                               engine_id=encoder.engine_id)
            yield
        finally:
            stop.set()
            if registration is not None:
                registration.close()
            executor.shutdown(wait=False)
            poller.join(1.0)

    app = FastAPI(title="dlengine encoder", version=__version__, lifespan=lifespan,
                  description="Image and video embeddings of a vision model for prefill servers (EPD)")
    app.state.server = EncodeServerState(encoder, config)
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    async def metrics():
        facts = encoder.describe()["ec_transfer"]
        lines = [f"dlengine_encoder_{k} {v}" for k, v in facts.items() if isinstance(v, (int, float))]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.get("/models", response_model=ModelList)
    async def list_models():
        return ModelList(data=[ModelCard(id=config.served_model_name, root=encoder.config.model.path,
                                         max_model_len=encoder.config.max_model_len)])

    @v1.post("/encode")
    async def encode(raw: Request):
        try:
            body = await raw.json()
        except ValueError:
            raise bad_request("the body must be JSON (a chat completion request)") from None
        if not isinstance(body, dict):
            raise bad_request("the body must be a JSON object (a chat completion request)")
        if body.get("model") is not None and body.get("model") != config.served_model_name:
            raise APIError(404, f"model {body.get('model')!r} is not served here ({config.served_model_name!r})",
                           param="model", code="model_not_found")
        images, videos = chat_media(body, config.allowed_local_media_path)
        if not images and not videos:
            return {"ec_transfer_params": None, "num_images": 0, "num_image_tokens": 0, "num_videos": 0,
                    "num_video_tokens": 0}
        try:
            params = await asyncio.get_running_loop().run_in_executor(
                executor, functools.partial(encoder.encode, images, videos=videos))
        except EncoderBusyError as e:
            raise APIError(503, str(e), type="server_error", code="encoder_busy") from None
        signed = sign(config.pd_secret, params, prefill_url=config.public_url or "", ttl_s=params["pin_timeout_s"],
                      url_key=ENCODER_URL) if config.pd_secret else params
        return {"ec_transfer_params": signed, "num_images": len(params["images"]),
                "num_image_tokens": sum(im["num_tokens"] for im in params["images"]),
                "num_videos": len(params["videos"]),
                "num_video_tokens": sum(v["num_tokens"] for v in params["videos"])}

    app.include_router(v1)

    @app.post("/ec/free")
    async def free(raw: Request):
        try:
            body = await raw.json()
        except ValueError:
            raise bad_request("the body must be JSON: {\"ec_transfer_params\": {...}}") from None
        try:
            params, _ = verify(config.pd_secret, body.get("ec_transfer_params") if isinstance(body, dict) else None,
                               url_key=ENCODER_URL, what="ec_transfer_params")
        except PDAuthError as e:
            raise APIError(403, str(e), param="ec_transfer_params", code="invalid_ec_transfer_params") from None
        rid = params.get("request_id")
        if not isinstance(rid, str):
            raise bad_request("ec_transfer_params carry no request_id", param="ec_transfer_params")
        return {"freed": encoder.release(rid)}

    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    return app
