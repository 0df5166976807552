"""A streaming client for OpenAI-compatible servers (ours, vLLM, SGLang, ...), for `dlengine bench serve`.

One coroutine, `stream_request`, sends one request with `"stream": true` and
`"stream_options": {"include_usage": true}` and returns a `RequestResult` of timestamps taken as
the server-sent events arrive. It never raises for a failed request: an HTTP error, a dropped
connection, a timeout or an error event inside the stream all end as `success=False` with the
reason in `error`, so one bad request cannot stop a benchmark.

What counts as a token arriving: a chunk whose first choice carries non-empty text
(`choices[0].text` for /v1/completions, `choices[0].delta.content` or `reasoning_content` for
/v1/chat/completions), or non-empty `choices[0].token_ids` (vLLM's `return_token_ids`
extension, which the bench asks for when the server has no tokenizer and so sends no text). Chunks with empty text (a role header, a held-back partial UTF-8
character) and the final usage chunk are not. A server may put several tokens in one chunk, so
token counts come from the `usage` chunk when the server sends one, else from counting chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Union

from dlengine.bench.common import BenchError

Prompt = Union[str, list[int]]
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def import_httpx():
    try:
        import httpx
    except ImportError:
        raise BenchError("dlengine bench serve needs httpx: pip install httpx (or 'dlengine[serve]')") from None
    return httpx


@dataclass
class RequestResult:
    """What one request measured. Times are seconds on the time.perf_counter() clock."""

    index: int  # position in the workload
    success: bool = False
    error: str | None = None
    start_time: float = 0.0  # just before the request was sent
    ttft_s: float | None = None  # first token chunk - start
    e2e_s: float | None = None  # end of stream - start (successful requests)
    duration_s: float | None = None  # start -> the client gave up or finished, failures included
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive token chunks
    num_chunks: int = 0  # chunks that carried text
    prompt_tokens: int | None = None  # usage.prompt_tokens, else what the workload knows
    completion_tokens: int | None = None  # usage.completion_tokens
    usage_reported: bool = False
    finish_reason: str | None = None
    text: str = ""
    last_chunk_s: float | None = field(default=None, repr=False)  # offset of the latest token chunk

    @property
    def output_tokens(self) -> int:
        """The server's count when it reported usage, else the number of token chunks."""
        return self.completion_tokens if self.completion_tokens is not None else self.num_chunks

    @property
    def end_time(self) -> float | None:
        return None if self.duration_s is None else self.start_time + self.duration_s

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("text", "last_chunk_s")}
        d["output_tokens"] = self.output_tokens
        return d


# ------------------------------------------------------------------ server-sent events
class SSEDecoder:
    """Turns the lines of a text/event-stream into the `data` payloads of its events.

    Follows the SSE rules that matter here: an event ends at a blank line; several `data:` lines
    of one event are joined with newlines; lines starting with ':' are comments (keep-alives);
    other fields (event:, id:, retry:) are ignored. A stream that ends without a blank line
    still delivers its last event (`close`).
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> Iterator[str]:
        line = line.rstrip("\r\n")
        if not line:
            if self._data:
                payload, self._data = "\n".join(self._data), []
                yield payload
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)

    def close(self) -> Iterator[str]:
        if self._data:
            payload, self._data = "\n".join(self._data), []
            yield payload


def chunk_token_ids(chunk: dict[str, Any]) -> list:
    """The generated token ids a chunk carries under `return_token_ids` ([] otherwise)."""
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return []
    ids = choices[0].get("token_ids")
    return ids if isinstance(ids, list) else []


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text an OpenAI stream chunk carries ('' for role headers and usage chunks)."""
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if "text" in choice:  # /v1/completions
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")


def chunk_error(chunk: dict[str, Any]) -> str | None:
    """An error a server reports inside the stream (vLLM and others send {"error": {...}})."""
    err = chunk.get("error")
    if err is None:
        return None
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


