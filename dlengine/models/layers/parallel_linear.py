"""Tensor-parallel linear layers, vocab-parallel embedding and LM head (Megatron-style).

Each layer reads the rank's TP group from `dlengine.parallel.state.get_parallel_state()` when it
is constructed and allocates only its shard; its parameters' `weight_loader` cuts that shard out
of the full checkpoint tensor, so a rank never holds more than one full tensor at a time. With
tp=1 and no TP group every layer is exactly the single-process one (same parameter shapes, same
kernels, no collective), so single-process numerics do not change. Collectives run whenever the
state has a TP group, even of one rank (scripts/gpu_check_parallel.py checks a 1-GPU NCCL world).

* `ColumnParallelLinear`: output rows split; the output stays sharded (feeds a row-parallel layer
  or per-head attention). Several projections side by side (q/k/v, gate/up) are "shards", each
  split on its own, so the local GEMM computes [q_local | k_local | v_local].
* `QKVParallelLinear`: q heads split evenly; kv heads split when num_kv_heads >= tp, else each
  kv head is replicated on tp / num_kv_heads ranks (every rank keeps the one kv head its q heads
  read).
* `RowParallelLinear`: input columns split; partial outputs are summed with one all-reduce, and
  the bias is added once, after it.
* `VocabParallelEmbedding` / `ParallelLMHead`: vocab rows split (padded to a multiple of tp);
  embedding rows outside the rank's range read zeros and one all-reduce completes them; logits
  are all-gathered, and only for the rows that are sampled (the runner picks them before).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dlengine.config import ConfigError
from dlengine.parallel.state import get_parallel_state


def _tp():
    s = get_parallel_state()
    return s.tp_rank, s.tp_size, s.tp_group


def divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ConfigError(f"{what}={n} is not divisible by tensor-parallel size {d}")
    return n // d


@dataclass(frozen=True)
class Shard:
    """One projection inside a column-parallel GEMM: rows [start, start + size) of the
    checkpoint tensor (`full` rows) land at rows [offset, offset + size) of the local weight."""

    name: str | None
    full: int
    start: int
    size: int
    offset: int = 0


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int | None = None, bias: bool = False,
                 shards: Sequence[Shard] | None = None) -> None:
        super().__init__()
        rank, size, self.tp_group = _tp()
        if shards is None:
            local = divide(out_features, size, "output features")
            shards = [Shard(None, out_features, rank * local, local)]
        off, placed = 0, []
        for s in shards:
            placed.append(Shard(s.name, s.full, s.start, s.size, off))
            off += s.size
        self.shards = {s.name: s for s in placed}
        self.in_features, self.out_features = in_features, off  # local
        self.weight = nn.Parameter(torch.empty(off, in_features), requires_grad=False)
        self.weight.weight_loader = self._load
        if bias:
            self.bias = nn.Parameter(torch.empty(off), requires_grad=False)
            self.bias.weight_loader = self._load
        else:
            self.register_parameter("bias", None)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        s = self.shards.get(shard_id)
        if s is None:
            raise ValueError(f"unknown shard {shard_id!r}; this layer has {list(self.shards)}")
        if loaded.shape[0] != s.full or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(f"checkpoint tensor {shard_id or ''} has shape {tuple(loaded.shape)}, "
                             f"expected {(s.full, *param.shape[1:])}")
        param.data[s.offset : s.offset + s.size].copy_(loaded.narrow(0, s.start, s.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several projections in one GEMM (gate/up), each split over the TP ranks."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], shard_names: Sequence[str],
                 bias: bool = False) -> None:
        rank, size, _ = _tp()
        shards = []
        for name, full in zip(shard_names, output_sizes):
            local = divide(full, size, f"{name} projection size")
            shards.append(Shard(name, full, rank * local, local))
        super().__init__(in_features, bias=bias, shards=shards)


def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    """KV heads a rank keeps: an even split, or 1 (replicated) when there are fewer than tp."""
    if num_kv_heads >= tp:
        return divide(num_kv_heads, tp, "num_key_value_heads")
    if tp % num_kv_heads:
        raise ConfigError(f"tensor-parallel size {tp} must be a multiple of num_key_value_heads={num_kv_heads} "
                          "(kv heads are replicated when there are fewer than tp)")
    return 1


class QKVParallelLinear(ColumnParallelLinear):
    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        rank, size, _ = _tp()
        self.num_heads = divide(num_heads, size, "num_attention_heads")
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, size)
        # the kv head of this rank's q heads: kv head j serves q heads [j*g, (j+1)*g), g = H / Hkv
        kv_start = rank * self.num_kv_heads if num_kv_heads >= size else rank * num_kv_heads // size
        d = head_dim
        shards = [Shard("q", num_heads * d, rank * self.num_heads * d, self.num_heads * d),
                  Shard("k", num_kv_heads * d, kv_start * d, self.num_kv_heads * d),
                  Shard("v", num_kv_heads * d, kv_start * d, self.num_kv_heads * d)]
        super().__init__(hidden_size, bias=bias, shards=shards)


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, reduce: bool = True) -> None:
        super().__init__()
        self.tp_rank, self.tp_size, self.tp_group = _tp()
        self.reduce = reduce
        self.in_features = divide(in_features, self.tp_size, "input features")  # local
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features), requires_grad=False)
        self.weight.weight_loader = self._load
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self._load
        else:
            self.register_parameter("bias", None)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 2:
            full = (param.shape[0], self.in_features * self.tp_size)
            if tuple(loaded.shape) != full:
                raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {full}")
            loaded = loaded.narrow(1, self.tp_rank * self.in_features, self.in_features)
        elif loaded.shape != param.shape:
            raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        if self.reduce:
            dist.all_reduce(y, group=self.tp_group)
        # the bias is added once, to the sum (added on every rank before the sum it would count tp times)
        return y + self.bias if self.bias is not None else y


def _load_vocab_rows(param: nn.Parameter, loaded: torch.Tensor, vocab: int, start: int, end: int) -> None:
    if loaded.shape != (vocab, param.shape[1]):
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {(vocab, param.shape[1])}")
    param.data.zero_()  # padding rows (last rank): zero embeddings and logits, trimmed away
    param.data[: end - start].copy_(loaded[start:end])


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size, self.tp_group = _tp()
        self.num_embeddings = num_embeddings
        self.rows = -(-num_embeddings // self.tp_size)  # per rank, the last rank padded
        self.start = self.tp_rank * self.rows
        self.end = min(num_embeddings, self.start + self.rows)
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _load_vocab_rows(param, loaded, self.num_embeddings, self.start, self.end)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return F.embedding(input_ids, self.weight)
        inside = (input_ids >= self.start) & (input_ids < self.end)
        out = F.embedding(torch.where(inside, input_ids - self.start, 0), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)  # exact: the other ranks add zeros
        dist.all_reduce(out, group=self.tp_group)
        return out


class ParallelLMHead(nn.Module):
    """Output projection to the vocabulary; shares the (vocab-parallel) embedding when tied."""

    def __init__(self, hidden_size: int, vocab_size: int, tied_to: VocabParallelEmbedding | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size, self.tp_group = _tp()
        self.vocab_size = vocab_size
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            rows = -(-vocab_size // self.tp_size)
            start = self.tp_rank * rows
            end = min(vocab_size, start + rows)
            self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)
            self.weight.weight_loader = lambda p, t, shard_id=None: _load_vocab_rows(p, t, vocab_size, start, end)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp_group is None:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)[..., : self.vocab_size]
