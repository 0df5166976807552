"""The cuda_ipc transfer engine (dlengine/parallel/transfer/cuda_ipc.py) without its GPU copy:
host regions through the wrapped DLSlime engine, the handshake's refusals (another backend,
another host, a peer that exited), configuration errors, and staging on the cache's device
(the KVRegion mode it uses). The GPU copy itself: tests/test_gpu_kv_ipc.py and
scripts/bench_kv_migration.py --backend cuda_ipc."""

import json

import pytest
import torch

pytest.importorskip("dlslime", reason="needs DLSlime: pip install 'dlengine[dlslime]'")

from dlengine import EngineBuilder  # noqa: E402
from dlengine.config import ConfigError  # noqa: E402
from dlengine.parallel.transfer import HandshakeError, make_transfer_engine  # noqa: E402
from dlengine.parallel.transfer.cuda_ipc import CudaIpcTransferEngine, _alive, check_same_host, node_identity  # noqa: E402
from dlengine.parallel.transfer.kv_region import KVRegion  # noqa: E402


def test_host_regions_travel_over_dlslime_and_info_is_json():
    a, b = CudaIpcTransferEngine(), CudaIpcTransferEngine()
    try:
        src, dst = torch.arange(16, dtype=torch.int64), torch.zeros(16, dtype=torch.int64)
        a.register_region("ctrl", src)
        b.register_region("scratch", dst)
        info = json.loads(json.dumps(a.local_info()))  # it travels inside kv_transfer_params
        assert info["backend"] == "cuda_ipc" and info["cuda_ipc"]["node"] == node_identity()
        assert info["cuda_ipc"]["regions"] == {}  # no GPU region on this machine
        b.connect("a", info)
        assert b.is_connected("a")
        assert b.read("a", "scratch", "ctrl", [(8 * 8, 0, 8 * 8)]).wait(5.0)
        assert dst[:8].tolist() == list(range(8, 16))
        with pytest.raises(Exception, match="no GPU region 'kv'"):
            b._copy("read", "a", "scratch", "kv", [(0, 0, 8)])
        b.disconnect("a")
        assert not b.is_connected("a")
    finally:
        a.close()
        b.close()


def test_handshake_refuses_other_backends_and_hosts():
    ipc, plain = CudaIpcTransferEngine(), make_transfer_engine("dlslime")
    try:
        with pytest.raises(HandshakeError, match="transfer\\('cuda_ipc'\\)"):
            ipc.connect("p", plain.local_info())
        with pytest.raises(HandshakeError, match="same transfer"):
            plain.connect("p", ipc.local_info())
        info = ipc.local_info()
        elsewhere = {**info, "cuda_ipc": {**info["cuda_ipc"], "node": "otherhost/0000"}}
        with pytest.raises(HandshakeError, match="another host"):
            CudaIpcTransferEngine().connect("p", elsewhere)
        with pytest.raises(HandshakeError, match="another host"):
            check_same_host("p", {"node": "x"}, node_identity())
    finally:
        ipc.close()
        plain.close()


def test_a_peer_that_exited_is_known_dead():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not _alive(p.pid) and _alive(-1)
    import os

    assert _alive(os.getpid())


def test_configuration_errors_name_the_problem():
    if torch.cuda.is_available():
        pytest.skip("these are the errors of a machine without CUDA")
    with pytest.raises(ConfigError, match="needs CUDA"):
        make_transfer_engine("cuda_ipc")
    with pytest.raises(ConfigError, match="GPU caches of one host"):
        EngineBuilder("tiny-qwen3").device("cpu").role("prefill").transfer("cuda_ipc").config()
    with pytest.raises(ConfigError, match="unknown KV transfer backend"):
        EngineBuilder("tiny-qwen3").role("prefill").transfer("nccl").config()


def test_staging_on_the_cache_device_round_trips():
    """The KVRegion mode cuda_ipc uses (staging on the cache's device), here on the CPU."""
    engine = EngineBuilder("tiny-qwen3").dtype("float32").device("cpu").cache(block_size=4, num_blocks=32).max_model_len(64).build()
    kv = engine.kv_cache
    g = torch.Generator().manual_seed(0)
    kv.buffer.copy_(torch.randint(0, 255, kv.buffer.shape, generator=g, dtype=torch.uint8))
    before = kv.buffer.clone()
    region = KVRegion(kv, staging_blocks=8, staging_on_device=True)
    assert region.tensor.device == kv.buffer.device and region.staged
    src, staged = [3, 7, 1], region.allocate([3, 7, 1])
    region.stage_out(src, staged)
    kv.buffer.zero_()
    region.stage_in(staged, [5, 6, 9], num_tokens=3 * 4)
    g3 = [kv.buffer[g.offset:g.offset + g.nbytes].view(g.spec.num_layers * g.spec.parts, kv.num_blocks, -1)
          for g in kv.paged_groups]
    b3 = [before[g.offset:g.offset + g.nbytes].view(g.spec.num_layers * g.spec.parts, kv.num_blocks, -1)
          for g in kv.paged_groups]
    for now, was in zip(g3, b3):
        assert torch.equal(now[:, [5, 6, 9]], was[:, [3, 7, 1]])
    engine.close()
