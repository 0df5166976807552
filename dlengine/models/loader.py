"""Load safetensors weights into a model by their HF names.

Loading is a rename table, not code: a checkpoint name either matches a parameter, or matches
one of the model's `stacked_params` (HF q/k/v or gate/up projections stored in one GEMM), and
the parameter's `weight_loader` copies it in. Missing or unexpected tensors are errors that name
the tensor, so a wrong checkpoint never runs with uninitialised weights.
"""

from __future__ import annotations

import glob
import os
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from dlengine.config import ConfigError

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ConfigError(f"no *.safetensors files in {path!r}; use load_format='dummy' to run without weights")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, path: str) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(model.config, "tie_word_embeddings", False)
    stacked = getattr(model, "stacked_params", [])
    loaded: set[str] = set()
    for name, tensor in iter_safetensors(path):
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if tied and name == "lm_head.weight":
            continue  # the embedding matrix is used
        target, shard = name, None
        for param_name, hf_name, shard_id in stacked:
            if f".{hf_name}." in name:
                target, shard = name.replace(f".{hf_name}.", f".{param_name}."), shard_id
                break
        param = params.get(target)
        if param is None:
            raise ConfigError(f"checkpoint tensor {name!r} has no matching parameter in {type(model).__name__}")
        loader = getattr(param, "weight_loader")
        with torch.no_grad():
            tensor = tensor.to(param.dtype)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
        loaded.add(target if shard is None else f"{target}#{shard}")
    _check_complete(model, params, loaded, stacked, tied)


def _check_complete(model, params, loaded, stacked, tied) -> None:
    missing = []
    shards_of: dict[str, list[str]] = {}
    for param_name, _, shard_id in stacked:
        shards_of.setdefault(param_name, []).append(shard_id)
    for name in params:
        if tied and name == "lm_head.weight":
            continue
        stack = next((p for p in shards_of if f".{p}." in name), None)
        if stack is None:
            if name not in loaded:
                missing.append(name)
        else:
            missing += [f"{name}#{s}" for s in shards_of[stack] if f"{name}#{s}" not in loaded]
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
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                gen = generators.get(p.device)
                if gen is None:
                    gen = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
                p.uniform_(-scale, scale, generator=gen)
