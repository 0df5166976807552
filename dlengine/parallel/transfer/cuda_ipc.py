"""KV transfer between engines on one host without host staging: CUDA IPC for GPU regions.

`transfer("cuda_ipc")` gives both engines this transfer engine. Each GPU region (the KV staging,
which lives on the cache's GPU with this engine, see kv_region.py) is exported once as a CUDA IPC
handle; a peer on the same host opens it and a one-sided read or write is a GPU copy
(device-to-device on one GPU, peer-to-peer across GPUs where the host allows it) issued on a side
stream, completed by a CUDA event. Host regions (the prefill side's small control and handshake
records, a few KiB) keep going through DLSlime's TCP endpoints on loopback: the engine wraps a
`DLSlimeTransferEngine` and routes each read or write by where the local region lives.

Handshake: `local_info()` is DLSlime's address plus a "cuda_ipc" record (the host's identity, the
process id, each GPU region's handle and the UUID of its GPU). `connect` refuses, with a
HandshakeError, a peer on another host (by boot id and host name) or one whose GPU is not
visible here, so a misconfigured pair fails at the first pull with a reason, never with a
corrupt cache.

Failure handling is the DLSlime path's: a dead prefill process fails the decode side's control
read and pin check over TCP (the KV read itself, a GPU copy, cannot hang), timeouts are the
future's `wait(timeout)`, and a pull that failed never reaches the cache (it lands in staging).

The handles come from `torch.multiprocessing.reductions.reduce_tensor` (what torch's own
multiprocessing queues send for CUDA tensors) and are opened with `rebuild_cuda_tensor`, with
the arguments encoded as JSON instead of pickled: peer info travels inside kv_transfer_params,
and unpickling what a peer sends would run its code.
"""

from __future__ import annotations

import base64
import os
import socket
from typing import Sequence

import torch

from dlengine.parallel.transfer.base import HandshakeError, Segment, TransferError


def node_identity() -> str:
    """Names this host's kernel instance: processes with equal identities can open each other's
    CUDA IPC handles (same machine, same boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode("ascii")


def _unb64(value: str | None) -> bytes | None:
    return None if value is None else base64.b64decode(value)


def export_handle(tensor: torch.Tensor) -> dict:
    """A JSON record that lets another process on this host map `tensor`'s bytes (a contiguous
    CUDA tensor, exported as flat uint8)."""
    from torch.multiprocessing.reductions import reduce_tensor

    flat = tensor.reshape(-1).view(torch.uint8)
    _, args = reduce_tensor(flat)
    (_, size, stride, offset, _, _, device, handle, storage_bytes, storage_offset, _, ref_handle, ref_offset,
     event_handle, event_sync) = args
    return {"size": list(size), "stride": list(stride), "offset": int(offset), "device_uuid": device_uuid(device),
            "handle": _b64(handle), "storage_bytes": int(storage_bytes), "storage_offset": int(storage_offset),
            "ref_handle": _b64(ref_handle), "ref_offset": int(ref_offset), "event_handle": _b64(event_handle),
            "event_sync": bool(event_sync)}


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_device_of(uuid: str) -> int | None:
    """This process's index of the GPU with `uuid` (CUDA_VISIBLE_DEVICES may renumber), or None."""
    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    return None


def open_handle(record: dict) -> torch.Tensor:
    """The flat uint8 tensor a peer exported with `export_handle`, mapped into this process."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device = local_device_of(record["device_uuid"])
    if device is None:
        raise HandshakeError(f"the peer's GPU {record['device_uuid']} is not visible to this process "
                             "(CUDA_VISIBLE_DEVICES): cuda_ipc needs both engines to see it")
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(record["size"]), tuple(record["stride"]), record["offset"], torch.storage.TypedStorage,
        torch.uint8, device, _unb64(record["handle"]), record["storage_bytes"], record["storage_offset"], False,
        _unb64(record["ref_handle"]), record["ref_offset"], _unb64(record["event_handle"]), record["event_sync"])


def check_same_host(peer_id: str, ipc: dict, node: str) -> None:
    """HandshakeError unless the peer's cuda_ipc record names this host."""
    if ipc.get("node") != node:
        raise HandshakeError(f"peer {peer_id!r} runs on another host ({ipc.get('node')!r}, this one is "
                             f"{node!r}): cuda_ipc moves KV inside one host; use transfer('dlslime') across hosts")


class CudaIpcFuture:
    """Completion of one batch of GPU copies (a CUDA event on the copy stream)."""

    def __init__(self, event, what: str) -> None:
        self.event, self.what = event, what

    def done(self) -> bool:
        return self.event.query()

    def wait(self, timeout: float | None = None) -> bool:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.event.query():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.0002)
        return True


class _Peer:
    def __init__(self, pid: int, regions: dict[str, torch.Tensor]) -> None:
        self.pid, self.regions = pid, regions