# ------------------------------------------------------------------ requests
def build_payload(endpoint: str, model: str, prompt: Prompt, max_tokens: int, *, temperature: float = 0.0,
                  ignore_eos: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body of a streaming request. `ignore_eos` is the vLLM/SGLang extension (sent only
    when asked for: OpenAI's own API rejects unknown fields)."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if endpoint == "completions":
        body["prompt"] = prompt
    elif endpoint == "chat":
        if not isinstance(prompt, str):
            raise BenchError("the chat endpoint takes text prompts; give --tokenizer to turn token ids into text")
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        raise BenchError(f"unknown endpoint {endpoint!r}; choose one of {sorted(ENDPOINTS)}")
    if ignore_eos:
        body["ignore_eos"] = True
    if extra:
        body.update(extra)
    return body


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _describe_http_error(status: int, body: str) -> str:
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    message = None
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message")))
        message = err.get("message") if isinstance(err, dict) else err
    text = str(message) if message else body.strip()
    return f"HTTP {status}: {text[:300]}" if text else f"HTTP {status}"


async def stream_request(client, url: str, payload: dict[str, Any], *, index: int = 0, timeout_s: float = 600.0,
                         headers: dict[str, str] | None = None, prompt_tokens: int | None = None) -> RequestResult:
    """Send one streaming request and time it. Never raises for a failed request (see the
    module docstring); only cancellation (Ctrl-C) propagates."""
    httpx = import_httpx()
    result = RequestResult(index=index, prompt_tokens=prompt_tokens, start_time=time.perf_counter())
    try:
        # one limit for the whole request (httpx's timeouts limit each connect / read separately)
        await asyncio.wait_for(_stream_into(result, client, url, payload, headers), timeout_s)
    except asyncio.TimeoutError:
        result.error = f"timed out after {timeout_s:g} s ({result.num_chunks} text chunks received)"
    except httpx.TimeoutException as e:
        result.error = f"timed out ({type(e).__name__}) after {time.perf_counter() - result.start_time:.1f} s"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except Exception as e:  # noqa: BLE001 -- a benchmark reports a broken request, it does not stop on it
        result.error = f"client error: {type(e).__name__}: {e}"
    finally:
        result.duration_s = time.perf_counter() - result.start_time
    if result.error is not None:
        result.success = False
    return result


async def _stream_into(result: RequestResult, client, url: str, payload: dict[str, Any],
                       headers: dict[str, str] | None) -> None:
    start = result.start_time
    decoder = SSEDecoder()
    done = False
    async with client.stream("POST", url, json=payload, headers=headers) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode("utf-8", "replace")
            result.error = _describe_http_error(response.status_code, body)
            return
        async for line in response.aiter_lines():
            for data in decoder.feed(line):
                done = _handle_event(result, data, start) or done
                if result.error is not None:
                    return
        for data in decoder.close():
            done = _handle_event(result, data, start) or done
    if result.error is not None:
        return
    result.e2e_s = time.perf_counter() - start
    if result.num_chunks == 0 and not result.completion_tokens:
        result.error = "the stream ended without any generated text"
    elif not done:
        result.error = "the stream ended without 'data: [DONE]'"
    else:
        result.success = True
    return


def _handle_event(result: RequestResult, data: str, start: float) -> bool:
    """Apply one SSE payload to `result`; True when it is the terminating [DONE]."""
    offset = time.perf_counter() - start
    if data.strip() == "[DONE]":
        return True
    try:
        chunk = json.loads(data)
    except ValueError:
        result.error = f"the server sent an event that is not JSON: {data[:120]!r}"
        return False
    if not isinstance(chunk, dict):
        result.error = f"the server sent an event that is not a JSON object: {data[:120]!r}"
        return False
    err = chunk_error(chunk)
    if err is not None:
        result.error = f"error in stream: {err}"
        return False
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("prompt_tokens"), int):
            result.prompt_tokens = usage["prompt_tokens"]
        if isinstance(usage.get("completion_tokens"), int):
            result.completion_tokens = usage["completion_tokens"]
            result.usage_reported = True
    choices = chunk.get("choices") or []
    if choices and isinstance(choices[0], dict) and choices[0].get("finish_reason"):
        result.finish_reason = choices[0]["finish_reason"]
    text = chunk_text(chunk)
    if text or chunk_token_ids(chunk):
        if result.last_chunk_s is None:
            result.ttft_s = offset
        else:
            result.itl_s.append(offset - result.last_chunk_s)
        result.last_chunk_s = offset
        result.num_chunks += 1
        result.text += text
    return False


async def list_models(client, base_url: str, headers: dict[str, str] | None = None) -> list[str]:
    """The model ids of GET /v1/models. Raises BenchError when the server cannot be asked."""
    httpx = import_httpx()
    url = base_url.rstrip("/") + "/v1/models"
    try:
        response = await client.get(url, headers=headers)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if response.status_code != 200:
        raise BenchError(f"GET {url} failed: {_describe_http_error(response.status_code, response.text)}")
    try:
        data = response.json()["data"]
        return [m["id"] for m in data]
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"GET {url} did not answer an OpenAI model list: {response.text[:200]!r}") from None
