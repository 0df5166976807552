"""KV transfer between engines (prefill -> decode migration).

`make_transfer_engine("dlslime", transport="tcp")` gives a `TransferEngine` backed by DLSlime's
endpoints, `make_transfer_engine("cuda_ipc")` one that copies GPU regions between processes of one
host by CUDA IPC (cuda_ipc.py); `KVLayout` turns block lists into byte segments (every cache group, and kv-head
gathers across tensor-parallel sizes); `KVRegion` is what gets registered (the cache itself on
CPU, pinned host staging for CUDA caches). `import dlengine` never imports
DLSlime: only building a transfer engine does.
"""

from __future__ import annotations

from dlengine.config import ConfigError
from dlengine.parallel.transfer.base import (
    GroupLayout,
    HandshakeError,
    KVLayout,
    TransferEngine,
    TransferError,
    TransferFuture,
    kv_layout,
    model_fingerprint,
)

BACKENDS = ("dlslime", "cuda_ipc")


def make_transfer_engine(backend: str = "dlslime", transport: str = "tcp", host: str = "127.0.0.1",
                         port: int = 0) -> TransferEngine:
    """A transfer engine listening on host:port (0: any free port).

    >>> te = make_transfer_engine("dlslime", transport="tcp")
    >>> te.backend, te.transport
    ('dlslime', 'tcp')
    >>> te.close()
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown KV transfer backend {backend!r}; choose one of {BACKENDS}")
    if backend == "cuda_ipc":  # GPU regions by CUDA IPC inside one host, host regions over DLSlime tcp
        import torch

        from dlengine.parallel.transfer.cuda_ipc import CudaIpcTransferEngine

        if not torch.cuda.is_available():
            raise ConfigError("transfer('cuda_ipc') moves KV between GPU caches of one host and needs CUDA; use "
                              "transfer('dlslime') for CPU engines")
        return CudaIpcTransferEngine(host=host, port=port)
    from dlengine.parallel.transfer.dlslime_backend import DLSlimeTransferEngine

    return DLSlimeTransferEngine(transport=transport, host=host, port=port)


__all__ = ["BACKENDS", "GroupLayout", "HandshakeError", "KVLayout", "TransferEngine", "TransferError",
           "TransferFuture", "kv_layout", "make_transfer_engine", "model_fingerprint"]