class CudaIpcTransferEngine:
    """TransferEngine for two engines on one host: GPU regions by CUDA IPC, host regions by the
    wrapped DLSlime TCP engine. Needs CUDA; `reads_device_memory` tells KVRegion to stage on the
    cache's GPU instead of pinned host memory."""

    backend = "cuda_ipc"
    transport = "cuda_ipc"
    reads_device_memory = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0, host_engine=None) -> None:
        """Host regions work without CUDA (they are DLSlime's); GPU regions need it, and
        `make_transfer_engine("cuda_ipc")` refuses a machine without it."""
        if host_engine is None:
            from dlengine.parallel.transfer.dlslime_backend import DLSlimeTransferEngine

            host_engine = DLSlimeTransferEngine(transport="tcp", host=host, port=port)
        self.host_engine = host_engine
        self.node = node_identity()
        self._gpu_regions: dict[str, torch.Tensor] = {}
        self._exported: dict[str, dict] = {}
        self._peers: dict[str, _Peer] = {}
        self._streams: dict[int, torch.cuda.Stream] = {}

    def __repr__(self) -> str:
        return f"CudaIpcTransferEngine(gpu regions={sorted(self._gpu_regions)}, host={self.host_engine!r})"

    # ------------------------------------------------------------------ memory
    def register_region(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cuda":
            self.host_engine.register_region(name, tensor)
            return
        if not tensor.is_contiguous():
            raise ValueError(f"region {name!r} must be contiguous")
        flat = tensor.reshape(-1).view(torch.uint8)
        self._gpu_regions[name] = flat
        self._exported[name] = export_handle(flat)

    def local_info(self) -> dict:
        info = dict(self.host_engine.local_info())
        info["backend"] = self.backend
        info["cuda_ipc"] = {"node": self.node, "pid": os.getpid(), "pid_namespace": _pid_namespace(),
                            "regions": dict(self._exported)}
        return info

    # ------------------------------------------------------------------ peers
    def connect(self, peer_id: str, info: dict) -> None:
        ipc = info.get("cuda_ipc") if isinstance(info, dict) else None
        if not isinstance(ipc, dict):
            raise HandshakeError(f"peer {peer_id!r} does not use the cuda_ipc transfer engine (backend "
                                 f"{info.get('backend') if isinstance(info, dict) else None!r}): give both engines "
                                 "transfer('cuda_ipc')")
        check_same_host(peer_id, ipc, self.node)
        regions = {name: open_handle(rec) for name, rec in (ipc.get("regions") or {}).items()}
        self.host_engine.connect(peer_id, {**info, "backend": "dlslime"})
        # a peer's pid means something here only inside the same pid namespace
        pid = int(ipc.get("pid", -1)) if ipc.get("pid_namespace") == _pid_namespace() else -1
        self._peers[peer_id] = _Peer(pid, regions)

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self._peers and self.host_engine.is_connected(peer_id)

    def disconnect(self, peer_id: str) -> None:
        self._peers.pop(peer_id, None)  # the mapped regions are unmapped when their tensors go
        self.host_engine.disconnect(peer_id)

    # ------------------------------------------------------------------ I/O
    def _copy(self, kind: str, peer_id: str, local_region: str, remote_region: str,
              segments: Sequence[Segment]) -> CudaIpcFuture:
        peer = self._peers.get(peer_id)
        if peer is None:
            raise TransferError(f"not connected to peer {peer_id!r}")
        if remote_region not in peer.regions:
            raise TransferError(f"peer {peer_id!r} has no GPU region {remote_region!r} (has {sorted(peer.regions)})")
        if not _alive(peer.pid):
            raise TransferError(f"peer {peer_id!r} (process {peer.pid}) has exited")
        local, remote = self._gpu_regions[local_region], peer.regions[remote_region]
        for r_off, l_off, n in segments:
            if n <= 0 or min(r_off, l_off) < 0 or l_off + n > local.numel() or r_off + n > remote.numel():
                raise TransferError(f"segment ({r_off}, {l_off}, {n}) is outside region {local_region!r} "
                                    f"({local.numel()} bytes) or the peer's {remote_region!r} ({remote.numel()} bytes)")
        device = local.device.index
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device=device)
        # the copies must see what this process wrote to the local region before (a write's source)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for r_off, l_off, n in segments:
                src, dst = (remote[r_off:r_off + n], local[l_off:l_off + n]) if kind == "read" else \
                    (local[l_off:l_off + n], remote[r_off:r_off + n])
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        total = sum(n for _, _, n in segments)
        return CudaIpcFuture(event, f"{kind} of {total} bytes with peer {peer_id!r}")

    def read(self, peer_id: str, local_region: str, remote_region: str, segments: Sequence[Segment]):
        """One-sided read; GPU regions by a GPU copy, host regions through DLSlime."""
        if local_region in self._gpu_regions:
            return self._copy("read", peer_id, local_region, remote_region, segments)
        return self.host_engine.read(peer_id, local_region, remote_region, segments)

    def write(self, peer_id: str, local_region: str, remote_region: str, segments: Sequence[Segment]):
        if local_region in self._gpu_regions:
            return self._copy("write", peer_id, local_region, remote_region, segments)
        return self.host_engine.write(peer_id, local_region, remote_region, segments)

    def close(self) -> None:
        for pid in list(self._peers):
            self.disconnect(pid)
        self.host_engine.close()


def _pid_namespace() -> str | None:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Whether a process of this host still runs (a peer in another pid namespace reads as alive)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
