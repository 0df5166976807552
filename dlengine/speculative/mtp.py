"""Multi-token-prediction (MTP) drafts: the checkpoint's own next-n layer proposes the tokens
after the target's next one (DeepSeek-V3 / Kimi-K2's next-n layer, models/deepseek_v3.py; the
`mtp.*` head of Qwen3-Next / Qwen3.5, models/qwen3_next_mtp.py;
`EngineBuilder.speculative("mtp", num_tokens=k)`).

How it runs, step by step (the engine's hooks: engine/seams.py HiddenStateSpeculator):
1. The target runs the step (prompt chunks, decodes, verification of drafts). Before the core
   applies its tokens, `observe_hidden_states` gets the step's final hidden states and the tokens
   each sampling request gains (accepted drafts + the target's token).
2. The MTP layer runs once over every position p the step computed and keeps (all of a prompt
   chunk; the last token plus the accepted drafts of a verify step), fed the target's hidden
   state h_p and the embedding of the now-known token t_{p+1}. This writes its KV at p, in cache
   layer `num_hidden_layers` of the same blocks, so its cache is complete for every computed
   position: prefix-cache hits, chunked prefill, recompute after preemption and KV handed from a
   prefill engine to a decode engine (both with speculative("mtp")) need nothing more.
3. For a request that decodes next, the logits at its last position give draft 1 (argmax);
   drafts 2..k chain: the layer runs again one position further on its own output and draft j-1.
   Chained positions lie past the computed ones; their KV is scratch (overwritten when the
   target gets there). Their slots are the scheduler's look-ahead (`num_lookahead_tokens` =
   k - 1 past the step's positions, reserved for every request that samples and may draft); a
   chain stops early only where the request has no allocated slot for the position, i.e. where
   the pool could not spare the look-ahead blocks (no blocks are taken here).
4. Before the next schedule the core asks `propose`, which hands out the drafts made in 3. The
   drafts stay on the device until then: their one host read per step (no read per chained
   draft) waits for work queued while the core applies the step's tokens.

Steps the target replayed from a CUDA graph (decode, verify: `step.graph`) run 2-3 from a graph
of the same key, captured after the target's (`capture_cuda_graphs`, called at build;
speculative/mtp_graphs.py has the layout): the first pass over every row of the target's padded
layout, rejected and padding rows writing no KV, the argmax and the chain on the device. Other
steps (prompt chunks, mixed batches, scoring, images) and engines without graphs (expert
parallelism, a backend that plans decode on the host) run the same work eagerly.

Drafts are greedy (the argmax of the MTP head), i.e. deterministic proposals: the engine accepts a
draft exactly when the target's own sample at that position equals it, which keeps the output
distribution the target's at any temperature (and greedy outputs token-identical). Sampling the
drafts instead would need the draft probabilities in the acceptance rule, which the verifier does
not take.

Under attention-DP x expert parallelism the MTP layer's MoE joins the EP collectives, so every
rank must run it the same number of times a step, whatever its requests: the proposer declares
`max_forwards_per_step` = k (the pass over the kept positions and k - 1 chained ones), and the
lockstep loop tops each rank's MTP forwards up to k with empty MoE exchanges
(dlengine/parallel/lockstep.py): a fixed schedule, no extra host sync.

The MTP layer sees the target's hidden state after its final norm (the input of the LM head), as
vLLM feeds DeepSeek's released MTP weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from dlengine.config import ConfigError
from dlengine.engine.host_arrays import block_table
from dlengine.kernels.context import AttentionMetadata, ForwardContext
from dlengine.speculative.mtp_graphs import MTPGraphRunner, draft_graph_layout

logger = logging.getLogger("dlengine")


@dataclass
class _PendingDrafts:
    """A step's drafts, possibly still being computed on the device."""

    keys: list[tuple[str, int]]  # per request: (id, its length once the step's tokens are appended)
    counts: np.ndarray  # drafts each request keeps (the rest of its row is not a draft)
    tokens: torch.Tensor  # [requests, k] int64, on the device


