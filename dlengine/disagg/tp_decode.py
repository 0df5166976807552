"""The KV connector of one rank of a tensor-parallel decode engine.

Each rank keeps its own shard of the kv heads (or the whole MLA latent) and pulls exactly that
from whichever prefill rank(s) hold it, over its own transfer endpoint (the planning is
transfer/kv_shards.py: a prefill split finer than ours gives several legs per rank, a coarser
one whole blocks of one prefill rank of which we keep our heads). The ranks' schedulers must
stay identical (they run the same batches through the same collectives), so what a lone
DecodeConnector decides by itself is agreed here (parallel/pull_agreement.py):

- a pull that landed on this rank is held until every rank's has: then the request is ready on
  every rank in the same step and order, and rank 0 tells every prefill rank it is done (not
  before: another decode rank may still be reading from it);
- a pull that failed on one rank (dead, stalled or mismatched prefill rank, lost pin, queue
  timeout) fails the request on every rank with that rank's reason, or makes every rank
  recompute it with transfer(on_pull_failure="recompute"); the failing rank tells the prefill
  ranks to free at once, and the others stop their reads (which land in staging, never in the
  cache) and free their blocks as a lone connector does on abort;
- staging full does not send the request back to the scheduler's queue (the other ranks may
  have had room): it keeps its cache blocks and starts its pull from a later poll;
- the queue timeout is checked in poll, so all ranks see it in the same step.

A request's outcome counts (pulled / failed / recomputed) are the agreed ones, the same on every rank.
"""

from __future__ import annotations

import logging
import time

from dlengine.disagg.decode import DecodeConnector, _Pull
from dlengine.engine.seams import PollResult
from dlengine.parallel.pull_agreement import PullAgreement, PullReport

logger = logging.getLogger("dlengine.disagg")


class TPDecodeConnector(DecodeConnector):
    def __init__(self, *args, agreement: PullAgreement, **kwargs) -> None:
        super().__init__(*args, tp_rank=agreement.tp_rank, **kwargs)
        self.agreement = agreement
        self.undecided: dict[str, object] = {}  # request id -> migrated request not ready or failed yet
        self.landed: dict[str, _Pull] = {}  # pulls in this rank's cache, waiting for the other ranks'
        self.local_failures: dict[str, str] = {}  # request id -> why this rank's pull failed (not told yet)
        self.deferred: dict[str, _Pull] = {}  # blocks allocated, waiting for staging room (FIFO)

    # ------------------------------------------------------------------ the seam
    def on_add(self, request) -> None:
        super().on_add(request)
        if request.remote_kv is not None:
            self.undecided[request.request_id] = request

    def num_external_tokens(self, request) -> int:
        pull = self.queue.get(request.request_id)
        return 0 if pull is None else pull.params.num_computed_tokens  # timeouts: in poll, on every rank alike

    def on_allocated(self, request, num_external_tokens: int) -> bool:
        if not super().on_allocated(request, num_external_tokens):
            pull = self.queue.get(request.request_id)
            if pull is None or pull.state == "failing":
                return False  # not ours (cannot happen on a rank in lockstep): as a lone connector
            # staging is full here (maybe not on the other ranks): keep the blocks, start later
            self.deferred[request.request_id] = self.queue.pop(request.request_id)
        return True

    def poll(self) -> PollResult:
        now = time.monotonic()
        for pull in list(self.queue.values()):
            self._check_queue_timeout(pull)
        for rid, pull in list(self.deferred.items()):
            waited = now - pull.queued_at
            if waited > self.queue_timeout_s:
                del self.deferred[rid]
                self._fail(pull, f"decode engine {self.engine_id} is out of staging blocks: waited {waited:.1f}s "
                                 f"for {len(pull.request.block_ids)} blocks' room ({self.region.num_free} staging "
                                 "rows free)")
            elif self._start(pull):
                del self.deferred[rid]
            else:
                break  # first come, first served
        self._advance_all()
        if not self.undecided:  # every rank knows alike: no exchange while nothing is migrating
            return PollResult()
        report = PullReport([rid for rid in self.landed], dict(self.local_failures))
        self.local_failures.clear()
        decision = self.agreement.decide(report)
        result = PollResult()
        for rid, error in decision.failed.items():
            req = self.undecided.pop(rid, None)
            if req is None:
                continue
            self._stop(rid)
            if self.on_pull_failure == "recompute":
                self.counts["recomputed"] += 1
                logger.warning("decode %s: request %s recomputes its prompt locally: %s", self.engine_id, rid, error)
                result.recompute.append(req)
            else:
                self.counts["failed"] += 1
                logger.warning("decode %s: request %s failed: %s", self.engine_id, rid, error)
                result.failed.append((req, error))
        for rid in decision.ready:
            req = self.undecided.pop(rid)
            pull = self.landed.pop(rid)
            if self.tp_rank == 0:  # every decode rank has its heads now: the prefill ranks may free
                self._notify_all(pull)
            self.counts["pulled"] += 1
            result.ready.append(req)
        return result

    def on_finish(self, request, reason: str) -> str:
        rid = request.request_id
        self.undecided.pop(rid, None)
        self.local_failures.pop(rid, None)
        self._stop(rid)
        return super().on_finish(request, reason)

    def describe(self) -> dict:
        return {**super().describe(), "tp_rank": self.tp_rank, "landed_waiting_for_ranks": len(self.landed),
                "waiting_for_staging": len(self.deferred)}

    # ------------------------------------------------------------------ hooks of DecodeConnector
    def _landed(self, pull: _Pull) -> None:
        self.landed[pull.request.request_id] = pull  # ready once every rank's has landed (poll)

    def _fail(self, pull: _Pull, error: str) -> None:
        self._notify_all(pull)  # best effort: the request fails on every rank anyway
        self.local_failures[pull.request.request_id] = error

    def _stop(self, rid: str) -> None:
        """The request is decided failed (or ends): drop what this rank holds for it. A read in
        flight drains into staging; the prefill ranks are told to free."""
        for pending in (self.landed, self.deferred):
            pull = pending.pop(rid, None)
            if pull is not None:
                self._notify_all(pull)
        pull = self.active.get(rid)
        if pull is not None and pull.state != "draining":
            pull.state = "draining"
            self._notify_all(pull)
            self._retire(pull)
        pull = self.queue.pop(rid, None)
        if pull is not None and pull.state != "failing":
            self._notify_all(pull)
