"""dlengine serve with Qwen3-VL video inputs: a `video` content part listing the frames as image
data URLs gives Engine.generate's tokens for the same frames (with its fps, too); `video_url`
parts need a video decoder, and without one are answered 400 naming the frames form; bad parts
are 400s naming the problem."""

import base64
import io

import httpx
import pytest

pytest.importorskip("fastapi", reason="dlengine serve needs the serve extra: pip install 'dlengine[serve]'")
openai = pytest.importorskip("openai")

from dlengine import EngineBuilder, SamplingParams  # noqa: E402
from dlengine.multimodal.videos import video_decoder  # noqa: E402
from dlengine.testing import tiny_checkpoint  # noqa: E402
from dlengine.testing.vl import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, tiny_image, tiny_video  # noqa: E402

from serve_helpers import MODEL, serving  # noqa: E402

PARAMS = SamplingParams(max_tokens=10, temperature=0.0)


def vl_engine():
    return (EngineBuilder(tiny_checkpoint("qwen3-vl")).dtype("float32").device("cpu")
            .cache(block_size=16, num_blocks=128).max_model_len(512).build())


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def frames_part(frames, fps=None) -> dict:
    part = {"type": "video", "video": [data_url(f) for f in frames]}
    return part if fps is None else dict(part, fps=fps)


def user_message(*parts) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Describe "}, *parts,
                                         {"type": "text", "text": " briefly."}]}]


@pytest.fixture(scope="module")
def server():
    engine = vl_engine()
    with serving(engine) as s:
        yield s
    engine.close()


@pytest.fixture(scope="module")
def engine():
    """An engine of its own for the expected answers (the server's steps on its own thread)."""
    e = vl_engine()
    yield e
    e.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def expected(engine, media: str, **inputs):
    """Engine.generate's greedy answer for the chat as text, with PIL frames."""
    text = "<|im_start|>user\nDescribe " + media + " briefly.<|im_end|>\n<|im_start|>assistant\n"
    [out] = engine.generate([dict(prompt=text, **inputs)], PARAMS)
    return out


def test_chat_with_video_frames(client, engine):
    """The text before the video ends in a space: the server hands the engine the rendered text,
    so the first timestamp is tokenised in context, as transformers' processor does."""
    want = expected(engine, VIDEO_PLACEHOLDER, videos=[tiny_video()])
    r = client.chat.completions.create(model=MODEL, messages=user_message(frames_part(tiny_video())),
                                       max_tokens=10, temperature=0.0)
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)


def test_chat_with_video_fps_and_image(client, engine):
    frames = tiny_video(6, 40, 24, seed=1)
    want = expected(engine, IMAGE_PLACEHOLDER + VIDEO_PLACEHOLDER, images=[tiny_image(seed=3)],
                    videos=[{"frames": frames, "fps": 1.0}])
    image = {"type": "image_url", "image_url": {"url": data_url(tiny_image(seed=3))}}
    r = client.chat.completions.create(model=MODEL, messages=user_message(image, frames_part(frames, fps=1)),
                                       max_tokens=10, temperature=0.0)
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)


@pytest.mark.parametrize("part, message", [
    ({"type": "video", "video": ["https://example.com/f.png"] * 4}, "does not fetch image URLs"),
    ({"type": "video", "video": [data_url(tiny_image())]}, "at least temporal_patch_size = 2 frames"),
    ({"type": "video", "video": []}, "the video has no frames"),
    ({"type": "video", "video": [data_url(tiny_image())] * 4, "fps": 0}, "fps must be a positive number"),
    ({"type": "video", "video": [data_url(tiny_image()), data_url(tiny_image(40, 24))]}, "all frames of a video"),
    ({"type": "video_url", "video_url": {"url": "https://example.com/clip.mp4"}},
     "does not fetch video URLs" if video_decoder() else "cannot decode video files"),
])
def test_bad_video_parts_are_400(server, part, message):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": user_message(part), "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    server.wait_idle()


def test_epd_takes_videos():
    """EPD carries video embeddings too: the router sends a request with video parts through an
    encoder, whose /v1/encode reads a `video` (list-of-frames) part as a chat server does (the
    same frames and fps, so the same content hash); a bad video part is a 400 naming it.
    tests/test_epd_router.py drives the servers."""
    from dlengine.router.proxy import has_media
    from dlengine.serve.encode import chat_media
    from dlengine.serve.errors import APIError

    frames = tiny_video()
    image = {"type": "image_url", "image_url": {"url": data_url(tiny_image())}}
    video = frames_part(frames, fps=2)
    assert has_media({"messages": user_message(image)})
    assert has_media({"messages": user_message(video)}) and has_media({"messages": user_message(image, video)})
    assert not has_media({"messages": [{"role": "user", "content": "hi"}]})
    images, videos = chat_media({"messages": user_message(video, image)}, None)
    assert len(images) == 1 and len(videos) == 1 and videos[0]["fps"] == 2
    assert videos[0]["frames"] == [base64.b64decode(u.split(",", 1)[1]) for u in video["video"]]
    with pytest.raises(APIError, match=r"messages\[0\] video 0: not a valid 'video' part"):
        chat_media({"messages": user_message({"type": "video", "frames": video["video"]})}, None)
    with pytest.raises(APIError, match="does not fetch image URLs"):
        chat_media({"messages": user_message({"type": "video", "video": ["https://example.com/f.png"] * 4})}, None)
