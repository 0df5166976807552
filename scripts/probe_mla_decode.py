#!/usr/bin/env python3
"""Where the Gluon MLA decode kernel's time goes (kernels/mla/mla_decode_gluon.py; DeepSeek-V3 dims, page 64,
bf16; H100, about a minute; numbers and what they showed in docs/mla.md):

1. Timelines: one launch of the kernel's diagnostics build (`mla_decode_gluon(..., times=...)`),
   which stamps the global timer at points of every program's run -- start, Q in shared memory,
   first tile ready, score loop done, both epilogues done, loader done -- summarised as median
   [min..max] over the programs.
2. A fit: the split kernel alone (merge launch left out) at batch 32 (2 splits) and 64 (1 split)
   over contexts 128..32k, timed from CUDA graphs of 10 launches; per-tile time and fixed cost by
   least squares; then the same with every block-table entry pointing at one page (the tiles come
   from L2: what the loop costs without HBM).
3. --ab FLAG: a gluon_mla module flag (e.g. Q_CP_ASYNC) on vs off, the whole
   call in CUDA graphs alternated 40 times (the H100's clocks drift by several percent under
   sustained load, so variants timed one after the other differ by more than they do), then the
   timelines of both (--wide: more shapes, no timelines); --ab NAME=V1,V2,... compares the values
   listed of any module setting (e.g. MIN_KEYS_PER_SPLIT=512,128; --small: small batches).

    python scripts/probe_mla_decode.py                  # 1 + 2
    python scripts/probe_mla_decode.py --timeline       # 1 only
    python scripts/probe_mla_decode.py --ab Q_CP_ASYNC [--wide]
    python scripts/probe_mla_decode.py --ab MIN_KEYS_PER_SPLIT=512,256,128 --small
"""

from __future__ import annotations

import argparse

import gpu_common as gc
import torch
from bench_mla_decode import C, DEV, R, SCALE, make

from dlengine.kernels.mla import mla_decode_gluon as gluon_mla

BW = [3000.0]  # the copy bandwidth measured at the start (GB/s)


def time_split_kernel(bs: int, ctx: int, splits: int, one_page: bool, merge: bool = False) -> float:
    """Seconds a launch (median of 3 rounds of a 10-launch CUDA graph); merge=False leaves the split
    merge out; one_page: every block-table entry names one page (all tiles from L2)."""
    cache, bt, q_lat, q_pe, tok, ln = make([ctx] * bs, 64, poison=False)
    if one_page:
        bt.fill_(int(bt[0, 0]))
    out = torch.empty_like(q_lat)
    real_merge = gluon_mla._launch_merge
    if not merge:
        gluon_mla._launch_merge = lambda *a, **k: None
    try:
        def call():
            gluon_mla.mla_decode_gluon(q_lat, q_pe, cache, bt, tok, ln, out, SCALE, max_seq_len=ctx,
                                       num_splits=splits)
        g = gc.capture_graph(call, launches=10)
    finally:
        gluon_mla._launch_merge = real_merge
    ts = sorted(gc.bench_s(g.replay, warmup=5, rep=30) / 10 for _ in range(3))
    return ts[1]


def timeline(bs: int, ctx: int, splits: int) -> None:
    """One launch of the diagnostic build (TIMES): per program the global timer at kernel start (0),
    score group Q loaded (1), first tile's latent-low part ready (2), score loop done (3), score
    epilogue done (4), value epilogue done (5), loader done issuing (6), value loop done (7)."""
    cache, bt, q_lat, q_pe, tok, ln = make([ctx] * bs, 64, poison=False)
    out = torch.empty_like(q_lat)
    progs = bs * 2 * splits
    times = torch.zeros(progs, 8, dtype=torch.int64, device=DEV)
    for _ in range(3):  # warm (compile, clocks); the last run's stamps are read
        gluon_mla.mla_decode_gluon(q_lat, q_pe, cache, bt, tok, ln, out, SCALE, max_seq_len=ctx,
                                   num_splits=splits, times=times)
    torch.cuda.synchronize()
    t = (times - times[:, 0].min()).double().cpu() / 1e3  # us from the first program's start
    end = torch.maximum(t[:, 4], t[:, 5])
    q = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)

    def show(name: str, v: torch.Tensor) -> str:
        lo, mid, hi = torch.quantile(v, q).tolist()
        return f"{name} {mid:6.1f} [{lo:.1f}..{hi:.1f}]"

    tiles = ctx / 64 / splits
    print(f"  timeline bs {bs} x {ctx} splits {splits} ({progs} programs, {tiles:.0f} tiles each; us, median "
          f"[min..max]):", flush=True)
    print("    " + " | ".join([show("start", t[:, 0]), show("Q loaded", t[:, 1] - t[:, 0]),
                               show("first tile", t[:, 2] - t[:, 0]), show("loop", t[:, 3] - t[:, 2]),
                               show("score epi", t[:, 4] - t[:, 3]), show("value epi", t[:, 5] - t[:, 7])]),
          flush=True)
    print("    " + " | ".join([show("per tile", (t[:, 3] - t[:, 2]) / tiles), show("end", end),
                               show("loader done", t[:, 6] - t[:, 0])]) + f" | span {end.max().item():.1f}",
          flush=True)


