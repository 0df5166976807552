"""Prefill-decode disaggregation: roles, kv_transfer_params, discovery, a router.

    prefill = EngineBuilder(m).role("prefill").transfer("dlslime", transport="tcp").build()
    decode = EngineBuilder(m).role("decode").transfer("dlslime", transport="tcp").build()
    outs = PDRouter(prefill, decode).generate(prompts, params)

See docs/disaggregation.md.
"""

from dlengine.disagg.params import KVTransferParams
from dlengine.disagg.router import PDRouter

__all__ = ["KVTransferParams", "PDRouter"]
