"""One kernel choice per engine (kernels/selection.py): attention("torch") is the pure reference,
layers keep the kernels of the scope they were built in, describe() names a kernel per op, and a
user's backend object plugs in."""

from __future__ import annotations

import pytest
import torch

from dlengine import ConfigError, EngineBuilder, SamplingParams
from dlengine.kernels import selection
from dlengine.kernels.attention.backend import AttentionBackendBase
from dlengine.kernels.attention.torch_backend import TorchAttentionBackend
from dlengine.kernels.norm_rope import norm_rope_torch
from dlengine.kernels.selection import (REFERENCE_KERNELS, TORCH_OPS, current_kernels, kernel_scope,
                                        resolve_attention_backend, resolve_kernels, select_ops)
from dlengine.models.layers.norm import RMSNorm

OPS = ("attention", "kv_write", "gqa_decode", "gqa_prefill", "mla_decode", "mla_prefill", "norm_rope", "moe",
       "fp8_gemm", "moe_fp8")


def _layers_with_kernels(model: torch.nn.Module):
    ops = [m for m in model.modules() if hasattr(m, "ops")]
    backends = [m for m in model.modules() if hasattr(m, "backend")]
    return ops, backends


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-deepseek-v3"])
def test_torch_attention_builds_layers_on_the_torch_references(preset):
    engine = EngineBuilder(preset).attention("torch").cuda_graphs(False).build()
    ops, backends = _layers_with_kernels(engine.model)
    assert ops and backends
    for m in ops:
        assert m.ops is TORCH_OPS, type(m).__name__
        assert m.ops.rms_norm is norm_rope_torch.rms_norm and m.ops.rope_write_kv is norm_rope_torch.rope_write_kv
    for m in backends:
        assert m.backend is engine.runner.backend and isinstance(m.backend, TorchAttentionBackend)
    kernels = engine.describe()["kernels"]
    assert set(kernels) == set(OPS) and all(isinstance(v, str) and v for v in kernels.values())
    assert kernels["attention"] == "torch" and kernels["norm_rope"] == "torch" and kernels["moe"] == "torch"
    assert engine.runner.kernels.describe() == kernels


def test_torch_ops_on_every_device_and_the_disable_switch(monkeypatch):
    cuda = torch.device("cuda")  # a device object needs no GPU: only its type is read
    assert resolve_kernels("torch", device=cuda).ops is TORCH_OPS
    assert select_ops("cpu") is TORCH_OPS
    if selection.HAS_TRITON_OPS:
        from dlengine.kernels.norm_rope import norm_rope_triton

        assert select_ops(cuda).rms_norm is norm_rope_triton.rms_norm
        assert select_ops(cuda).names["norm_rope"].startswith("triton")
    monkeypatch.setenv("DLENGINE_DISABLE_TRITON_OPS", "1")
    assert select_ops(cuda) is TORCH_OPS


def test_layers_outside_a_scope_take_the_reference_and_scopes_nest():
    assert current_kernels() is REFERENCE_KERNELS
    assert RMSNorm(8).ops is TORCH_OPS
    custom = selection.Kernels(TorchAttentionBackend(), select_ops("cpu"))
    with kernel_scope(custom):
        assert current_kernels() is custom
        with kernel_scope(REFERENCE_KERNELS):
            assert current_kernels() is REFERENCE_KERNELS
        assert current_kernels() is custom
    assert current_kernels() is REFERENCE_KERNELS


def test_the_triton_backend_gets_its_mla_decode_kernel_at_construction():
    triton = pytest.importorskip("triton")  # noqa: F841
    from dlengine.kernels.attention.paged_attention_triton import interpret_mode

    if not interpret_mode() and not torch.cuda.is_available():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = resolve_attention_backend("triton", device, mla_decode="triton")
    assert backend.name == "triton" and backend.mla_decode == "triton"
    assert "triton" in backend.kernel_names()["mla_decode"]
    with pytest.raises(ConfigError, match="mla_decode"):
        resolve_attention_backend("triton", device, mla_decode="flashmla")
    with pytest.raises(ConfigError, match="mla_decode"):
        resolve_attention_backend("torch", device, mla_decode="gluon")


class CountingBackend(AttentionBackendBase):
    """A user's backend: the torch reference, counting its calls."""

    name = "counting"

    def __init__(self) -> None:
        self.ref = TorchAttentionBackend()
        self.calls = 0

    def write_kv(self, k, v, k_cache, v_cache, meta):
        self.ref.write_kv(k, v, k_cache, v_cache, meta)

    def attend(self, q, k_cache, v_cache, meta, scale):
        self.calls += 1
        return self.ref.attend(q, k_cache, v_cache, meta, scale)


def test_a_backend_object_plugs_in_and_describe_shows_its_name():
    backend = CountingBackend()
    # a fixed pool: on a GPU the first engine would otherwise take the memory the second needs
    engine = EngineBuilder("tiny-qwen3").attention(backend).cuda_graphs(False).cache(num_blocks=256).build()
    assert engine.runner.backend is backend
    kernels = engine.describe()["kernels"]
    assert kernels["attention"] == kernels["gqa_decode"] == kernels["mla_prefill"] == "counting"
    ref = EngineBuilder("tiny-qwen3").attention("torch").cuda_graphs(False).cache(num_blocks=256).build()
    params = SamplingParams(max_tokens=4, temperature=0.0)
    got = engine.generate(["hello world"], params)[0].token_ids
    assert backend.calls > 0
    assert got == ref.generate(["hello world"], params)[0].token_ids


def test_a_backend_object_missing_protocol_methods_is_a_config_error():
    class Half:
        name = "half"
        supports_cuda_graphs = False

        def attend(self, q, k_cache, v_cache, meta, scale):
            raise AssertionError("never called")

    with pytest.raises(ConfigError, match="write_kv"):
        resolve_kernels(Half())
    with pytest.raises(ConfigError, match="mla_decode"):
        resolve_kernels(CountingBackend(), mla_decode="gluon")
