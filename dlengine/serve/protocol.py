"""OpenAI's HTTP protocol as pydantic models: what /v1/completions and /v1/chat/completions accept
and return.

Requests forbid unknown fields (OpenAI answers 400 "Unrecognized request argument") and are
strict about types (a string is not a number); value ranges are SamplingParams' job, so the
limits live in one place and the error text is the engine's. Responses are plain models that
FastAPI serialises; streamed chunks are built from the same models.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------- requests
class StreamOptions(RequestModel):
    include_usage: bool = False
    # vLLM's extension (usage in every chunk), sent by load generators such as guidellm: accepted;
    # usage still comes once, in the final chunk
    continuous_usage_stats: bool = False


class SamplingFields(RequestModel):
    """Fields both endpoints share. None means "the engine's default"."""

    model: str
    n: int = 1
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    kv_transfer_params: Optional[dict] = Field(
        None, description="PD over HTTP: the signed params a prefill server returned; a decode server pulls that KV "
                          "and continues (docs/serving.md)")


Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    echo: bool = False
    logprobs: Optional[int] = Field(None, description="top logprobs per token (0: only the chosen token's)")
    suffix: Optional[str] = Field(None, description="not supported: must be absent or null")
    return_token_ids: bool = Field(
        False, description="vLLM's extension: each choice also carries the generated `token_ids` (new ones in a "
                           "stream chunk) and `prompt_token_ids`; what a client of a server without a tokenizer "
                           "counts tokens by")


class FunctionDefinition(RequestModel):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(RequestModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class ToolCallFunction(RequestModel):
    name: str
    arguments: str


class MessageToolCall(RequestModel):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ImageURL(RequestModel):
    url: str  # a data URL (data:image/png;base64,...), or file:// under --allowed-local-media-path
    detail: Optional[Literal["auto", "low", "high"]] = None  # accepted; the image processor decides the size


class ImagePart(RequestModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(RequestModel):
    url: str  # a data URL (data:video/mp4;base64,...) or file:// URL; decoded only with a video decoder installed


class VideoURLPart(RequestModel):
    type: Literal["video_url"]
    video_url: VideoURL


class VideoFramesPart(RequestModel):
    """A video as its frames, each an image URL as `image_url` takes (dlengine's form; no decoder needed)."""
    type: Literal["video"]
    video: list[str]  # the engine checks the count and fps, naming the problem
    fps: Optional[float] = None  # of the source: drives frame sampling and timestamps


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[Annotated[Union[TextPart, ImagePart, VideoURLPart, VideoFramesPart],
                                                Field(discriminator="type")]]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[MessageToolCall]] = None
    tool_call_id: Optional[str] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None
    ec_transfer_params: Optional[dict] = Field(
        None, description="EPD over HTTP: the signed params an encoder server returned for this request's images; "
                          "a prefill or hybrid server pulls those embeddings instead of encoding (docs/vision.md)")


# ---------------------------------------------------------------------------------- responses
class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(ResponseModel):
    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: list[Optional[dict[str, float]]] = []
    text_offset: list[int] = []


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    kv_transfer_params: Optional[dict] = None  # a prefill server's hand-off (signed), for a decode server


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(ResponseModel):
    content: Optional[list[TokenLogprob]] = None


class FunctionCall(ResponseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCall(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(ResponseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[FunctionCall] = None


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    tool_calls: list[ToolCall] = []


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Optional[Usage] = None
    kv_transfer_params: Optional[dict] = None  # a prefill server's hand-off (signed), for a decode server


class DeltaMessage(ResponseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatChunkChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dlengine"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo
