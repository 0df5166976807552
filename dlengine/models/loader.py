"""Load safetensors weights into a model by their HF names.

Loading is a rename table, not code: a checkpoint name either matches a parameter, or matches
one of the model's `stacked_params` (HF q/k/v or gate/up projections stored in one GEMM), and
the parameter's `weight_loader` copies it in. Models with experts add `expert_params` rows
(checked first, they are the more specific names): per-expert tensors load into slices of one
stacked parameter, fused 3-D ones into the whole of it. Missing or unexpected tensors are errors
that name the tensor, so a wrong checkpoint never runs with uninitialised weights. A model may
declare tensors it does not use with `skip_checkpoint_tensor(name) -> bool` (DeepSeek-V3's
multi-token-prediction layers).

FP8 KV cache scales (docs/fp8_kv.md) are found by name whatever tool wrote them (`kv_scale_of`)
and copied into the attention layers' `k_scale` / `v_scale` buffers; without them a layer keeps
1.0.

A row is (our name, HF name, shard id[, completeness keys]). The HF name matches a checkpoint
name as whole dot-separated parts, inside it or at its end, and is replaced by ours. A parameter
a row targets is complete when every completeness key its rows list was loaded (default: the
shard id), so a parameter filled by one fused tensor or by many shards is checked the same way.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from dlengine.config import ConfigError

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
logger = logging.getLogger("dlengine")

# FP8 KV cache scales as the quantisation tools write them (one float per layer and tensor):
#   <attn>.k_scale, <attn>.v_scale                      llm-compressor / compressed-tensors kv_cache_scheme
#   <attn>.k_proj.k_scale, <attn>.v_proj.v_scale        NVIDIA ModelOpt
#   <attn>.k_proj.output_scale, <attn>.v_proj.output_scale   AutoFP8, AMD Quark
#   <attn>.kv_scale                                     the older single scale of both
_KV_SCALE_NAMES = re.compile(r"^(?P<attn>.+\.self_attn)\.(?:(?P<which>k|v|kv)_scale|(?P<proj>k|v)_proj\.(?:[kv]_scale|output_scale))$")


def iter_safetensors(path: str, keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in `path`/*.safetensors; tensors `keep` rejects are never read."""
    for name, read in iter_safetensors_lazy(path, keep):
        yield name, read()


def iter_safetensors_lazy(path: str, keep: Callable[[str], bool] | None = None
                          ) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, read) pairs: a tensor is only read from disk when `read()` is called; names `keep`
    rejects are not listed."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ConfigError(f"no *.safetensors files in {path!r}; use load_format='dummy' to run without weights")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if keep is None or keep(name):
                    yield name, functools.partial(f.get_tensor, name)


def _rename_table(model: nn.Module) -> list[tuple[str, str, object, tuple]]:
    rows = []
    for row in list(getattr(model, "expert_params", [])) + list(getattr(model, "stacked_params", [])):
        param_name, hf_name, shard_id, *keys = row
        rows.append((param_name, hf_name, shard_id, tuple(keys[0]) if keys else (shard_id,)))
    return rows


def _matches(name: str, fragment: str) -> bool:
    return f".{fragment}." in name or name.endswith(f".{fragment}")


