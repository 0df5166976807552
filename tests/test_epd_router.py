"""EPD over HTTP: `dlengine serve --mode encode` and the router's three-stage path, over real
`dlengine serve` processes on 127.0.0.1 (tiny-qwen3-vl on the CPU) and the openai client.
encode -> prefill -> decode and encode -> hybrid answers equal a hybrid server's own, for images
and for videos sent as `video` parts (frames as image data URLs); a dead encoder is routed
around (the prefill server encodes)."""

import base64
import io
import os
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("fastapi", reason="the router needs the serve extra: pip install 'dlengine[serve]'")
openai = pytest.importorskip("openai")
pytest.importorskip("dlslime", reason="needs DLSlime: pip install 'dlengine[dlslime]'")

from dlengine.router import RouterConfig  # noqa: E402
from dlengine.testing.vl import tiny_image, tiny_video  # noqa: E402

from router_helpers import ENGINE_FLAGS, SECRET, RunningRouter, ServeProcess, wait_for  # noqa: E402
from serve_helpers import free_port  # noqa: E402


class VLServeProcess(ServeProcess):
    """`dlengine serve tiny-qwen3-vl --mode MODE` on a free port."""

    def __init__(self, mode: str, *extra: str) -> None:
        self.mode, self.port = mode, free_port()
        if mode != "hybrid":
            extra = ("--transfer-port", str(free_port()), *extra)
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DLENGINE_PD_SECRET": SECRET,
               "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dlengine.cli", "serve", "tiny-qwen3-vl", "--port", str(self.port), "--mode", mode,
             "--served-model-name", "tiny-vl", "--log-level", "warning", "--encoder-staging-mib", "1",
             *ENGINE_FLAGS, *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


MESSAGES = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(tiny_image())}},
                                          {"type": "text", "text": "What is in this picture?"}]}],
            [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                          {"type": "image_url", "image_url": {"url": data_url(tiny_image())}},
                                          {"type": "text", "text": "with"},
                                          {"type": "image_url",
                                           "image_url": {"url": data_url(tiny_image(40, 24, seed=1))}}]}]]


def video_part(frames, fps=None) -> dict:
    part = {"type": "video", "video": [data_url(f) for f in frames]}
    return part if fps is None else dict(part, fps=fps)


# a video (2 temporal patches of 16 tokens), and an image beside a video at 1 fps (3 of 15)
VIDEO_MESSAGES = [[{"role": "user", "content": [video_part(tiny_video()),
                                                {"type": "text", "text": "What happens in it?"}]}],
                  [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                                {"type": "image_url", "image_url": {"url": data_url(tiny_image())}},
                                                {"type": "text", "text": "with"},
                                                video_part(tiny_video(6, 40, 24, seed=1), fps=1)]}]]


@pytest.fixture(scope="module")
def servers():
    procs = {mode: VLServeProcess(mode) for mode in ("encode", "prefill", "decode", "hybrid")}
    try:
        for p in procs.values():
            p.wait_ready()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def ask(url: str, messages, stream: bool = False) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    if stream:
        chunks = client.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=8, temperature=0.0,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    r = client.chat.completions.create(model="tiny-vl", messages=messages, max_tokens=8, temperature=0.0)
    assert r.choices[0].finish_reason == "length"
    return r.choices[0].message.content


def encoder_counter(server, name: str) -> float:
    return server.metric(f"dlengine_encoder_{name}")


