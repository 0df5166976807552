"""Build the KV connector of a prefill or decode engine (and its transfer engine) from options.

A role is a connector configuration: `EngineBuilder.role("prefill").transfer(...)` makes a
`PrefillConnector`, `role("decode")` a `DecodeConnector`, each over its own DLSlime endpoint.
"""

from __future__ import annotations

import dataclasses
import uuid

from dlengine.parallel.transfer import make_transfer_engine, model_fingerprint


def rank_kv_config(config, kv_cache):
    """`config` with the kv heads this rank's cache holds: under tensor parallelism a GQA cache
    keeps its rank's share of the heads (MLA's latent is whole), and the connector's KV layout --
    what a decode engine checks and slices by -- must say so."""
    model = config.model
    if model.uses_mla:
        return config
    # the first paged group is the full-attention K/V (state models keep a state group beside it)
    heads = getattr(kv_cache.paged_groups[0].spec, "num_kv_heads", 0)
    if not heads or heads == model.num_key_value_heads:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(model, num_key_value_heads=heads))


def make_connector(role: str, transfer: dict, kv_cache, block_manager, config, control_plane: dict | None = None,
                   rank: int = 0, parallel_state=None):
    """The connector for `role` over a new transfer engine. `rank` names this rank's endpoint
    when the engine is one rank of a parallel layout (each rank moves its own KV shard); a
    decode rank of a tensor-parallel group (`parallel_state`) agrees with the other ranks on
    when a pulled request is ready (disagg/tp_decode.py)."""
    te = make_transfer_engine(transfer["backend"], transport=transfer["transport"], host=transfer["host"],
                              port=transfer["port"] if rank == 0 else 0)
    engine_id = transfer["engine_id"] or f"{role}-{uuid.uuid4().hex[:8]}"
    if rank:
        engine_id = f"{engine_id}.rank{rank}"
    fingerprint = model_fingerprint(config.model, config.dtype, config.load_format, config.seed)
    config = rank_kv_config(config, kv_cache)
    try:
        if role == "prefill":
            from dlengine.disagg.prefill import PrefillConnector

            connector = PrefillConnector(kv_cache, block_manager, config, te, engine_id, fingerprint,
                                         pin_timeout_s=transfer["pin_timeout_s"],
                                         staging_blocks=transfer["staging_blocks"])
        else:
            from dlengine.disagg.decode import DecodeConnector

            options = dict(pull_timeout_s=transfer["pull_timeout_s"], queue_timeout_s=transfer["queue_timeout_s"],
                           staging_blocks=transfer["staging_blocks"],
                           on_pull_failure=transfer.get("on_pull_failure", "fail"))
            if parallel_state is not None and parallel_state.tp_size > 1:
                from dlengine.disagg.tp_decode import TPDecodeConnector
                from dlengine.parallel.pull_agreement import PullAgreement

                agreement = PullAgreement(parallel_state.tp_group, parallel_state.tp_rank, parallel_state.tp_size)
                connector = TPDecodeConnector(kv_cache, block_manager, config, te, engine_id, fingerprint,
                                              agreement=agreement, **options)
            else:
                connector = DecodeConnector(kv_cache, block_manager, config, te, engine_id, fingerprint, **options)
    except BaseException:
        te.close()
        raise
    if control_plane is not None and rank == 0:
        from dlengine.disagg.discovery import ControlPlane

        connector.registration = ControlPlane(control_plane["url"], scope=control_plane["scope"]).register(
            connector, heartbeat_s=control_plane["heartbeat_s"])
    return connector