class MTPProposer:
    name = "mtp"
    needs_hidden_states = True

    def __init__(self, mtp: torch.nn.Module, embed: torch.nn.Module, num_tokens: int, block_size: int,
                 device: torch.device) -> None:
        """mtp: a next-n module (models/deepseek_v3.py DeepseekV3MTP: forward(positions, embeds,
        hidden, ctx) -> y, compute_logits(y), cache_specs(specs)); embed: the target's embedding."""
        self.mtp, self.embed = mtp, embed
        self.num_tokens, self.block_size, self.device = num_tokens, block_size, device
        # drafts 2..k write KV at k - 1 positions past the step's last kept one (the scheduler
        # reserves them; engine/seams.py Speculator.num_lookahead_tokens)
        self.num_lookahead_tokens = num_tokens - 1
        # the most MTP forwards a step runs (observe_hidden_states): parallel engines pad to it
        self.max_forwards_per_step = num_tokens
        # request id -> (the request's num_tokens when drafted, drafts)
        self._drafts: dict[str, tuple[int, list[int]]] = {}
        self._pending: _PendingDrafts | None = None  # the last step's drafts, not read to the host yet
        # graphs of the drafting of graph steps (capture_cuda_graphs; None: every step eager)
        self.graphs: MTPGraphRunner | None = None

    # ------------------------------------------------------------------ the seam
    @property
    def draft_model(self) -> torch.nn.Module:
        """The module this proposer runs (its MoE layers join expert-parallel collectives)."""
        return self.mtp

    def cache_specs(self, target_specs: list) -> list:
        return self.mtp.cache_specs(target_specs)

    def capture_cuda_graphs(self, target) -> None:
        """Capture the drafting of each graph step the target can replay (`target`: its captured
        engine/cuda_graph.py CUDAGraphRunner, keeping hidden states). The engine calls this once
        at build, after the target's capture."""
        if getattr(target.backend, "plans_decode_on_host", False):
            logger.info("MTP drafts run eagerly: attention backend %r plans one-token batches on the host before "
                        "each replay (FlashInfer's MLA decode), which a graph of the chained drafts cannot do",
                        target.backend.name)
            return
        graphs = MTPGraphRunner(self.mtp, self.embed, target, self.num_tokens)
        graphs.capture()
        logger.info("captured %d MTP draft graphs, %.2f GiB", len(graphs.graphs), graphs.memory_bytes / 2**30)
        self.graphs = graphs

    def propose(self, requests: Sequence) -> list[list[int]]:
        self._collect()
        out = []
        for r in requests:
            entry = self._drafts.pop(r.request_id, None)
            # drafts made for another state of the request (it was preempted since) are dropped
            out.append(entry[1] if entry is not None and entry[0] == r.num_tokens else [])
        return out

    @torch.inference_mode()
    def observe_hidden_states(self, step, gained: dict[str, list[int]]) -> None:
        self._collect()  # the previous step's drafts (normally read by propose already)
        choice = getattr(step, "graph", None)
        if self.graphs is not None and choice is not None and self.graphs.covers(choice):
            self._draft_from_graph(step, gained, choice)
            return
        kept = self._kept_rows(step, gained)
        if kept is None:
            return
        reqs, starts, lens, hidden_rows, next_tokens, drafting = kept
        positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)])
        tables = block_table(reqs)
        y = self._run(tables, positions, lens, step.hidden[self._dev(hidden_rows)], self._dev(next_tokens), step)
        if not drafting:
            return
        # draft 1: the layer's prediction at each sampling request's last kept position
        y = y[self._dev((np.cumsum(lens) - 1)[drafting])]
        tokens = self.mtp.compute_logits(y).argmax(dim=-1)
        reqs = [reqs[i] for i in drafting]
        m = len(reqs)
        tables = tables[drafting]
        capacity = np.fromiter((len(r.block_ids) for r in reqs), dtype=np.int64, count=m) * self.block_size
        drafts = torch.zeros(m, self.num_tokens, dtype=torch.int64, device=tokens.device)
        drafts[:, 0] = tokens
        counts = np.ones(m, dtype=np.int64)
        pos = np.array([starts[i] + lens[i] for i in drafting], dtype=np.int64)  # the next chained position
        live = np.arange(m)
        for c in range(1, self.num_tokens):
            # drafts 2..k: the layer again, one position on, on its own output and last draft; a
            # chained position needs an allocated slot for its KV (slots are a prefix of
            # positions, so a chain that stops stays stopped)
            room = pos[live] < capacity[live]
            if not room.all():
                keep = self._dev(np.nonzero(room)[0])
                live, y, tokens = live[room], y[keep], tokens[keep]
            if not len(live):
                break
            y = self._run(tables[live], pos[live], [1] * len(live), y, tokens, step)
            tokens = self.mtp.compute_logits(y).argmax(dim=-1)
            drafts[self._dev(live), c] = tokens  # on the device: no host read per chained draft
            counts[live] += 1
            pos[live] += 1
        # keyed by the length the request will have once this step's tokens are appended
        keys = [(r.request_id, r.num_tokens + len(gained[r.request_id])) for r in reqs]
        self._pending = _PendingDrafts(keys, counts, drafts)

    # ------------------------------------------------------------------ internals
    def _draft_from_graph(self, step, gained: dict[str, list[int]], choice) -> None:
        """A step the target replayed from graph `choice`: the same work from this proposer's
        graph of that key (speculative/mtp_graphs.py), drafts left on the device."""
        new = []
        for r in step.requests:
            self._drafts.pop(r.request_id, None)
            new.append(None if r.is_finished else gained.get(r.request_id))
        batch = draft_graph_layout(step.requests, step.starts, new, choice, self.num_tokens, self.block_size,
                                   self.graphs.max_model_len)
        tokens = self.graphs.run(batch)
        keys = [(r.request_id, r.num_tokens + (len(g) if g else 0)) for r, g in zip(step.requests, new)]
        self._pending = _PendingDrafts(keys, batch.num_drafts, tokens)

    def _collect(self) -> None:
        """Read the last step's drafts to the host: the one host sync of a step's drafting."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        rows = pending.tokens.tolist()
        for (request_id, length), row, count in zip(pending.keys, rows, pending.counts.tolist()):
            if count:
                self._drafts[request_id] = (length, row[:count])

    def _kept_rows(self, step, gained: dict[str, list[int]]):
        """Per request: the positions this step computed and keeps (a verify step keeps its last
        token and the accepted drafts), their hidden-state rows and the token after each one;
        and which of the requests sample (they get drafts). Called before the step's tokens are
        appended, so a request's own token list ends at its inputs."""
        reqs, starts, lens, hidden_rows, next_tokens, drafting = [], [], [], [], [], []
        for i, r in enumerate(step.requests):
            self._drafts.pop(r.request_id, None)
            if r.is_finished:
                continue
            start, row0 = step.starts[i], step.query_start_loc[i]
            n = step.query_start_loc[i + 1] - row0
            new = gained.get(r.request_id) if step.sample[i] else None
            if new is not None:
                fed = n - step.num_spec[i]  # prompt or decode tokens fed, drafts excluded
                nxt = list(r.all_token_ids[start + 1:start + fed]) + list(new)  # accepted drafts are in `new`
                n = fed + len(new) - 1
            else:  # a prompt chunk that samples nothing (a scoring request's last position has no next)
                nxt = list(r.all_token_ids[start + 1:start + n + 1])
                n = len(nxt)
            if n <= 0:
                continue
            if new is not None:
                drafting.append(len(reqs))
            reqs.append(r)
            starts.append(start)
            lens.append(n)
            hidden_rows.append(np.arange(row0, row0 + n))
            next_tokens.append(nxt[:n])
        if not reqs:
            return None
        return (reqs, starts, lens, np.concatenate(hidden_rows),
                np.fromiter((t for ts in next_tokens for t in ts), dtype=np.int64), drafting)

    def _run(self, tables: np.ndarray, positions: np.ndarray, lens: Sequence[int], hidden: torch.Tensor,
             next_tokens: torch.Tensor, step) -> torch.Tensor:
        """One MTP forward over `lens[i]` consecutive positions of each request (ending at
        positions of their last entry), writing its KV there; tables: the requests' block
        tables (host_arrays.block_table rows)."""
        bs = self.block_size
        ql = np.asarray(lens, dtype=np.int64)
        qsl = np.zeros(len(ql) + 1, dtype=np.int64)
        np.cumsum(ql, out=qsl[1:])
        seq_lens_np = positions[qsl[1:] - 1].astype(np.int64) + 1
        seq_lens = seq_lens_np.tolist()
        row = np.repeat(np.arange(len(ql)), ql)
        slots = tables[row, positions // bs].astype(np.int64) * bs + positions % bs
        meta = AttentionMetadata(
            query_start_loc=self._dev(qsl.astype(np.int32)), seq_lens=self._dev(seq_lens_np.astype(np.int32)),
            block_tables=self._dev(tables), slot_mapping=self._dev(slots), max_query_len=int(ql.max()),
            max_seq_len=max(seq_lens), query_lens_cpu=ql.tolist(), seq_lens_cpu=seq_lens)
        ctx = ForwardContext(meta, step.kv_caches, step.layer_caches)
        pos = self._dev(np.ascontiguousarray(positions, dtype=np.int64))
        return self.mtp(pos, self.embed(next_tokens), hidden, ctx)

    def _dev(self, array: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array))
        return t.to(self.device, non_blocking=True) if self.device.type == "cuda" else t


class MTPFactory:
    """What `EngineBuilder.speculative("mtp", num_tokens=k)` configures: the engine calls it with
    the config and the target model (`wants_target`), and it builds and loads the next-n layer."""

    wants_target = True
    name = "mtp"

    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens

    def __call__(self, cfg, target) -> MTPProposer:
        from dlengine.assemble import build_model

        check_mtp_supported(cfg.model)
        if cfg.load_num_layers is not None and cfg.load_format != "dummy":
            raise ConfigError("speculative('mtp') with hf_overrides(num_hidden_layers=...) and real weights: the "
                              "checkpoint's MTP layer follows its last layer, which is not loaded; use "
                              "load_format='dummy' or drop the override")
        hybrid = cfg.model.architecture in HYBRID_MTP_ARCHITECTURES
        if cfg.load_format != "dummy":
            prefix = "mtp.layers.0." if hybrid else f"model.layers.{cfg.model.num_hidden_layers}."
            _check_checkpoint_has_layer(cfg.model.path, prefix)
        if hybrid:
            # Qwen3-Next / Qwen3.5: `mtp.*`, drafting through the target's embedding and LM head
            from dlengine.models.qwen3_next_mtp import Qwen3NextMTP, SharedHeadMTP

            layer = build_model(cfg, target.state, target.kernels, model_cls=Qwen3NextMTP)
            mtp, embed = SharedHeadMTP(layer, target.model.lm_head), target.model.text_embedding()
        else:
            from dlengine.models.deepseek_v3 import DeepseekV3MTP

            # loaded like the target (FP8 preparation, dummy weights, post-load hooks), its own tensors only
            mtp = build_model(cfg, target.state, target.kernels, model_cls=DeepseekV3MTP)
            embed = target.model.model.embed_tokens
        return MTPProposer(mtp, embed, self.num_tokens, cfg.cache.block_size, cfg.device)

    def __repr__(self) -> str:
        return f"MTPFactory(num_tokens={self.num_tokens})"


def check_mtp_supported(model_config) -> None:
    """ConfigError unless the checkpoint carries next-n layers this engine can run."""
    arch = model_config.architecture
    if arch not in MTP_ARCHITECTURES:
        raise ConfigError(f"speculative('mtp'): an MTP proposer for {arch} checkpoints is not shipped yet (it runs "
                          f"the next-n layers of {', '.join(sorted(MTP_ARCHITECTURES))} checkpoints); use "
                          "speculative('ngram') or pass a proposer object")
    if arch in HYBRID_MTP_ARCHITECTURES:
        from dlengine.models.qwen3_next_mtp import num_mtp_layers

        # a config that says nothing leaves it to the checkpoint's mtp.* tensors (checked at load)
        if num_mtp_layers(model_config) == 0:
            raise ConfigError(f"speculative('mtp'): {model_config.path} has no multi-token-prediction layers "
                              "(config.json mtp_num_hidden_layers / num_nextn_predict_layers is 0); use "
                              "speculative('ngram')")
        return
    from dlengine.models.deepseek_v3 import num_nextn_layers

    if num_nextn_layers(model_config) < 1:
        raise ConfigError(f"speculative('mtp'): {model_config.path} has no multi-token-prediction layers "
                          "(config.json num_nextn_predict_layers is 0 or missing); use speculative('ngram')")


# Qwen3-Next and Qwen3.5 (dense, MoE; text-only and multimodal classes): `mtp.*` (models/qwen3_next_mtp.py)
HYBRID_MTP_ARCHITECTURES = {"Qwen3NextForCausalLM", "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM",
                            "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"}
MTP_ARCHITECTURES = {"DeepseekV3ForCausalLM"} | HYBRID_MTP_ARCHITECTURES


def _check_checkpoint_has_layer(path: str, prefix: str) -> None:
    """config.json may declare next-n layers the weights do not carry (transformers writes
    num_nextn_predict_layers=1 by default and drops the layer on save; transformers' Qwen3.5
    classes do not build the MTP head at all): say so plainly. `prefix`: the layer's tensor names."""
    import json
    import os

    from dlengine.models.loader import iter_safetensors_lazy

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = list(json.load(f).get("weight_map", {}))
    else:
        names = [name for name, _ in iter_safetensors_lazy(path)]
    if not any(n.startswith(prefix) for n in names):
        raise ConfigError(f"speculative('mtp'): {path} has no multi-token-prediction layer weights (no "
                          f"{prefix}* tensors); use speculative('ngram')")