def _rename(name: str, hf_name: str, param_name: str) -> str:
    if f".{hf_name}." in name:
        return name.replace(f".{hf_name}.", f".{param_name}.")
    return name[: -len(hf_name)] + param_name


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def kv_scale_of(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(attention module prefix, ("k",) / ("v",) / ("k", "v")) when checkpoint tensor `name` is an
    FP8 KV cache scale, else None."""
    m = _KV_SCALE_NAMES.match(name)
    if m is None:
        return None
    which = m.group("which") or m.group("proj")
    return m.group("attn"), ("k", "v") if which == "kv" else (which,)


def _load_kv_scale(buffers: dict[str, torch.Tensor], name: str, attn: str, which: tuple[str, ...],
                   tensor: torch.Tensor) -> None:
    """Copy a checkpoint KV scale into the layer's buffer(s): `<attn>.k_scale` (MLA, or a model whose
    attention module holds the cache) or `<attn>.attn.k_scale` (a PagedAttention inside it). A
    per-head scale becomes its maximum (one scale per tensor: no head saturates earlier than its
    own scale allowed). A model with no such buffer (e.g. MLA has one latent scale, no v) skips it."""
    value = tensor.float().abs().max() if tensor.numel() else None
    for w in which:
        buf = buffers.get(f"{attn}.{w}_scale", buffers.get(f"{attn}.attn.{w}_scale"))
        if buf is None or value is None:
            logger.debug("checkpoint KV scale %s has no use in this model; skipped", name)
            continue
        if not float(value) > 0:
            raise ConfigError(f"checkpoint KV cache scale {name!r} is {float(value)}; scales must be positive")
        with torch.no_grad():
            buf.fill_(value.to(buf.device))


def kv_scale_source(model: nn.Module) -> str:
    """What the FP8 KV scales of a loaded model are, for the startup report."""
    scales = [b for n, b in model.named_buffers() if n.endswith(("k_scale", "v_scale"))]
    if not scales:
        return "no KV scales in this model"
    values = torch.stack([s.float().cpu() for s in scales])
    if bool((values == 1.0).all()):
        return "1.0 per layer and tensor (the default: the checkpoint has no KV scales)"
    return (f"from the checkpoint ({len(scales)} per-tensor scales, {float(values.min()):.4g} .. "
            f"{float(values.max()):.4g})")


def load_weights(model: nn.Module, path: str, num_layers: int | None = None) -> None:
    """Copy `path`'s tensors into `model`. `num_layers`: the model was built with only the first
    `num_layers` decoder layers of the checkpoint (hf_overrides(num_hidden_layers=...)), so the
    tensors of later layers are skipped unread."""
    if num_layers is not None:
        def keep(name: str) -> bool:
            m = _LAYER_INDEX.search(name)
            return m is None or int(m.group(1)) < num_layers
    else:
        keep = None
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    tied = getattr(model.config, "tie_word_embeddings", False)
    table = _rename_table(model)
    loaded: set[str] = set()
    # a model may declare checkpoint tensors it does not use (e.g. DeepSeek-V3's MTP layers)
    skip = getattr(model, "skip_checkpoint_tensor", None)
    for name, read in iter_safetensors_lazy(path, keep):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if skip is not None and skip(name):
            continue
        if tied and name == "lm_head.weight":
            continue  # the embedding matrix is used
        kv_scale = kv_scale_of(name)
        if kv_scale is not None:
            _load_kv_scale(buffers, name, *kv_scale, read())
            continue
        target, shard, keys = name, None, None
        for param_name, hf_name, shard_id, row_keys in table:
            if _matches(name, hf_name):
                target, shard, keys = _rename(name, hf_name, param_name), shard_id, row_keys
                break
        param = params.get(target)
        if param is None:
            raise ConfigError(f"checkpoint tensor {name!r} has no matching parameter in {type(model).__name__}")
        loader = getattr(param, "weight_loader")
        # a sharded parameter may not need this tensor at all (an expert another EP rank holds):
        # it counts as loaded (the checkpoint has it) but is never read from disk
        wants = getattr(param, "wants_shard", None)
        if wants is None or wants(shard):
            tensor = read()
            if param.dtype == torch.float8_e4m3fn and tensor.dtype != param.dtype:
                # casting would drop the block scales' meaning: a bf16 tensor here means the
                # checkpoint does not match its quantization_config
                raise ConfigError(f"checkpoint tensor {name!r} is {tensor.dtype}, but its layer holds FP8 weights "
                                  "(quantization_config says the checkpoint is FP8)")
            with torch.no_grad():
                tensor = tensor.to(param.dtype)
                if shard is None:
                    loader(param, tensor)
                else:
                    loader(param, tensor, shard)
        if keys is None:
            loaded.add(target)
        else:
            loaded.update(f"{target}#{k}" for k in keys)
    _check_complete(model, params, loaded, table, tied)


def _check_complete(model, params, loaded, table, tied) -> None:
    missing = []
    keys_of: dict[str, dict] = {}  # ordered sets
    for param_name, _, _, keys in table:
        keys_of.setdefault(param_name, {}).update(dict.fromkeys(keys))
    for name in params:
        if tied and name == "lm_head.weight":
            continue
        stack = next((p for p in keys_of if _matches(name, p)), None)
        if stack is None:
            if name not in loaded:
                missing.append(name)
        else:
            missing += [f"{name}#{k}" for k in keys_of[stack] if f"{name}#{k}" not in loaded]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ConfigError(f"checkpoint is missing {len(missing)} tensors for {type(model).__name__}: {shown}")


def init_dummy_weights(model: nn.Module, seed: int = 0, scale: float = 1e-3) -> None:
    """Random weights at the real size (for benchmarks with no checkpoint): uniform(-scale, scale)
    for matrices, 1 for norm weights, so activations stay finite at any depth."""
    generators: dict[torch.device, torch.Generator] = {}
    seen = set()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not p.is_floating_point():
                continue  # integer tables (DeepSeek-V4's tid2eid) keep the valid default they were built with
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                gen = generators.get(p.device)
                if gen is None:
                    gen = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                p.uniform_(-scale, scale, generator=gen)


def run_post_load_hooks(model: nn.Module) -> None:
    """Call `post_load_weights()` on every module that has one, once the weights are final (loaded
    or dummy): derived tensors (e.g. MLA's absorbed projections) are made here, not per step."""
    for module in model.modules():
        hook = getattr(module, "post_load_weights", None)
        if callable(hook):
            hook()