def test_encode_server_hands_out_signed_params(servers):
    enc = servers["encode"]
    r = httpx.post(f"{enc.url}/v1/encode", json={"model": "tiny-vl", "messages": MESSAGES[1]}, timeout=30)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["num_images"] == 2 and answer["num_image_tokens"] == 16 + 15
    signed = answer["ec_transfer_params"]
    assert signed["signature"] and signed["encoder_url"] == enc.url
    # an altered copy is refused by a prefill server before anything is pulled
    bad = {**signed, "nonce": signed["nonce"] + 1}
    r = httpx.post(f"{servers['prefill'].url}/v1/chat/completions", timeout=30,
                   json={"model": "tiny-vl", "messages": MESSAGES[1], "max_tokens": 2, "ec_transfer_params": bad})
    assert r.status_code == 403 and "signature" in r.json()["error"]["message"]
    r = httpx.post(f"{enc.url}/ec/free", json={"ec_transfer_params": signed}, timeout=10)
    assert r.json() == {"freed": True}
    no_images = httpx.post(f"{enc.url}/v1/encode", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert no_images.json()["ec_transfer_params"] is None


def test_videos_go_through_the_encoder(servers):
    """/v1/encode takes `video` parts (list of frames, with or without fps); the router's
    three-stage path and encode -> hybrid send video requests through the encoder, and the
    answers equal a hybrid server's. (Before the test below, which kills the encoder.)"""
    enc = servers["encode"]
    r = httpx.post(f"{enc.url}/v1/encode", json={"model": "tiny-vl", "messages": VIDEO_MESSAGES[1]}, timeout=30)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["num_images"] == 1 and answer["num_image_tokens"] == 16
    assert answer["num_videos"] == 1 and answer["num_video_tokens"] == 3 * 15
    assert [v["grid_thw"] for v in answer["ec_transfer_params"]["videos"]] == [[3, 6, 10]]
    assert httpx.post(f"{enc.url}/ec/free", json={"ec_transfer_params": answer["ec_transfer_params"]},
                      timeout=10).json() == {"freed": True}
    bad = [{"role": "user", "content": [{"type": "video", "video": [data_url(tiny_image())]}]}]
    r = httpx.post(f"{enc.url}/v1/encode", json={"messages": bad}, timeout=30)
    assert r.status_code == 400 and "at least temporal_patch_size = 2 frames" in r.json()["error"]["message"]

    expected = [ask(servers["hybrid"].url, m) for m in VIDEO_MESSAGES]
    epd = RunningRouter(RouterConfig(encode=[enc.url], prefill=[servers["prefill"].url],
                                     decode=[servers["decode"].url], health_interval_s=0.5))
    eh = RunningRouter(RouterConfig(encode=[enc.url], hybrid=[servers["hybrid"].url], health_interval_s=0.5))
    try:
        videos, done = encoder_counter(enc, "videos"), encoder_counter(enc, "released_done")
        for messages, exp in zip(VIDEO_MESSAGES, expected):
            assert ask(epd.url, messages) == exp
            assert ask(eh.url, messages) == exp
        assert encoder_counter(enc, "videos") == videos + 2 * len(VIDEO_MESSAGES)
        wait_for(lambda: encoder_counter(enc, "released_done") == done + 2 * len(VIDEO_MESSAGES), 10,
                 "the encoder released every pulled request")
        assert encoder_counter(enc, "pinned_requests") == 0
    finally:
        epd.stop()
        eh.stop()


def test_router_three_stage_and_encode_hybrid_match_a_hybrid_server(servers):
    expected = [ask(servers["hybrid"].url, m) for m in MESSAGES]
    epd = RunningRouter(RouterConfig(encode=[servers["encode"].url], prefill=[servers["prefill"].url],
                                     decode=[servers["decode"].url], health_interval_s=0.5))
    eh = RunningRouter(RouterConfig(encode=[servers["encode"].url], hybrid=[servers["hybrid"].url],
                                    health_interval_s=0.5))
    try:
        done = encoder_counter(servers["encode"], "released_done")
        for messages, exp in zip(MESSAGES, expected):
            assert ask(epd.url, messages) == exp
            assert ask(epd.url, messages, stream=True) == exp
            assert ask(eh.url, messages) == exp
        # every hand-off was pulled (the pull's done write released it), none timed out
        wait_for(lambda: encoder_counter(servers["encode"], "released_done") == done + 3 * len(MESSAGES), 10,
                 "the encoder released every pulled request")
        assert encoder_counter(servers["encode"], "pinned_requests") == 0
        assert 'path="encode"' in httpx.get(f"{epd.url}/metrics").text

        servers["encode"].kill()  # a dead encoder: routed around, the prefill server encodes itself
        assert ask(epd.url, MESSAGES[0]) == expected[0]
        assert servers["encode"].url not in epd.urls("encode")
    finally:
        epd.stop()
        eh.stop()
