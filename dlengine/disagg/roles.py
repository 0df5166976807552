"""Build the KV connector of a prefill or decode engine (and its transfer engine) from options.

A role is a connector configuration: `EngineBuilder.role("prefill").transfer(...)` makes a
`PrefillConnector`, `role("decode")` a `DecodeConnector`, each over its own DLSlime endpoint.
"""

from __future__ import annotations

import uuid

from dlengine.parallel.transfer import make_transfer_engine, model_fingerprint


def make_connector(role: str, transfer: dict, kv_cache, block_manager, config, control_plane: dict | None = None,
                   rank: int = 0):
    """The connector for `role` over a new transfer engine. `rank` names this rank's endpoint
    when the engine is one rank of a parallel layout (each rank moves its own KV shard)."""
    te = make_transfer_engine(transfer["backend"], transport=transfer["transport"], host=transfer["host"],
                              port=transfer["port"] if rank == 0 else 0)
    engine_id = transfer["engine_id"] or f"{role}-{uuid.uuid4().hex[:8]}"
    if rank:
        engine_id = f"{engine_id}.rank{rank}"
    fingerprint = model_fingerprint(config.model, config.dtype, config.load_format, config.seed)
    try:
        if role == "prefill":
            from dlengine.disagg.prefill import PrefillConnector

            connector = PrefillConnector(kv_cache, block_manager, config, te, engine_id, fingerprint,
                                         pin_timeout_s=transfer["pin_timeout_s"],
                                         staging_blocks=transfer["staging_blocks"])
        else:
            from dlengine.disagg.decode import DecodeConnector

            connector = DecodeConnector(kv_cache, block_manager, config, te, engine_id, fingerprint,
                                        pull_timeout_s=transfer["pull_timeout_s"],
                                        queue_timeout_s=transfer["queue_timeout_s"],
                                        staging_blocks=transfer["staging_blocks"],
                                        on_pull_failure=transfer.get("on_pull_failure", "fail"))
    except BaseException:
        te.close()
        raise
    if control_plane is not None and rank == 0:
        from dlengine.disagg.discovery import ControlPlane

        connector.registration = ControlPlane(control_plane["url"], scope=control_plane["scope"]).register(
            connector, heartbeat_s=control_plane["heartbeat_s"])
    return connector
