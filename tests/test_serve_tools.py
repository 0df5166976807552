"""Tool calls: the Qwen3 and DeepSeek-V3 parsers on their own, and on the server with text the
engine really generated.

To make the tiny random model emit a tool call, the served engine is built with a scripted
sampler (EngineBuilder.sampler, the engine's public sampler seam): each step the model runs its
forward as usual and the sampler picks the next token of a fixed script, then end-of-sequence.
The tokens then go the whole way a real answer goes (detokenizer, stop checks, the per-request
queue, the server's streaming and its parser), so the parser reads generated text, not a string
handed to it. No speculator, no change to the engine.
"""

import json

import httpx
import pytest
import torch

pytest.importorskip("fastapi", reason="dlengine serve needs the serve extra: pip install 'dlengine[serve]'")
openai = pytest.importorskip("openai")

from dlengine import EngineBuilder  # noqa: E402
from dlengine.engine.sampler import SamplerOutput  # noqa: E402
from dlengine.serve.tool_parsers import (DeepSeekV3ToolParser, Qwen3ToolParser, StreamingToolParser,  # noqa: E402
                                         tool_parser_for)

from serve_helpers import MODEL, serving  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

QWEN_ONE = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
QWEN_TWO = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')
DS_ONE = ("Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
          '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
DS_TWO = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
          '{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n'
          '{"tz": "CET"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


# ------------------------------------------------------------------------------------ parsers alone
@pytest.mark.parametrize("parser, text, content, calls", [
    (Qwen3ToolParser, QWEN_ONE, "Let me check.", [("get_weather", {"city": "Paris"})]),
    (Qwen3ToolParser, QWEN_TWO, None, [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]),
    (Qwen3ToolParser, "no tools here", "no tools here", []),
    (Qwen3ToolParser, "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    (Qwen3ToolParser, '<tool_call>{"name": "f", "arguments": {"a": 1', '<tool_call>{"name": "f", "arguments": {"a": 1',
     []),  # cut off by max_tokens
    (Qwen3ToolParser, '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', None, [("f", {"a": 1})]),
    (DeepSeekV3ToolParser, DS_ONE, "Checking.", [("get_weather", {"city": "Paris"})]),
    (DeepSeekV3ToolParser, DS_TWO, None, [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]),
    (DeepSeekV3ToolParser, QWEN_ONE, QWEN_ONE, []),
])
def test_parsers(parser, text, content, calls):
    got_content, got = parser().extract(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert len({c.id for c in got}) == len(got)
    # streamed a character at a time: the same content and calls
    sp = StreamingToolParser(parser())
    streamed, stream_calls = "", []
    for i in range(1, len(text) + 1):
        piece, new = sp.update(text[:i], final=i == len(text))
        streamed += piece
        stream_calls += new
    assert (streamed or None) == content
    assert [(c.name, json.loads(c.arguments)) for c in stream_calls] == calls


def test_parser_choice():
    assert tool_parser_for("auto", "DeepseekV3ForCausalLM") is DeepSeekV3ToolParser
    assert tool_parser_for("auto", "Qwen3ForCausalLM") is Qwen3ToolParser
    with pytest.raises(Exception, match="unknown tool-call parser"):
        tool_parser_for("hermes2", "Qwen3ForCausalLM")


# ------------------------------------------------------------------------------------ on the server
class ScriptedSampler:
    """Picks the next token of `script` whatever the logits say, then end-of-sequence. One
    request at a time (the script position is the sampler's, not the request's)."""

    def __init__(self, eos: int) -> None:
        self.eos, self.script, self.pos = eos, [], 0

    def play(self, token_ids) -> None:
        self.script, self.pos = list(token_ids), 0

    def __call__(self, logits, tensors) -> SamplerOutput:
        ids = []
        for _ in range(logits.shape[0]):
            ids.append(self.script[self.pos] if self.pos < len(self.script) else self.eos)
            self.pos += 1
        return SamplerOutput(token_ids=torch.tensor(ids, device=logits.device), sampled_logprobs=None,
                             top_logprobs=None, top_token_ids=None)


@pytest.fixture(scope="module")
def scripted():
    sampler = ScriptedSampler(eos=1)
    engine = (EngineBuilder("tiny-qwen3").dtype("float32").device("cpu").cache(block_size=16, num_blocks=64)
              .sampler(sampler).build())
    yield engine, sampler
    engine.close()


def _ask(server_url, sampler, engine, text, stream, **kw):
    ids = engine.tokenizer.encode(text)
    assert engine.tokenizer.decode(ids) == text  # byte-level BPE: the script spells the text exactly
    sampler.play(ids)
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="x", max_retries=0)
    return client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=stream, **kw)


def _streamed(chunks):
    content, calls, finish = "", {}, None
    for c in chunks:
        for ch in c.choices:
            content += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            finish = ch.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("parser, text, content, names", [
    ("qwen3", QWEN_ONE, "Let me check.", ["get_weather"]),
    ("qwen3", QWEN_TWO, None, ["get_weather", "get_time"]),
    ("deepseek_v3", DS_ONE, "Checking.", ["get_weather"]),
    ("deepseek_v3", DS_TWO, None, ["get_weather", "get_time"]),
])
def test_generated_tool_calls(scripted, parser, text, content, names):
    engine, sampler = scripted
    with serving(engine, tool_call_parser=parser) as s:
        r = _ask(s.url, sampler, engine, text, stream=False)
        msg = r.choices[0].message
        assert msg.content == content and r.choices[0].finish_reason == "tool_calls"
        assert [c.function.name for c in msg.tool_calls] == names
        assert json.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
        s_content, s_calls, finish = _streamed(_ask(s.url, sampler, engine, text, stream=True))
        assert (s_content or None) == content and finish == "tool_calls"
        assert [c["name"] for c in s_calls] == names
        assert [json.loads(c["arguments"]) for c in s_calls] == [json.loads(c.function.arguments)
                                                                 for c in msg.tool_calls]
        assert all(c["id"].startswith("call_") for c in s_calls)
        s.wait_idle()


def test_tool_choice_none_and_plain_text(scripted):
    engine, sampler = scripted
    with serving(engine, tool_call_parser="qwen3") as s:
        r = _ask(s.url, sampler, engine, QWEN_ONE, stream=False, tool_choice="none")
        assert r.choices[0].message.content == QWEN_ONE and not r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "stop"
        r = _ask(s.url, sampler, engine, "Sunny, 21 degrees.", stream=False)
        assert r.choices[0].message.content == "Sunny, 21 degrees." and r.choices[0].finish_reason == "stop"
        # the tools reach the prompt through the chat template
        body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 1}
        sampler.play([])
        assert httpx.post(f"{s.url}/v1/chat/completions", json=body).json()["usage"]["prompt_tokens"] > 60
