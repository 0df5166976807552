"""Attach a prefill or decode role (and its transfer engine) to a built Engine."""

from __future__ import annotations

import uuid

from dlengine.parallel.transfer import make_transfer_engine, model_fingerprint


def attach_role(engine, transfer: dict, control_plane: dict | None = None) -> None:
    cfg = engine.config
    te = make_transfer_engine(transfer["backend"], transport=transfer["transport"], host=transfer["host"],
                              port=transfer["port"])
    engine_id = transfer["engine_id"] or f"{cfg.role}-{uuid.uuid4().hex[:8]}"
    fingerprint = model_fingerprint(cfg.model, cfg.dtype, cfg.load_format, cfg.seed)
    try:
        if cfg.role == "prefill":
            from dlengine.disagg.prefill import PrefillRole

            engine.role = PrefillRole(engine, te, engine_id, fingerprint, pin_timeout_s=transfer["pin_timeout_s"],
                                      staging_blocks=transfer["staging_blocks"])
        else:
            from dlengine.disagg.decode import DecodeRole

            engine.role = DecodeRole(engine, te, engine_id, fingerprint, pull_timeout_s=transfer["pull_timeout_s"],
                                     queue_timeout_s=transfer["queue_timeout_s"],
                                     staging_blocks=transfer["staging_blocks"],
                                     on_pull_failure=transfer.get("on_pull_failure", "fail"))
    except BaseException:
        te.close()
        raise
    if control_plane is not None:
        from dlengine.disagg.discovery import ControlPlane

        engine.role.registration = ControlPlane(control_plane["url"], scope=control_plane["scope"]).register(
            engine, heartbeat_s=control_plane["heartbeat_s"])
