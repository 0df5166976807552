"""A request's life inside the engine, and what the engine hands back to the caller."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dlengine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from dlengine.multimodal.inputs import MultimodalInputs


PLACEHOLDER_TOKEN = -1  # stands for a token still being sampled on the device (async scheduling)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # blocks allocated, KV arriving through the connector
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at (last) admission
    num_computed_prompt_tokens: int = 0  # prompt tokens this engine ran through the model
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        if self.finished_time is None:
            return None
        return self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """What `Engine.generate` returns and `Engine.step` streams.

    `token_ids` and `text` are cumulative; `new_token_ids` holds the tokens of this step only.
    `finish_reason` is None while the request runs, then "length", "stop", "abort" or "error".
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    metrics: RequestMetrics
    logprobs: list[dict[int, float]] | None = None
    error: str | None = None
    kv_transfer_params: dict | None = None  # prefill role: what a decode engine needs to continue


class Request:
    """Mutable per-request state: tokens, progress through the model, and its KV blocks.

    The scheduler advances `num_computed_tokens`; the runner fills tokens in; the block manager
    owns `block_ids`. `all_token_ids` is prompt + generated, which is also what a recompute after
    preemption re-feeds to the model.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        eos_token_ids: tuple[int, ...] = (),
        arrival_time: float | None = None,
        multimodal: "MultimodalInputs | None" = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of full blocks of all_token_ids, chained
        self.num_cached_blocks = 0  # leading blocks already published in the prefix cache
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.eos_token_ids = () if params.ignore_eos else tuple(eos_token_ids)
        self.metrics = RequestMetrics(
            arrival_time=time.perf_counter() if arrival_time is None else arrival_time,
            num_prompt_tokens=len(prompt_token_ids),
        )
        self.generator: torch.Generator | None = None  # per-request RNG when params.seed is set
        self.pending_row: int | None = None  # row of the in-flight step's sampled tokens (async scheduling)
        self.kv_transfer_params: dict | None = None  # prefill role's output: what a decode engine needs
        self.remote_kv: dict | None = None  # decode role's input: a prefill engine's kv_transfer_params
        self.remote_max_tokens: int | None = None  # prefill role: the caller's max_tokens, for the decode side
        self.spec_token_ids: list[int] = []  # draft tokens proposed for this step (speculative decoding)
        # scoring (Engine.prompt_logits): logits of every prompt position, no sampling, no prefix hits
        self.score_only = False
        self.max_chunk_tokens: int | None = None  # cap on tokens per step for this request (scoring)
        self.prompt_logits: list[torch.Tensor] = []  # chunks of logits computed so far (scoring)
        # images of the prompt (processed pixels, token spans, hashes, M-RoPE positions), None for text
        self.multimodal = multimodal

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def block_extra_key(self, block_index: int, block_size: int) -> bytes:
        """What the prefix-cache hash of a full block adds to its token ids: the content hashes
        of the images whose tokens it holds (image tokens all share one placeholder id)."""
        return b"" if self.multimodal is None else self.multimodal.block_extra_key(block_index, block_size)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def add_placeholder(self, row: int) -> None:
        """Count a token the device is still sampling (row `row` of that step's output), so the
        next step can be scheduled before it is known; its KV input is taken on the device."""
        self.all_token_ids.append(PLACEHOLDER_TOKEN)
        self.pending_row = row

    def resolve_placeholder(self, token_id: int) -> None:
        self.all_token_ids[len(self.prompt_token_ids) + len(self.output_token_ids)] = token_id
        self.output_token_ids.append(token_id)
        self.pending_row = None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )
