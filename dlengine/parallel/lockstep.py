"""One rank of a parallel engine: its EngineCore, stepped in lockstep with the other ranks.

Every rank receives the same command each step: the requests added for its DP group and the ids
aborted since the last step. TP ranks of one DP group get the same requests, and their
deterministic schedulers make the same batches, so they call the same collectives in the same
order. Under expert parallelism the DP ranks first agree (one all-reduce) whether anyone has
work; a rank that then runs no forward joins the MoE layers' dispatch/combine with no tokens,
so the all-to-alls always match up. A speculator that runs its own model after the target's
forward (MTP) declares that model and the most forwards of it a step runs; each rank tops its
draft forwards up to that count the same way, after the target's, so every rank enters the
draft model's MoE layers equally often whether it drafted for many requests, a few (a chain
that stopped early), or none. The schedule is fixed: no extra agreement per step.

Only the output rank of each DP group (its first TP rank) reports outputs. A prefill engine
under TP hands off one KV shard per rank: the output rank's kv_transfer_params list the other
ranks' params under "shards". A decode engine under TP pulls one KV shard per rank; its ranks'
connectors agree inside their poll, at the start of every rank's schedule, on which requests
are ready or failed (parallel/pull_agreement.py), so the schedulers stay identical.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from dlengine.config import ConfigError
from dlengine.engine.core import CoreOutput, EngineCore
from dlengine.engine.request import Request
from dlengine.models.layers.parallel_moe import expert_token_counts, moe_layers
from dlengine.parallel.state import ParallelState


class RankCore:
    """This rank's core and the lockstep step around it."""

    def __init__(self, core: EngineCore, state: ParallelState) -> None:
        self.core, self.state = core, state
        self.moe = moe_layers(core.model)
        self.draft_moe, self.draft_forwards = self._draft_moe(core.speculator, state)
        self.expert_parallel = state.ep_group is not None and bool(self.moe or self.draft_moe)
        self.idle_steps = 0  # steps this rank joined the MoE collectives with no tokens
        self.idle_draft_forwards = 0  # draft-model forwards this rank joined with no tokens
        self.lockstep_steps = 0

    @staticmethod
    def _draft_moe(speculator, state: ParallelState) -> tuple[list, int]:
        """The speculator's own MoE layers and how many forwards of them every rank makes per step."""
        if state.ep_group is None or speculator is None or not getattr(speculator, "needs_hidden_states", False):
            return [], 0
        model = getattr(speculator, "draft_model", None)
        passes = getattr(speculator, "max_forwards_per_step", None)
        if model is None or not isinstance(passes, int):
            raise ConfigError(f"speculator {getattr(speculator, 'name', type(speculator).__name__)!r} runs its own "
                              "model after each step but declares no draft_model / max_forwards_per_step: under "
                              "parallel(ffn_ep>1) every rank must enter that model's MoE layers equally often "
                              "(dlengine/engine/seams.py HiddenStateSpeculator)")
        layers = moe_layers(model)
        return layers, passes if layers else 0

    def _anyone(self, flag: bool) -> bool:
        if self.state.world_group is None:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.core.config.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.state.world_group)
        return bool(t.item())

    def step(self, adds: Sequence[Request], aborts: Sequence[str]) -> tuple[list[CoreOutput], bool]:
        """Apply the front's adds and aborts, run one lockstep step; returns (this rank's outputs
        if it is an output rank, whether it still has work)."""
        core = self.core
        for r in adds:
            core.add(r)
        for rid in aborts:
            core.abort(rid)
        outputs: list[CoreOutput] = []
        if self.expert_parallel:
            if self._anyone(core.has_unfinished()):
                self.lockstep_steps += 1
                calls = self.moe[0].num_forwards if self.moe else 0
                draft_calls = self.draft_moe[0].num_forwards if self.draft_moe else 0
                outputs = core.step()
                if self.moe and self.moe[0].num_forwards == calls:
                    # no forward ran here this step: the other ranks' MoE layers still exchange
                    # tokens with this one
                    for layer in self.moe:
                        layer.forward_idle()
                    self.idle_steps += 1
                if self.draft_moe:
                    # then the draft model's, in the same order on every rank (after the target's)
                    self._pad_draft_forwards(self.draft_moe[0].num_forwards - draft_calls)
        else:
            # TP ranks are identical: each steps (an idle core only polls its connector)
            self.lockstep_steps += 1
            outputs = core.step()
        if self.state.tp_size > 1 and core.connector is not None and getattr(core.connector, "name", None) != "decode":
            outputs = self._merge_kv_shards(outputs)
        return (outputs if self.state.is_output_rank else []), core.has_unfinished()

    def _pad_draft_forwards(self, ran: int) -> None:
        """Join the draft model's MoE exchanges with no tokens for each of this step's forwards
        this rank did not run (it drafted for nobody, or its chains stopped early)."""
        if ran > self.draft_forwards:
            raise RuntimeError(f"the speculator ran its model {ran} times in one step, more than the "
                               f"{self.draft_forwards} it declares (max_forwards_per_step): the expert-parallel "
                               "ranks' collectives no longer pair up")
        for _ in range(self.draft_forwards - ran):
            for layer in self.draft_moe:
                layer.forward_idle()
        self.idle_draft_forwards += self.draft_forwards - ran

    def _merge_kv_shards(self, outputs: list[CoreOutput]) -> list[CoreOutput]:
        """Give the output rank's kv_transfer_params every TP rank's shard (same requests finish
        on every rank in the same step, so the lists line up by request id)."""
        mine = {o.request_id: o.kv_transfer_params for o in outputs if o.kv_transfer_params}
        gathered: list = [None] * self.state.tp_size
        dist.all_gather_object(gathered, mine, group=self.state.tp_group)
        if not self.state.is_output_rank:
            return outputs
        for o in outputs:
            if o.kv_transfer_params:
                shards = [g.get(o.request_id) for g in gathered[1:]]
                if any(s is None for s in shards):
                    o.finish_reason, o.error = "error", "a tensor-parallel rank could not hand its KV shard off"
                    o.kv_transfer_params = None
                else:
                    o.kv_transfer_params = dict(o.kv_transfer_params, shards=shards, tp_size=self.state.tp_size)
        return outputs

    def stats(self) -> dict[str, Any]:
        s, sched = self.core.stats, self.core.scheduler
        return {"rank": self.state.rank, "tp_rank": self.state.tp_rank, "dp_rank": self.state.dp_rank,
                "num_steps": s.num_steps, "lockstep_steps": self.lockstep_steps, "idle_steps": self.idle_steps,
                "idle_draft_forwards": self.idle_draft_forwards,
                "num_generated_tokens": s.num_generated_tokens, "num_finished": s.num_finished,
                "num_computed_tokens": s.num_computed_tokens,
                # speculative decoding on this rank (drafts proposed / accepted, verify rows)
                "num_draft_tokens": s.num_draft_tokens, "num_accepted_tokens": s.num_accepted_tokens,
                "num_spec_verifications": s.num_spec_verifications,
                "expert_token_counts": expert_token_counts(self.core.model),
                # the rank's block pool and KV connector (a prefill rank's pinned hand-offs)
                "num_free_blocks": self.core.block_manager.num_free_blocks,
                "num_blocks": self.core.block_manager.num_blocks,
                # the rank's scheduler queues (a server's /metrics adds up the output ranks')
                "num_running": len(sched.running),
                "num_waiting": len(sched.waiting) + len(getattr(sched, "waiting_for_kv", ())),
                "connector": self.core.connector.describe() if self.core.connector is not None else None}
