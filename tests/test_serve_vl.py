"""dlengine serve with a vision model: OpenAI chat `image_url` parts as base64 data URLs, driven by
the official `openai` client, equal to Engine.generate with the same image; http(s) URLs refused
(never fetched); file:// URLs only under --allowed-local-media-path."""

import base64
import io

import httpx
import pytest

pytest.importorskip("fastapi", reason="dlengine serve needs the serve extra: pip install 'dlengine[serve]'")
openai = pytest.importorskip("openai")

from dlengine import EngineBuilder, SamplingParams  # noqa: E402
from dlengine.testing import tiny_checkpoint  # noqa: E402
from dlengine.testing.vl import IMAGE_PLACEHOLDER, tiny_image  # noqa: E402

from serve_helpers import MODEL, serving  # noqa: E402


def vl_engine():
    return (EngineBuilder(tiny_checkpoint("qwen3-vl")).dtype("float32").device("cpu")
            .cache(block_size=16, num_blocks=128).max_model_len(512).build())


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Describe "},
                                         {"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": " briefly."}]}]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    tiny_image().save(d / "image.png")
    return d


@pytest.fixture(scope="module")
def server(media_dir):
    engine = vl_engine()
    with serving(engine, allowed_local_media_path=str(media_dir)) as s:
        yield s
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected():
    """Engine.generate's greedy answer for the same chat with the image as a PIL image."""
    engine = vl_engine()
    text = ("<|im_start|>user\nDescribe " + IMAGE_PLACEHOLDER + " briefly.<|im_end|>\n<|im_start|>assistant\n")
    [out] = engine.generate([{"prompt": text, "images": [tiny_image()]}], SamplingParams(max_tokens=10, temperature=0.0))
    engine.close()
    return out


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_chat_with_data_url_image(client, expected, fmt):
    r = client.chat.completions.create(model=MODEL, messages=user_message(data_url(tiny_image(), fmt)),
                                       max_tokens=10, temperature=0.0)
    if fmt == "PNG":  # lossless: the same pixels, the same tokens
        assert r.choices[0].message.content == expected.text
        assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    else:  # JPEG changes the pixels; it runs, with the image's tokens in the prompt
        assert r.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_chat_stream_with_image(client, expected):
    stream = client.chat.completions.create(model=MODEL, messages=user_message(data_url(tiny_image())),
                                            max_tokens=10, temperature=0.0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == expected.text


def test_file_url_under_allowed_path(client, expected, media_dir):
    r = client.chat.completions.create(model=MODEL, messages=user_message(f"file://{media_dir / 'image.png'}"),
                                       max_tokens=10, temperature=0.0)
    assert r.choices[0].message.content == expected.text


@pytest.mark.parametrize("url, message", [
    ("https://example.com/cat.png", "does not fetch image URLs"),
    ("http://127.0.0.1:1/cat.png", "does not fetch image URLs"),
    ("file:///etc/hostname", "outside the allowed local media path"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:text/plain;base64,aGVsbG8=", "base64 data URL"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "cannot decode the image"),
])
def test_bad_image_urls_are_400(server, url, message):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": user_message(url), "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    server.wait_idle()
