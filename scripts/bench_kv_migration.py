"""KV migration throughput over DLSlime between two processes (loopback by default).

A "prefill" child process holds a KV cache shaped like a real model's (from a config preset; no
weights are loaded), exposes it through the same KVRegion + DLSlimeTransferEngine the prefill
role uses, and this process pulls prompts' worth of randomly placed blocks into its own cache,
exactly as the decode role does (KVLayout.segments_from, one batched read per request). The
first pull is checked byte for byte.

    python scripts/bench_kv_migration.py                          # qwen3-8b layout, bf16, CPU, tcp
    python scripts/bench_kv_migration.py --device cuda            # CUDA caches: pinned staging
    python scripts/bench_kv_migration.py --model tiny-deepseek-v3 --tokens 512 --dtype float32
    python scripts/bench_kv_migration.py --json kv.json          # the result also as a file
    python scripts/bench_kv_migration.py --device cuda --backend cuda_ipc   # GPU to GPU, one host

With --backend cuda_ipc both sides stage on the GPU and the read is a GPU copy through a CUDA IPC
mapping of the other process's staging; the report adds the device's own copy bandwidth,
measured in the same run, as the reference.

On CUDA the wheel's TCP transport reads host memory only, so each side stages through a pinned
host buffer; the report splits the time into gather (device -> pinned, prefill side), wire
(DLSlime read) and scatter (pinned -> device, decode side).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import gpu_common as gc
import torch

from dlengine.builder import resolve_model_path
from dlengine.cache.kv_cache import KVCache
from dlengine.config import ModelConfig, parse_dtype
from dlengine.parallel.transfer import KVLayout, make_transfer_engine
from dlengine.parallel.transfer.kv_region import KVRegion


def make_side(args, seed: int):
    cfg = ModelConfig.from_pretrained(resolve_model_path(args.model))
    dtype = parse_dtype(args.dtype)
    cache = KVCache(cfg, args.num_blocks, args.block_size, dtype, torch.device(args.device))
    g = torch.Generator().manual_seed(seed)
    cache.storage.copy_(torch.randn(cache.storage.shape, generator=g).to(dtype))
    # staging mirrors the cache (region block i <-> cache block i) unless --direct
    region = KVRegion(cache, cfg, staging_blocks=0 if args.direct else args.num_blocks,
                      staging_on_device=args.backend == "cuda_ipc")
    return cfg, cache, region


def serve(args) -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    cfg, cache, region = make_side(args, seed=1)
    te = make_transfer_engine(args.backend, transport=args.transport, host=args.host)
    te.register_region("kv", region.tensor)
    blocks = list(range(args.num_blocks))
    t0 = time.perf_counter()
    region.stage_out(blocks, blocks)  # CUDA: the whole cache once (a prefill does this per request)
    if args.device == "cuda":
        torch.cuda.synchronize()
    gather_s = time.perf_counter() - t0
    out.write(json.dumps({"info": te.local_info(), "layout": region.layout.to_dict(),
                          "setup_gather_s": gather_s}) + "\n")
    sys.stdin.read()  # until the parent closes the pipe
    te.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-8b", help="checkpoint folder or preset (only config.json is read)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="dlslime", choices=("dlslime", "cuda_ipc"))
    ap.add_argument("--transport", default="tcp")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=1024, help="prompt length migrated per request")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--inflight", type=int, default=1, help="pulls issued before waiting for the first")
    ap.add_argument("--contiguous", action="store_true", help="consecutive block ids on both sides")
    ap.add_argument("--direct", action="store_true", help="register the CPU cache itself (no staging copies)")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args)

    child = subprocess.Popen([sys.executable, __file__, "--serve", *sys.argv[1:]], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        hello = json.loads(child.stdout.readline())
        cfg, cache, region = make_side(args, seed=2)
        te = make_transfer_engine(args.backend, transport=args.transport, host=args.host)
        te.register_region("kv", region.tensor)
        te.connect("prefill", hello["info"])
        remote = KVLayout.from_dict(hello["layout"])
        local = region.layout
        local.check_compatible(remote)
        n_blocks = -(-args.tokens // args.block_size)
        if n_blocks * args.inflight > args.num_blocks:
            raise SystemExit(f"--num-blocks {args.num_blocks} < {n_blocks} blocks x {args.inflight} in flight")
        g = torch.Generator().manual_seed(0)
        wire, scatter, gather, segs_n = [], [], [], []
        for i in range(0, args.requests, args.inflight):
            batch = []
            perm_remote = torch.randperm(args.num_blocks, generator=g).tolist()  # disjoint per request
            perm_local = torch.randperm(args.num_blocks, generator=g).tolist()
            for j in range(min(args.inflight, args.requests - i)):
                # what the roles do: the prompt sits in random cache blocks on both sides; staged,
                # it travels between consecutive staging blocks (first fit); direct, between the
                # cache blocks themselves (--contiguous: consecutive cache blocks too)
                if args.contiguous:
                    cb_remote = cb_local = list(range(j * n_blocks, (j + 1) * n_blocks))
                else:
                    cb_remote = perm_remote[j * n_blocks:(j + 1) * n_blocks]
                    cb_local = perm_local[j * n_blocks:(j + 1) * n_blocks]
                run = list(range(j * n_blocks, (j + 1) * n_blocks))
                rb, lb = (run, run) if region.staged else (cb_remote, cb_local)
                if region.staged:
                    cb_remote = run  # the serving process staged its whole cache 1:1 at start
                segs = local.segments_from(remote, rb, lb, args.tokens)
                segs_n.append(len(segs))
                batch.append((cb_remote, cb_local, rb, lb, segs))
            t0 = time.perf_counter()
            futs = [te.read("prefill", "kv", "kv", b[-1]) for b in batch]
            for f in futs:
                assert f.wait(60.0), "pull timed out"
            dt = time.perf_counter() - t0
            wire += [dt / len(batch)] * len(batch)
            t1 = time.perf_counter()
            for cb_remote, cb_local, rb, lb, _ in batch:
                region.stage_in(lb, cb_local, args.tokens)
            if args.device == "cuda":
                torch.cuda.synchronize()
            scatter += [(time.perf_counter() - t1) / len(batch)] * len(batch)
            if region.staged:  # the prefill side gathers each request into staging: time one here
                t2 = time.perf_counter()
                region.stage_out(batch[0][1], batch[0][3])
                if args.device == "cuda":
                    torch.cuda.synchronize()
                gather.append(time.perf_counter() - t2)
            if i == 0:  # check the bytes of the first pull against the prefill side's contents
                cb_remote, cb_local = batch[0][0], batch[0][1]
                expect = torch.randn(cache.storage.shape, generator=torch.Generator().manual_seed(1)).to(cache.dtype)
                bd = 2 if local.parts == 2 else 1  # the block dim of the cache storage
                full = args.tokens // args.block_size  # whole blocks (a partial last block is cut)
                got = cache.storage.index_select(bd, torch.tensor(cb_local[:full], device=cache.storage.device)).cpu()
                want = expect.index_select(bd, torch.tensor(cb_remote[:full]))
                assert torch.equal(got.float(), want.float()), "migrated KV differs from the source"
        nbytes = local.num_layers * local.parts * args.tokens * local.token_bytes
        med = statistics.median(wire)
        res = {
            "model": args.model, "layout": f"{local.kind} L={local.num_layers} parts={local.parts} "
                                          f"{local.heads}x{local.head_dim} {local.dtype}",
            "device": args.device, "transport": args.transport, "staging": region.staged,
            "tokens_per_request": args.tokens, "blocks_per_request": n_blocks, "block_size": args.block_size,
            "segments_per_request": statistics.median(segs_n), "bytes_per_request": nbytes,
            "inflight": args.inflight, "requests": args.requests,
            "wire_ms_median": med * 1e3, "wire_GBps": nbytes / med / 1e9, "blocks_per_s": n_blocks / med,
            "gather_ms_per_request": statistics.median(gather) * 1e3 if gather else 0.0,
            "scatter_ms_per_request": statistics.median(scatter) * 1e3,
        }
        total = med + res["gather_ms_per_request"] / 1e3 + statistics.median(scatter)
        res["end_to_end_GBps"] = nbytes / total / 1e9
        res["backend"] = args.backend
        if args.device == "cuda":  # the reference: one device-to-device copy of a request's bytes
            a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            b = torch.empty_like(a)
            for _ in range(3):
                b.copy_(a)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                b.copy_(a)
            torch.cuda.synchronize()
            res["device_copy_GBps"] = 20 * nbytes / (time.perf_counter() - t0) / 1e9
            res["wire_vs_device_copy"] = res["wire_GBps"] / res["device_copy_GBps"]
        print(json.dumps(res, indent=1))
        gc.write_json(args.json, res, announce=False)
        te.close()
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()


if __name__ == "__main__":
    main()
