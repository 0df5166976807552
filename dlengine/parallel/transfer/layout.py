"""Where a cache's bytes live inside a transfer region, and the byte segments that copy a sequence.

A region holds every paged group of a KV cache (one per cache spec: full-attention K/V, MLA
latent, per-token extras, ...) and, if the model has any, the state groups' sequence slots.

- Plane-major (the cache buffer itself, see cache/kv_cache.py): group g's planes start at byte
  `group_offsets[g]`, each plane [num_blocks][block_size][token_bytes of g]; a plane is one
  (layer, part) of the group (parts: 2 for K and V, 1 for a latent or per-token extra).
- Block-major (staging buffers): [num_blocks][block_bytes], a block holding group 0's planes'
  runs, then group 1's, ...; a request's blocks staged side by side are ONE contiguous range.
- State groups: slot s of state group g at `state_offsets[g] + s * slot_bytes[g]` in both kinds
  of region (the cache stores state slot-major, so a sequence's state is one range per group).

The first paged group's description sits in the top-level fields (kind ... token_bytes), which
is the whole layout for every model today; further paged groups are in `extra_groups`.

The dtype names what the bytes are (e.g. "bfloat16", or "float8_e4m3fn" for an FP8 cache, whose
scales are per layer and come from the same checkpoint on both sides, docs/fp8_kv.md); two
engines exchange KV only when their dtypes agree (`check_compatible`).

Tensor parallelism: a full-attention group records which kv heads it holds, [head_start,
head_start + heads) of num_kv_heads. `segments_from` copies between equal head ranges, and from a
remote range inside the local one (a tp=1 engine pulling each tp=2 rank's half of the heads):
`check_head_gather` says whether that works.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Sequence

from dlengine.parallel.transfer.errors import HandshakeError, TransferError

Segment = tuple[int, int, int]  # (remote byte offset, local byte offset, length)

# kinds whose token entry is [heads, head_dim] per part and that a tensor-parallel rank splits by head
HEAD_SPLIT_KINDS = ("full_attention", "sliding_window", "gqa")


@dataclass(frozen=True)
class GroupLayout:
    """One paged group: `parts` planes per layer, `token_bytes` per token of a plane."""

    kind: str
    num_layers: int
    parts: int
    heads: int
    head_dim: int
    dtype: str
    token_bytes: int
    num_kv_heads: int = 0  # heads of the whole model (0: the same as heads)
    head_start: int = 0

    @property
    def num_planes(self) -> int:
        return self.num_layers * self.parts

    @property
    def kv_head_range(self) -> tuple[int, int]:
        return self.head_start, self.head_start + self.heads

    @property
    def total_heads(self) -> int:
        return self.num_kv_heads or self.heads

    @property
    def head_split(self) -> bool:
        return self.kind in HEAD_SPLIT_KINDS and self.heads > 0 and self.token_bytes % self.heads == 0


@dataclass(frozen=True)
class StateGroupLayout:
    """One state group's slot. Split by heads under tensor parallelism (`heads` > 0, see
    cache/specs.py StateSpec): the slot holds heads [head_start, head_start + heads) of
    `total_heads`; each layer (`layer_bytes` apart) holds `runs` of (offset in the layer, bytes
    per head), one per tensor part, whose heads sit back to back. heads == 0: every rank holds
    the whole slot."""

    name: str
    slot_bytes: int
    num_layers: int = 0
    layer_bytes: int = 0
    heads: int = 0
    total_heads: int = 0
    head_start: int = 0
    runs: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:  # JSON gives lists back
        object.__setattr__(self, "runs", tuple(tuple(int(x) for x in r) for r in self.runs))

    @property
    def head_range(self) -> tuple[int, int]:
        return self.head_start, self.head_start + self.heads

    def same_state(self, other: "StateGroupLayout") -> bool:
        """Whether two slots hold the same model's state, maybe split differently: the same group,
        layers and heads, with equal bytes per head in each part (or, unsplit, equal slots)."""
        if (self.name, self.heads > 0, self.num_layers) != (other.name, other.heads > 0, other.num_layers):
            return False
        if not self.heads:
            return self.slot_bytes == other.slot_bytes
        return (self.total_heads == other.total_heads
                and [b for _, b in self.runs] == [b for _, b in other.runs])


@dataclass(frozen=True)
class KVLayout:
    """Layout of a transfer region (see the module docstring). `kind` ... `token_bytes`,
    `num_kv_heads`, `head_start` describe the first paged group; `extra_groups` the others;
    `group_offsets` where each paged group starts in a plane-major region (empty: packed from 0);
    `state_groups` / `state_offsets` / `num_state_slots` the sequence slots. Everything except
    `block_size`, `num_blocks`, the ordering, the offsets and the slot count must match between
    peers (`check_compatible`)."""

    kind: str
    num_layers: int
    parts: int
    heads: int
    head_dim: int
    dtype: str
    token_bytes: int  # bytes of one token of one layer of one part (first group)
    block_size: int
    num_blocks: int  # blocks in the region (the cache itself, or a staging buffer)
    block_major: bool = False
    num_kv_heads: int = 0
    head_start: int = 0
    extra_groups: tuple[GroupLayout, ...] = ()
    group_offsets: tuple[int, ...] = ()
    state_groups: tuple[StateGroupLayout, ...] = ()
    state_offsets: tuple[int, ...] = ()
    num_state_slots: int = 0

    # ------------------------------------------------------------------ groups and planes
    @property
    def groups(self) -> tuple[GroupLayout, ...]:
        first = GroupLayout(self.kind, self.num_layers, self.parts, self.heads, self.head_dim, self.dtype,
                            self.token_bytes, self.num_kv_heads, self.head_start)
        return (first, *self.extra_groups)

    @property
    def num_planes(self) -> int:
        return sum(g.num_planes for g in self.groups)

    @cached_property
    def block_bytes(self) -> int:
        """Bytes of one block across every paged group (a block-major row)."""
        return sum(g.num_planes * self.block_size * g.token_bytes for g in self.groups)

    def _group_starts(self) -> list[int]:
        if self.group_offsets:
            return list(self.group_offsets)
        starts, end = [], 0
        for g in self.groups:
            starts.append(end)
            end += g.num_planes * self.num_blocks * self.block_size * g.token_bytes
        return starts

    @cached_property
    def _planes(self) -> list[tuple[GroupLayout, int, int]]:
        """(group, plane index within the group, base) per plane: base is the plane's byte start
        (plane-major) or its run's start inside a block row (block-major). Computed once: every
        offset() of a segment plan looks it up."""
        out, in_row = [], 0
        for g, start in zip(self.groups, self._group_starts()):
            run = self.block_size * g.token_bytes
            for p in range(g.num_planes):
                out.append((g, p, in_row if self.block_major else start + p * self.num_blocks * run))
                in_row += run
        return out

    def offset(self, plane: int, block: int, token: int) -> int:
        """Byte offset of `token` (inside `block`) of plane `plane` (planes numbered across
        groups: group 0's layer * parts + part first)."""
        g, _, base = self._planes[plane]
        if self.block_major:
            return block * self.block_bytes + base + token * g.token_bytes
        return base + block * self.block_size * g.token_bytes + token * g.token_bytes

    @property
    def plane_bytes(self) -> int:
        """Bytes of one plane of the first group (all of them, for a single-group layout)."""
        return self.num_blocks * self.block_size * self.token_bytes

    @property
    def state_bytes(self) -> int:
        return self.num_state_slots * sum(s.slot_bytes for s in self.state_groups)

    @property
    def nbytes(self) -> int:
        """Bytes of the region's paged part (the state slots follow it: state_offsets)."""
        if self.block_major:
            return self.num_blocks * self.block_bytes
        starts = self._group_starts()
        g = self.groups[-1]
        return starts[-1] + g.num_planes * self.num_blocks * self.block_size * g.token_bytes

    # ------------------------------------------------------------------ handshake
    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "KVLayout":
        try:
            kw = {k: d[k] for k in KVLayout.__dataclass_fields__ if k in d}
            kw["extra_groups"] = tuple(GroupLayout(**g) for g in kw.get("extra_groups", ()))
            kw["state_groups"] = tuple(StateGroupLayout(**g) for g in kw.get("state_groups", ()))
            for name in ("group_offsets", "state_offsets"):
                kw[name] = tuple(int(x) for x in kw.get(name, ()))
            return KVLayout(**kw)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise HandshakeError(f"malformed KV layout {d!r}: {e}") from None

    _GROUP_FIELDS = ("kind", "num_layers", "parts", "heads", "head_dim", "dtype", "token_bytes",
                     "num_kv_heads", "head_start")

    def check_compatible(self, remote: "KVLayout") -> None:
        """Raise HandshakeError naming the first difference that makes the bytes meaningless
        (copying needs the same groups, head ranges included, and the same state groups)."""
        self._check_groups(remote, heads_may_differ=False)
        self.check_state_compatible(remote)

    def check_state_compatible(self, remote: "KVLayout") -> None:
        """Raise HandshakeError unless `remote`'s state groups hold the same model's state, maybe
        split over another tensor-parallel size (which heads each side holds is planned per pull:
        state_shards.py)."""
        mine, theirs = self.state_groups, remote.state_groups
        if len(mine) != len(theirs) or not all(a.same_state(b) for a, b in zip(mine, theirs)):
            raise HandshakeError(f"KV cache layouts differ in their state groups: this engine has "
                                 f"{self.state_groups}, the peer has {remote.state_groups}")

    def check_head_gather(self, remote: "KVLayout") -> None:
        """Raise HandshakeError unless `remote` holds a sub-range of this layout's kv heads of the
        same model (every other group identical): what a tp=1 engine checks against each rank
        of a tp=2 peer before gathering their halves with `segments_from`."""
        self._check_groups(remote, heads_may_differ=True)

    def _check_groups(self, remote: "KVLayout", heads_may_differ: bool) -> None:
        mine, theirs = self.groups, remote.groups
        if len(mine) != len(theirs):
            raise HandshakeError(f"KV cache layouts differ in paged groups: this engine has {len(mine)}, "
                                 f"the peer has {len(theirs)}")
        for i, (a, b) in enumerate(zip(mine, theirs)):
            skip = ("heads", "head_start", "token_bytes") if heads_may_differ and a.head_split else ()
            for name in self._GROUP_FIELDS:
                x, y = getattr(a, name), getattr(b, name)
                if name == "num_kv_heads":
                    x, y = a.total_heads, b.total_heads
                if name not in skip and x != y:
                    where = "" if i == 0 else f" (paged group {i})"
                    if name == "dtype":  # e.g. an FP8 cache and a bf16 one: the bytes mean different numbers
                        raise HandshakeError(
                            f"KV cache layouts differ in dtype{where}: this engine stores {x}, the peer {y}; both "
                            "sides need the same cache(dtype=...) (e.g. fp8_e4m3 on both, or the model dtype on "
                            "both)")
                    raise HandshakeError(
                        f"KV cache layouts differ in {name}{where}: this engine has {x!r}, the peer has {y!r}; "
                        "both sides need the same model, cache dtype and tensor-parallel split")
            if skip:
                (lo, hi), (rlo, rhi) = a.kv_head_range, b.kv_head_range
                if not lo <= rlo < rhi <= hi or a.token_bytes // a.heads != b.token_bytes // b.heads:
                    raise HandshakeError(f"the peer's kv heads [{rlo}, {rhi}) are not inside this engine's "
                                         f"[{lo}, {hi})")

    # ------------------------------------------------------------------ copy plans
    def segments_from(self, remote: "KVLayout", remote_blocks: Sequence[int], local_blocks: Sequence[int],
                      num_tokens: int, replicated: bool = True) -> list[Segment]:
        """Byte segments copying the first `num_tokens` tokens of a sequence stored in
        `remote_blocks` (remote layout) into `local_blocks` (this layout), every group, layer and
        part. Runs are cut wherever either side crosses a block boundary and merged when both
        sides stay contiguous: consecutive blocks of two block-major staging buffers with the same
        block size give ONE segment for the whole request; two caches give one per plane at best.

        Where the remote holds fewer kv heads than this layout (check_head_gather), each token's
        heads land in their slice of the local token: one segment per token and plane. Groups that
        every rank holds whole (MLA latent, per-token extras) are copied only when `replicated`
        (pass it for one of the ranks a layout is gathered from)."""
        if num_tokens > len(remote_blocks) * remote.block_size:
            raise TransferError(f"{num_tokens} tokens do not fit in {len(remote_blocks)} remote blocks")
        if num_tokens > len(local_blocks) * self.block_size:
            raise TransferError(f"{num_tokens} tokens do not fit in {len(local_blocks)} local blocks")
        if remote.block_size == self.block_size:
            # move whole blocks: the tail of a partial last block is junk that the receiver never
            # reads (it writes those positions before attending to them), and whole blocks keep a
            # block-major request one contiguous range instead of one piece per plane
            num_tokens = -(-num_tokens // self.block_size) * self.block_size
        runs = []  # (remote block, offset in it, local block, offset in it, tokens)
        t = 0
        while t < num_tokens:
            rb, ro = divmod(t, remote.block_size)
            lb, lo = divmod(t, self.block_size)
            n = min(remote.block_size - ro, self.block_size - lo, num_tokens - t)
            runs.append((remote_blocks[rb], ro, local_blocks[lb], lo, n))
            t += n
        pieces = []
        plane = 0
        for mine, theirs in zip(self.groups, remote.groups):
            whole = mine.kv_head_range == theirs.kv_head_range
            if not whole and not mine.head_split:
                raise HandshakeError(f"paged group {mine.kind} differs between the two layouts")
            copy = whole and (replicated or mine.head_split)
            for _ in range(mine.num_planes):
                if copy:
                    pieces += [(remote.offset(plane, rb, ro), self.offset(plane, lb, lo), n * mine.token_bytes)
                               for rb, ro, lb, lo, n in runs]
                elif not whole:
                    head_bytes = mine.token_bytes // mine.heads
                    skip = (theirs.head_start - mine.head_start) * head_bytes
                    pieces += [(remote.offset(plane, rb, ro + k), self.offset(plane, lb, lo + k) + skip,
                                theirs.token_bytes) for rb, ro, lb, lo, n in runs for k in range(n)]
                plane += 1
        return _coalesce(pieces)

    def state_segments_from(self, remote: "KVLayout", remote_slot: int, local_slot: int) -> list[Segment]:
        """Byte segments copying one sequence's state (every state group) from `remote_slot` of
        the remote region into `local_slot` of this one."""
        if tuple(self.state_groups) != tuple(remote.state_groups):
            raise HandshakeError("the two layouts have different state groups")
        for slot, layout, side in ((remote_slot, remote, "remote"), (local_slot, self, "local")):
            if not 0 <= slot < layout.num_state_slots:
                raise TransferError(f"{side} state slot {slot} is outside [0, {layout.num_state_slots})")
        return [(ro + remote_slot * g.slot_bytes, lo + local_slot * g.slot_bytes, g.slot_bytes)
                for g, ro, lo in zip(self.state_groups, remote.state_offsets, self.state_offsets)]


def _coalesce(pieces: list[Segment]) -> list[Segment]:
    segments: list[list[int]] = []
    for r, l, n in sorted(pieces):
        if segments and segments[-1][0] + segments[-1][2] == r and segments[-1][1] + segments[-1][2] == l:
            segments[-1][2] += n
        else:
            segments.append([r, l, n])
    return [tuple(x) for x in segments]


def group_layout(spec) -> GroupLayout:
    """The transfer description of one paged cache spec (cache/specs.py)."""
    heads = getattr(spec, "num_kv_heads", 1)
    head_dim = getattr(spec, "head_dim", 0) or getattr(spec, "latent_dim", 0) or spec.token_bytes
    return GroupLayout(kind=spec.kind if spec.kind != "per_token" else f"per_token:{spec.name}",
                       num_layers=spec.num_layers, parts=spec.parts, heads=heads, head_dim=head_dim,
                       dtype=str(getattr(spec, "dtype", "uint8")).replace("torch.", ""),
                       token_bytes=spec.token_bytes, num_kv_heads=getattr(spec, "total_kv_heads", 0),
                       head_start=getattr(spec, "head_start", 0))


def state_group_layout(spec) -> StateGroupLayout:
    """The transfer description of one state cache spec (cache/specs.py StateSpec)."""
    heads = getattr(spec, "heads", 0)
    return StateGroupLayout(spec.name, spec.slot_bytes, num_layers=spec.num_layers, layer_bytes=spec.layer_bytes,
                            heads=heads, total_heads=getattr(spec, "total_heads", 0) if heads else 0,
                            head_start=getattr(spec, "head_start", 0) if heads else 0,
                            runs=spec.head_runs() if heads else ())


def layout_of_groups(groups: Sequence[GroupLayout], block_size: int, num_blocks: int, block_major: bool = False,
                     group_offsets: Sequence[int] = (), state_groups: Sequence[StateGroupLayout] = (),
                     state_offsets: Sequence[int] = (), num_state_slots: int = 0) -> KVLayout:
    first, *rest = groups
    return KVLayout(first.kind, first.num_layers, first.parts, first.heads, first.head_dim, first.dtype,
                    first.token_bytes, block_size, num_blocks, block_major, first.num_kv_heads, first.head_start,
                    tuple(rest), tuple(group_offsets), tuple(state_groups), tuple(state_offsets), num_state_slots)


__all__ = ["GroupLayout", "KVLayout", "Segment", "StateGroupLayout", "group_layout", "layout_of_groups",
           "state_group_layout"]
