"""One kernel choice per engine, made once at build: `resolve_kernels(...) -> Kernels`.

`Kernels` holds the attention backend object (constructed with its MLA decode kernel) and the
table of fused ops (`Ops`) bound to Triton or to the torch references. The rule:

  attention("torch")          the pure torch reference on any device: backend and every op
  attention("auto"/"triton")  on CUDA: Triton ops (and the Triton backend); off CUDA the torch
                              ops ("triton" there only runs under TRITON_INTERPRET=1, for tests)
  attention("flashinfer")     FlashInfer's attention, Triton ops on CUDA
  an AttentionBackend object  used as given; ops as for "auto" on the device
  DLENGINE_DISABLE_TRITON_OPS=1 forces the torch ops whatever the backend (for A/B checks)

How layers get their kernels: the builder constructs the model inside `with kernel_scope(kernels):`
(as it does with parallel/state.py's `parallel_state`), and each layer keeps what it calls in its
constructor: `self.ops = current_kernels().ops`, attention layers `self.backend =
current_kernels().attention`. A layer then never looks anything up per call, and what a built
model runs cannot change behind its back. Chosen over carrying the kernels in the ForwardContext
because norms, rotary embeddings and MoE layers never see the context (their forward takes only
activations), and because the choice is a property of the built model, not of a step. Outside any
scope (tests that build layers directly) `current_kernels()` is the torch reference.

`describe()` names the kernel of each op, for Engine.describe(), the repr and `dlengine bench`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from dlengine.config import ConfigError
from dlengine.kernels.attention.backend import AttentionBackend, AttentionBackendBase, missing_methods
from dlengine.kernels.attention.torch_backend import TorchAttentionBackend
from dlengine.kernels.fp8 import fp8_torch
from dlengine.kernels.kv_quant import is_fp8
from dlengine.kernels.gdn import causal_conv1d_torch, gated_delta_rule_torch
from dlengine.kernels.attention.prefill_choice import resolve_prefill_attention
from dlengine.kernels.mla.decode_choice import MLA_DECODE_KERNELS, resolve_mla_decode
from dlengine.kernels.moe import fused_moe_torch
from dlengine.kernels.norm_rope import norm_rope_torch
from dlengine.kernels.v4 import batched_decode as v4_batched
from dlengine.kernels.v4 import reference as v4_reference

try:  # triton is optional: CPU-only installs run the torch references
    from dlengine.kernels.norm_rope import norm_rope_triton

    HAS_TRITON_OPS = True
except Exception:  # noqa: BLE001 - any import failure means "no triton here"
    norm_rope_triton = None
    HAS_TRITON_OPS = False

try:
    from dlengine.kernels.moe import fused_moe_triton

    HAS_FUSED_MOE = True
except Exception:  # noqa: BLE001
    fused_moe_triton = None
    HAS_FUSED_MOE = False

try:
    from dlengine.kernels.v4 import decode_triton as v4_decode_triton
    from dlengine.kernels.v4 import indexer_triton as v4_indexer_triton
    from dlengine.kernels.v4 import prefill_triton as v4_prefill_triton

    HAS_V4_DECODE = True
except Exception:  # noqa: BLE001
    v4_decode_triton = v4_indexer_triton = v4_prefill_triton = None
    HAS_V4_DECODE = False

try:
    from dlengine.kernels.fp8 import fp8_gemm_triton
    from dlengine.kernels.moe import fused_moe_fp8_triton

    HAS_FP8_GEMM = True
except Exception:  # noqa: BLE001
    fp8_gemm_triton = fused_moe_fp8_triton = None
    HAS_FP8_GEMM = False

try:
    from dlengine.kernels.gdn import causal_conv1d_triton, gated_delta_rule_triton

    HAS_GDN_TRITON = True
except Exception:  # noqa: BLE001
    causal_conv1d_triton = gated_delta_rule_triton = None
    HAS_GDN_TRITON = False

try:  # fla-core's chunk kernel, preferred for prompts when importable (optional extra)
    from dlengine.kernels.gdn import gated_delta_rule_fla

    HAS_FLA = True
except Exception:  # noqa: BLE001
    gated_delta_rule_fla = None
    HAS_FLA = False

DISABLE_TRITON_OPS_ENV = "DLENGINE_DISABLE_TRITON_OPS"
ATTENTION_OPS = ("kv_write", "gqa_decode", "gqa_prefill", "mla_decode", "mla_prefill")
_INSTALL_HINT = {"triton": "pip install triton", "flashinfer": "pip install flashinfer-python"}


# ------------------------------------------------------------------------------------------ ops


@dataclass(frozen=True)
class Ops:
    """The fused ops a decoder layer calls, each bound to one implementation (same signatures as
    the torch references in norm_rope/, moe/, fp8/). `names` says which, per op group."""

    rms_norm: Callable  # (x, weight, eps, residual=None, zero_centred=False) -> y | (y, x + residual)
    silu_and_mul: Callable  # (x [.., 2d]) -> [.., d]
    rope: Callable  # (q, k, positions, cos, sin) -> (q, k)
    # (q, k, v, positions, cos, sin, slots, k_cache, v_cache, q_norm_w, k_norm_w, eps[, k_scale=, v_scale=: FP8 caches])
    rope_write_kv: Callable
    fused_experts: Callable  # (x, w13, w2, topk_weights, topk_ids) -> [T, H]
    fp8_linear: Callable  # (x, w_q, w_scale, block, row_div, bias=None) -> [.., N]
    fused_experts_fp8: Callable  # (x, w13, w13_scale, w2, w2_scale, block, w13_row_div, topk_weights, topk_ids)
    names: dict[str, str] = field(default_factory=dict)
    # Gated DeltaNet (kernels/gdn/): conv1d (prefill, decode) and the gated delta rule (chunk
    # prefill, recurrent decode); names["gdn"] names the kernels when they are not the torch
    # references (the key is absent on the torch table, whose describe() keys tests pin)
    causal_conv1d_varlen: Callable = causal_conv1d_torch.causal_conv1d_varlen
    causal_conv1d_update: Callable = causal_conv1d_torch.causal_conv1d_update
    gated_delta_rule_varlen: Callable = gated_delta_rule_torch.gated_delta_rule_varlen
    gated_delta_rule_update: Callable = gated_delta_rule_torch.recurrent_gated_delta_rule_update
    # DeepSeek-V4 decode attention, prompt-step attention and the batched decode step's indexer
    # scores (kernels/v4/): Triton on CUDA, else the torch references; not listed in `names`
    # (only V4 models call them)
    v4_decode_attention: Callable = v4_reference.decode_attention
    v4_prefill_attention: Callable = v4_reference.prefill_attention
    v4_indexer_logits: Callable = v4_batched.indexer_logits
    # DeepSeek-V4's clamped-SwiGLU experts: (x, w13, w2, topk_weights, topk_ids, limit) -> [T, H];
    # the fused Triton MoE with its clamped epilogue on CUDA, else the per-expert reference
    fused_experts_clamped: Callable = v4_reference.clamped_swiglu_experts
    # Gated DeltaNet's output norm: (x, gate, weight, eps) -> weight * norm(x) * silu(gate); Triton
    # with the other norm_rope kernels
    gated_rms_norm: Callable = norm_rope_torch.gated_rms_norm


TORCH_OPS = Ops(
    rms_norm=norm_rope_torch.rms_norm, silu_and_mul=norm_rope_torch.silu_and_mul, rope=norm_rope_torch.rope,
    rope_write_kv=norm_rope_torch.rope_write_kv, fused_experts=fused_moe_torch.fused_experts_torch,
    fp8_linear=fp8_torch.fp8_linear_torch, fused_experts_fp8=fp8_torch.fused_experts_fp8_torch,
    names={"norm_rope": "torch", "moe": "torch", "fp8_gemm": "torch (W8A8 reference)", "moe_fp8": "torch"},
)


def triton_ops_disabled() -> bool:
    return os.environ.get(DISABLE_TRITON_OPS_ENV) == "1"


def select_ops(device: torch.device | str, use_triton: bool = True) -> Ops:
    """The ops table for `device`: each op group on Triton when `use_triton`, the device is CUDA,
    its kernels import and DLENGINE_DISABLE_TRITON_OPS is not set; else the torch references."""
    device = torch.device(device)
    if not (use_triton and device.type == "cuda") or triton_ops_disabled():
        return TORCH_OPS
    ops, names = {}, dict(TORCH_OPS.names)
    if HAS_TRITON_OPS:
        ops.update(rms_norm=norm_rope_triton.rms_norm, silu_and_mul=norm_rope_triton.silu_and_mul,
                   rope=norm_rope_triton.rope, rope_write_kv=norm_rope_triton.rope_write_kv,
                   gated_rms_norm=norm_rope_triton.gated_rms_norm)
        names["norm_rope"] = "triton (fused rms norm, silu-and-mul, qk-norm + rope + kv write)"
    if HAS_FUSED_MOE:
        ops["fused_experts"] = fused_moe_triton.fused_experts_triton
        ops["fused_experts_clamped"] = fused_moe_triton.fused_experts_clamped_triton
        names["moe"] = "triton fused MoE"
    if HAS_FP8_GEMM:
        ops.update(fp8_linear=fp8_gemm_triton.fp8_linear,
                   fused_experts_fp8=fused_moe_fp8_triton.fused_experts_fp8_triton)
        gemm = "deep_gemm where the shape suits it, else triton" if fp8_gemm_triton.HAS_DEEP_GEMM else "triton"
        names.update(fp8_gemm=f"{gemm} block-scaled GEMM", moe_fp8="triton block-scaled fused MoE")
    if HAS_V4_DECODE:
        ops.update(v4_decode_attention=v4_decode_triton.decode_attention,
                   v4_prefill_attention=v4_prefill_triton.prefill_attention,
                   v4_indexer_logits=v4_indexer_triton.indexer_logits)
    if HAS_GDN_TRITON:
        ops.update(causal_conv1d_varlen=causal_conv1d_triton.causal_conv1d_varlen,
                   causal_conv1d_update=causal_conv1d_triton.causal_conv1d_update,
                   gated_delta_rule_varlen=gated_delta_rule_triton.gated_delta_rule_varlen,
                   gated_delta_rule_update=gated_delta_rule_triton.recurrent_gated_delta_rule_update)
        names["gdn"] = "triton (conv1d, chunk + recurrent gated delta rule)"
        if HAS_FLA:
            ops["gated_delta_rule_varlen"] = gated_delta_rule_fla.gated_delta_rule_varlen
            names["gdn"] = "fla-core chunk gated delta rule; triton conv1d and recurrent update"
    fields = {f: getattr(TORCH_OPS, f) for f in TORCH_OPS.__dataclass_fields__ if f != "names"}
    fields.update(ops)
    return Ops(**fields, names=names)


# ------------------------------------------------------------------------------------------ backends


def _triton_backend():
    from dlengine.kernels.attention.triton_backend import TritonAttentionBackend  # needs triton

    return TritonAttentionBackend


def _flashinfer_backend():
    from dlengine.kernels.attention.flashinfer_backend import FlashInferAttentionBackend  # optional package

    return FlashInferAttentionBackend


# name -> zero-argument loader of the backend class (imports stay lazy: optional packages)
_BACKENDS = {"torch": lambda: TorchAttentionBackend, "triton": _triton_backend, "flashinfer": _flashinfer_backend}


def _importable(name: str) -> bool:
    try:
        _BACKENDS[name]()
        return True
    except ImportError:
        return False


def known_attention_backends() -> list[str]:
    """Every backend name, importable here or not (no imports: cheap for --help texts)."""
    return sorted(_BACKENDS)


def available_attention_backends() -> list[str]:
    return sorted(n for n in _BACKENDS if _importable(n))


def attention_backend_name(requested: str, device: torch.device) -> str:
    """The backend "auto" stands for on `device`: Triton on CUDA when it imports (our kernels,
    capturable in CUDA graphs), else the torch reference. FlashInfer is only ever asked for by name."""
    if requested == "auto":
        return "triton" if device.type == "cuda" and _importable("triton") else "torch"
    if requested not in _BACKENDS:
        raise ConfigError(f"unknown attention backend {requested!r}; known: {sorted(_BACKENDS)}")
    return requested


def resolve_attention_backend(name: str, device: torch.device, mla_decode: str = "auto",
                              prefill_attention: str = "triton") -> AttentionBackend:
    """The backend object for `name` ("auto" or a known name) on `device`, constructed complete
    (the triton backend with its MLA decode kernel and its GQA prefill kernel, already resolved:
    mla/decode_choice.py, attention/prefill_choice.py)."""
    device = torch.device(device)
    name = attention_backend_name(name, device)
    try:
        cls = _BACKENDS[name]()
    except ImportError as e:
        raise ConfigError(
            f"attention backend {name!r} is not importable here ({e}); {_INSTALL_HINT.get(name, '')}"
        ) from e
    if name == "triton":
        from dlengine.kernels.attention.paged_attention_triton import interpret_mode

        if device.type != "cuda" and not interpret_mode():
            raise ConfigError("the triton attention backend needs a CUDA device (or TRITON_INTERPRET=1 for tests)")
        return cls(mla_decode=mla_decode, prefill_attention=prefill_attention)
    if name == "flashinfer" and device.type != "cuda":
        raise ConfigError(f"the flashinfer attention backend needs a CUDA device, not {device}")
    if mla_decode not in ("auto", "triton"):
        raise ConfigError(f"mla_decode({mla_decode!r}) needs the triton attention backend, not {name!r}")
    if prefill_attention not in ("auto", "triton"):
        raise ConfigError(f"prefill_attention({prefill_attention!r}) needs the triton attention backend, not {name!r}")
    return cls()


# ------------------------------------------------------------------------------------------ kernels


@dataclass(frozen=True)
class Kernels:
    """What an engine runs: the attention backend and the fused ops, chosen once."""

    attention: AttentionBackend
    ops: Ops
    quantization: str = "none"  # "none" | "fp8" | "dequant" (EngineConfig.quantization)

    def describe(self) -> dict[str, str]:
        """The kernel of each op: attention (the backend's name), kv_write, gqa_decode, gqa_prefill,
        mla_decode, mla_prefill, norm_rope, moe, fp8_gemm, moe_fp8."""
        backend = self.attention
        if isinstance(backend, AttentionBackendBase):
            attn = backend.kernel_names()
        else:  # a user's object: all we know is its name
            attn = {op: backend.name for op in ATTENTION_OPS}
        out = {"attention": backend.name, **attn, **self.ops.names}
        if self.quantization != "fp8":  # no FP8 weights at run time: the FP8 kernels never run
            why = "dequantised at load" if self.quantization == "dequant" else "no FP8 weights"
            out["fp8_gemm"] = out["moe_fp8"] = f"unused ({why})"
        return out


def resolve_kernels(attention: str | AttentionBackend = "auto", mla_decode: str = "auto", model_config=None,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    quantization: str = "none", prefill_attention: str = "auto") -> Kernels:
    """The kernels of an engine for the user's `attention` choice (a name, or an object following
    `AttentionBackend`), `mla_decode` and `prefill_attention` kernels, for `model_config` (a
    ModelConfig; None: a model without MLA) on `device` in `dtype` (the KV cache's). Bad choices
    are ConfigErrors naming why."""
    device = torch.device(device)
    if isinstance(attention, str):
        if model_config is not None:  # validates the choice against the model, device and dtype
            mla_decode = resolve_mla_decode(mla_decode, model_config, attention, device, dtype)
        elif mla_decode not in MLA_DECODE_KERNELS:
            raise ConfigError(f"unknown mla_decode kernel {mla_decode!r}; choose one of {list(MLA_DECODE_KERNELS)}")
        prefill_attention = resolve_prefill_attention(prefill_attention, attention_backend_name(attention, device),
                                                      device, dtype)
        backend = resolve_attention_backend(attention, device, mla_decode, prefill_attention)
        use_triton = backend.name != "torch"
    else:
        missing = missing_methods(attention)
        if missing:
            raise ConfigError(f"attention backend object {attention!r} lacks {missing} of the AttentionBackend "
                              "protocol (dlengine.kernels.attention.backend; subclass AttentionBackendBase for "
                              "the optional ones)")
        if mla_decode != "auto":
            raise ConfigError(f"mla_decode({mla_decode!r}) chooses a kernel of the built-in triton backend; "
                              f"a backend object ({attention.name!r}) runs its own")
        if prefill_attention not in ("auto", "triton"):
            raise ConfigError(f"prefill_attention({prefill_attention!r}) chooses a kernel of the built-in triton "
                              f"backend; a backend object ({attention.name!r}) runs its own")
        backend, use_triton = attention, True
    if is_fp8(dtype) and not getattr(backend, "supports_fp8_kv", False):
        hint = ("FP8 KV is not wired to FlashInfer's wrappers" if backend.name == "flashinfer"
                else "it does not declare supports_fp8_kv = True (kernels/attention/backend.py)")
        raise ConfigError(f"cache(dtype='fp8_e4m3'): attention backend {backend.name!r} cannot read an FP8 KV cache "
                          f"({hint}); use attention('triton') or attention('torch'), or a bf16 cache")
    if (is_fp8(dtype) and backend.name == "triton" and device.type == "cuda"
            and torch.cuda.get_device_capability(device) < (8, 9)):
        raise ConfigError("cache(dtype='fp8_e4m3') on the triton backend needs a GPU with FP8 support (sm_89+: "
                          "Ada, Hopper); use attention('torch') or a bf16 cache here")
    return Kernels(backend, select_ops(device, use_triton), quantization)


REFERENCE_KERNELS = Kernels(TorchAttentionBackend(), TORCH_OPS)
_CURRENT = REFERENCE_KERNELS


def current_kernels() -> Kernels:
    """The kernels layers built now take (the torch reference outside any `kernel_scope`)."""
    return _CURRENT


@contextlib.contextmanager
def kernel_scope(kernels: Kernels) -> Iterator[Kernels]:
    """Make `kernels` current while a model is constructed (its layers keep what they call)."""
    global _CURRENT
    prev, _CURRENT = _CURRENT, kernels
    try:
        yield kernels
    finally:
        _CURRENT = prev


__all__ = ["HAS_FLA", "HAS_FP8_GEMM", "HAS_FUSED_MOE", "HAS_GDN_TRITON", "HAS_TRITON_OPS", "Kernels", "Ops", "REFERENCE_KERNELS", "TORCH_OPS",
           "available_attention_backends", "current_kernels", "kernel_scope", "known_attention_backends",
           "resolve_attention_backend", "resolve_kernels", "select_ops"]
