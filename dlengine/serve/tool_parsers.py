"""Tool calls out of generated text: Qwen3's and DeepSeek-V3's markup.

Qwen3 (Hermes style) writes each call as a JSON object between tags:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

DeepSeek-V3 wraps its calls in a block of special tokens ("｜" is U+FF5C, "▁" is U+2581); each
call names its type and function, then gives the arguments as a fenced JSON block:

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
    ```json
    {"city": "Paris"}
    ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Both follow one rule set: the text before the first start marker is the message content; every
complete, well-formed call after it is a tool call; if none parses, the whole text is content.
`StreamingToolParser` applies the same rules to a growing text: content is released as it comes
(holding back a tail that could be the start of a marker), and each call is released whole once
its end marker has arrived, so stream and non-stream answers agree.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from dlengine.config import ConfigError


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"call_{uuid.uuid4().hex[:24]}"


class MarkupToolParser:
    """A tool-call format given by a start marker and a regex matching one complete call."""

    name = ""
    start = ""
    call_pattern: re.Pattern

    def parse_call(self, match: re.Match) -> ParsedToolCall | None:
        raise NotImplementedError

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content, tool calls) of a finished text."""
        first = text.find(self.start)
        if first < 0:
            return text, []
        calls = [c for c in (self.parse_call(m) for m in self.call_pattern.finditer(text, first)) if c is not None]
        if not calls:
            return text, []
        return text[:first] or None, calls


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Qwen3ToolParser(MarkupToolParser):
    name = "qwen3"
    start = "<tool_call>"
    call_pattern = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def parse_call(self, match: re.Match) -> ParsedToolCall | None:
        body = _json_object(match.group(1))
        if body is None or not isinstance(body.get("name"), str):
            return None
        args = body.get("arguments", body.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            args = _json_object(args)
        if not isinstance(args, dict):
            return None
        return ParsedToolCall(body["name"], json.dumps(args, ensure_ascii=False))


class DeepSeekV3ToolParser(MarkupToolParser):
    name = "deepseek_v3"
    start = "<｜tool▁calls▁begin｜>"
    call_pattern = re.compile(
        r"<｜tool▁call▁begin｜>(?P<type>[^<]*?)<｜tool▁sep｜>(?P<name>[^\n<]*?)\s*\n```(?:json)?\s*\n"
        r"(?P<args>.*?)\n?```\s*<｜tool▁call▁end｜>", re.DOTALL)

    def parse_call(self, match: re.Match) -> ParsedToolCall | None:
        args = _json_object(match.group("args"))
        name = match.group("name").strip()
        if args is None or not name or match.group("type").strip() != "function":
            return None
        return ParsedToolCall(name, json.dumps(args, ensure_ascii=False))


TOOL_PARSERS: dict[str, type[MarkupToolParser]] = {"qwen3": Qwen3ToolParser, "deepseek_v3": DeepSeekV3ToolParser}
# architectures whose released checkpoints use the DeepSeek-V3 markup; everything else: qwen3
_DEEPSEEK_ARCHITECTURES = ("DeepseekV3ForCausalLM",)


def tool_parser_for(name: str, architecture: str) -> type[MarkupToolParser]:
    """The parser class for `--tool-call-parser` ("auto": by the checkpoint's architecture)."""
    if name == "auto":
        name = "deepseek_v3" if architecture in _DEEPSEEK_ARCHITECTURES else "qwen3"
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ConfigError(f"unknown tool-call parser {name!r}; known: auto, {', '.join(TOOL_PARSERS)}") from None


def _partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class StreamingToolParser:
    """Feeds on the cumulative text of one choice; `update` returns what is new to send."""

    def __init__(self, parser: MarkupToolParser) -> None:
        self.parser = parser
        self.pos = 0  # text before this is sent (as content) or consumed (as calls)
        self.calls_start: int | None = None  # where the first start marker is, once seen
        self.calls: list[ParsedToolCall] = []

    def update(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        content = ""
        if self.calls_start is None:
            start = text.find(self.parser.start, self.pos)
            if start >= 0:
                content, self.pos, self.calls_start = text[self.pos:start], start, start
            else:
                end = len(text) if final else len(text) - _partial_marker_len(text, self.parser.start)
                end = max(end, self.pos)
                content, self.pos = text[self.pos:end], end
        new_calls: list[ParsedToolCall] = []
        if self.calls_start is not None:
            for m in self.parser.call_pattern.finditer(text, self.pos):
                call = self.parser.parse_call(m)
                if call is not None:
                    new_calls.append(call)
                self.pos = m.end()
            self.calls += new_calls
            if final and not self.calls:  # no call parsed: what was held back is plain content
                content += text[self.calls_start:]
        return content, new_calls