def ab(flag: str, values: list, configs: list[tuple[int, int]]) -> None:
    """The whole call (split kernel + merge) with module setting `flag` of gluon_mla at each of
    `values`: a CUDA graph of 10 calls each, replayed in turn 40 times (the order rotating) after a
    warm-up, each replay timed by CUDA events; medians. The H100's clocks drift by several percent
    under sustained load, so variants timed one after the other differ by more than they do."""
    default = getattr(gluon_mla, flag)
    for bs, ctx in configs:
        cache, bt, q_lat, q_pe, tok, ln = make([ctx] * bs, 64, poison=False)
        out = torch.empty_like(q_lat)
        graphs = []
        for value in values:
            setattr(gluon_mla, flag, value)
            graphs.append(gc.capture_graph(lambda: gluon_mla.mla_decode_gluon(
                q_lat, q_pe, cache, bt, tok, ln, out, SCALE, max_seq_len=ctx), launches=10))
        setattr(gluon_mla, flag, default)
        kv = bs * ctx * (C + R) * 2
        cells = []
        for value, times_ms in zip(values, gc.interleaved_graph_times(graphs, rounds=40, warmup=20)):
            ts = [t * 1e3 / 10 for t in times_ms]
            med = ts[len(ts) // 2]
            cells.append(f"{flag}={value}: {med:7.1f} us ({kv / med / 1e3 / BW[0] * 100:4.1f}%) "
                         f"[p10 {ts[4]:.1f}, p90 {ts[-5]:.1f}]")
        print(f"  bs {bs:>3} x {ctx:>5}: " + " | ".join(cells), flush=True)


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeline", action="store_true", help="only the per-program timelines")
    ap.add_argument("--ab", metavar="FLAG[=V1,V2,...]",
                    help="a gluon_mla module setting: a flag on vs off, or the values listed")
    ap.add_argument("--wide", action="store_true", help="with --ab: more shapes, no timelines")
    ap.add_argument("--small", action="store_true", help="with --ab: small batches and contexts only")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    BW[0] = bw = gc.copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    if args.ab:
        flag, _, listed = args.ab.partition("=")
        if not hasattr(gluon_mla, flag):
            raise SystemExit(f"gluon_mla has no setting {flag!r}")
        kind = type(getattr(gluon_mla, flag))
        values = ([v.lower() in ("1", "true") if kind is bool else kind(v) for v in listed.split(",")]
                  if listed else [True, False])
        configs = [(32, 8192), (64, 8192), (32, 16384)]
        if args.small:
            configs = [(1, 1024), (1, 2048), (1, 4096), (1, 8192), (2, 8192), (4, 4096), (8, 2048), (16, 1024),
                       (1, 32768), (32, 1024)]
        elif args.wide:
            configs += [(128, 8192), (1, 1024), (1, 8192), (1, 32768), (4, 8192), (8, 8192), (16, 8192), (32, 1024),
                        (32, 4096), (32, 32768)]
        ab(flag, values, configs)
        if not args.wide and not args.small and not listed:
            for on in (False, True):
                setattr(gluon_mla, flag, on)
                print(f"  {flag}={on}:", flush=True)
                for bs, ctx, splits in [(32, 8192, 2), (64, 8192, 1)]:
                    timeline(bs, ctx, splits)
            setattr(gluon_mla, flag, True)
        return
    for bs, ctx, splits in [(32, 8192, 2), (32, 128, 2), (64, 8192, 1), (32, 32768, 2)]:
        timeline(bs, ctx, splits)
    if args.timeline:
        return
    for bs, splits in [(32, 2), (64, 1)]:
        for one_page in (False, True):
            tiles, times = [], []
            for ctx in [128, 1024, 2048, 4096, 8192, 16384, 32768]:
                t = time_split_kernel(bs, ctx, splits, one_page)
                tiles.append(ctx / 64 / splits)
                times.append(t * 1e6)
                pct = 100 * bs * ctx * (C + R) * 2 / t / 1e9 / bw
                print(f"  bs {bs} splits {splits} {'L2 (one page)' if one_page else 'HBM'} ctx {ctx:>5}: "
                      f"{t * 1e6:7.1f} us ({pct:4.1f}% of copy bw) {t * 1e6 / (ctx / 64 / splits):.3f} us/tile",
                      flush=True)
            big = [(x, y) for x, y in zip(tiles, times) if x >= 16]
            slope, icpt = fit([x for x, _ in big], [y for _, y in big])
            print(f"  -> fit over >= 16 tiles: {slope:.3f} us/tile + {icpt:.1f} us fixed", flush=True)
    t_full = time_split_kernel(32, 8192, 2, False, merge=True)
    print(f"  bs 32 x 8k with merge: {t_full * 1e6:.1f} us "
          f"({100 * 32 * 8192 * (C + R) * 2 / t_full / 1e9 / bw:.1f}%)", flush=True)


if __name__ == "__main__":
    main()
