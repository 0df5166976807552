"""Drive a prefill engine and a decode engine as one: prompt -> prefill -> migrate -> decode.

`PDRouter(prefill, decode)` takes a built prefill engine or a `WorkerEngine` running one (other
process, dlengine.disagg.worker), and a decode engine in this process (the router steps it);
its `generate` returns outputs in input order, like
`Engine.generate`: token ids are the prefill's first token followed by the decode engine's.
"""

from __future__ import annotations

from typing import Sequence

from dlengine.engine.request import RequestOutput
from dlengine.sampling_params import SamplingParams


class PDRouter:
    """
    >>> from dlengine import EngineBuilder, SamplingParams
    >>> from dlengine.disagg import PDRouter
    >>> p = EngineBuilder("tiny-qwen3").role("prefill").transfer("dlslime").build()
    >>> d = EngineBuilder("tiny-qwen3").role("decode").transfer("dlslime").build()
    >>> router = PDRouter(p, d)
    >>> [out] = router.generate([[3, 4, 5]], SamplingParams(max_tokens=5, temperature=0.0))
    >>> len(out.token_ids), out.finish_reason
    (5, 'length')
    >>> router.migration_report()["requests"]
    1
    >>> p.close(); d.close()
    """

    def __init__(self, prefill, decode) -> None:
        self.prefill = prefill
        self.decode = decode

    def generate(self, prompts: Sequence, params: SamplingParams | None = None) -> list[RequestOutput]:
        params = params or SamplingParams()
        firsts = self.prefill.generate(list(prompts), params)
        finals: dict[int, object] = {}
        pending: dict[str, int] = {}
        for i, out in enumerate(firsts):
            if out.kv_transfer_params is None:  # finished at the first token (or failed there)
                finals[i] = out
                continue
            rid = self.decode.add_request(list(out.prompt_token_ids), params,
                                          kv_transfer_params=out.kv_transfer_params)
            pending[rid] = i
        while pending:
            for out in self.decode.step():
                if out.finished and out.request_id in pending:
                    finals[pending.pop(out.request_id)] = out
            if hasattr(self.prefill, "step"):  # an in-process prefill engine frees blocks in its step
                self.prefill.step()
        for _ in range(3):  # let a local prefill engine see the last done-notifications
            if hasattr(self.prefill, "step"):
                self.prefill.step()
        return [finals[i] for i in range(len(firsts))]

    def migration_report(self) -> dict:
        """Totals over the decode engine's pulls so far: requests, blocks, bytes, ms, GB/s."""
        return migration_report(self.decode.connector.migrations)


def migration_report(records) -> dict:
    n_bytes = sum(r.nbytes for r in records)
    secs = sum(r.seconds for r in records)
    return {
        "requests": len(records),
        "tokens": sum(r.num_tokens for r in records),
        "blocks": sum(r.num_blocks for r in records),
        "segments": sum(r.num_segments for r in records),
        "bytes": n_bytes,
        "ms_total": secs * 1e3,
        "ms_per_request": secs * 1e3 / max(1, len(records)),
        "gb_per_s": n_bytes / secs / 1e9 if secs > 0 else 0.0,
    }
