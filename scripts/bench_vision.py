"""Vision encoder throughput and one-image TTFT with and without a separate encoder engine (EPD).

1. Encoder throughput: the encoder role's vision tower (EngineBuilder(...).role("encode")) on
   batches of same-size images: image tokens per second, ms per batch (preprocessing included,
   as a request pays it; the tower alone beside it).
2. TTFT of a one-image request (max_tokens=1, prefix caching off so every request computes):
   - local: one hybrid engine preprocesses, encodes and prefills;
   - EPD: an encoder engine in another process (same device) encodes and stages the embeddings
     (`encode`), then the hybrid engine pulls them over DLSlime TCP and prefills. The time runs
     from the encode call to the first token, so it includes the encoder's round trip and the
     pull; the engine still preprocesses the image (for its content hash and positions).

    python scripts/bench_vision.py                                      # CUDA: qwen3-vl-8b, dummy weights
    python scripts/bench_vision.py --device cpu --model tiny-qwen3-vl --image-size 64 --iters 3
    python scripts/bench_vision.py --json vision.json

A config-only preset (qwen3-vl-8b) ships no preprocessor config: the script writes Qwen3-VL's
released one (patch 16, merge 2, pixel bounds 65536 .. 16777216) next to a copy of config.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import gpu_common as gc
import torch

from dlengine import EngineBuilder, SamplingParams
from dlengine.builder import resolve_model_path
from dlengine.disagg.worker import WorkerEngine

QWEN3_VL_PREPROCESSOR = dict(image_processor_type="Qwen2VLImageProcessor", patch_size=16, temporal_patch_size=2,
                             merge_size=2, size={"shortest_edge": 65536, "longest_edge": 16777216},
                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def model_folder(model: str, tmp: str) -> str:
    """A folder with config.json and a preprocessor config (a copy for config-only presets)."""
    path = resolve_model_path(model)
    if os.path.exists(os.path.join(path, "preprocessor_config.json")):
        return path
    folder = os.path.join(tmp, "model")
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(path, "config.json"), folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(QWEN3_VL_PREPROCESSOR, f)
    return folder


def images(tmp: str, size: int, count: int, seed: int = 0) -> list[str]:
    """`count` random size x size PNG files."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        paths.append(os.path.join(tmp, f"img{seed}_{k}.png"))
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def tower_flops(vision_config: dict, grids: list[tuple[int, int, int]]) -> float:
    """FLOPs of one tower call on images / frames `grids` (t, h, w in patches): the blocks' GEMMs
    (qkv, proj, the MLP), attention within each image (QK^T and PV), the patch embedding and the
    final and deepstack mergers (norms, rotary and softmax left out: they are memory-bound)."""
    d, mlp, depth = vision_config["hidden_size"], vision_config["intermediate_size"], vision_config["depth"]
    merge = vision_config["spatial_merge_size"]
    patch_in = vision_config["in_channels"] * vision_config["temporal_patch_size"] * vision_config["patch_size"] ** 2
    out, mergers = vision_config["out_hidden_size"], 1 + len(vision_config.get("deepstack_visual_indexes") or [])
    seqs = [h * w for t, h, w in grids for _ in range(t)]
    n = sum(seqs)
    md = d * merge * merge
    blocks = 2 * n * (patch_in * d + depth * (4 * d * d + 2 * d * mlp))
    gemm = blocks + 2 * (n // merge ** 2) * mergers * (md * md + md * out)
    attention = depth * sum(4 * s * s * d for s in seqs)
    return float(gemm + attention)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def encoder_throughput(args, folder: str, tmp: str) -> list[dict]:
    b = EngineBuilder(folder).device(args.device).dtype(args.dtype).load_format(args.load_format)
    encoder = b.role("encode").transfer("dlslime").encoder_cache(staging_bytes=args.staging_mib << 20).build()
    rows = []
    from dlengine.bench.peaks import measure_peaks

    peak_tflops = measure_peaks(args.device)["bf16_tflops"]  # the roofline the tower's MFU is set against
    try:
        for batch in args.batches:
            paths = images(tmp, args.image_size, batch, seed=100 + batch)
            processed = encoder.vision.process_images(paths)
            pixels = torch.cat([px for px, *_ in processed]).to(args.device)
            grids = [g for _, g, *_ in processed]
            tokens = sum(n for *_, n in processed)
            with torch.inference_mode():
                for _ in range(2):
                    encoder.tower(pixels, grids)
                sync(args.device)
                tower = []
                for _ in range(args.iters):
                    t = time.perf_counter()
                    encoder.tower(pixels, grids)
                    sync(args.device)
                    tower.append(time.perf_counter() - t)
            whole = []
            for _ in range(args.iters):
                t = time.perf_counter()
                encoder.embed(paths)
                sync(args.device)
                whole.append(time.perf_counter() - t)
            s_tower, s_whole = statistics.median(tower), statistics.median(whole)
            flops = tower_flops(encoder.config.model.hf_config["vision_config"], grids)
            mfu = flops / s_tower / 1e12 / peak_tflops
            rows.append(dict(images=batch, image_tokens=tokens, patches=int(pixels.shape[0]),
                             tower_ms=s_tower * 1e3, with_preprocessing_ms=s_whole * 1e3,
                             tower_tflop=flops / 1e12, tower_mfu=mfu, peak_tflops=peak_tflops,
                             image_tokens_per_s=tokens / s_tower,
                             image_tokens_per_s_with_preprocessing=tokens / s_whole))
            print(f"encoder  batch {batch:>2} x {args.image_size}px: {tokens:>6} image tokens, tower "
                  f"{s_tower * 1e3:8.2f} ms ({tokens / s_tower:10.0f} tok/s), with preprocessing "
                  f"{s_whole * 1e3:8.2f} ms ({tokens / s_whole:10.0f} tok/s); tower {flops / 1e12:.2f} TFLOP, "
                  f"MFU {mfu:.1%} of {peak_tflops:.0f} TFLOP/s measured")
    finally:
        encoder.close()
    return rows


def first_token(engine, prompt, ec=None) -> None:
    rid = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0), ec_transfer_params=ec)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                if out.error:
                    raise RuntimeError(out.error)
                return


def ttft(args, folder: str, tmp: str) -> dict:
    worker = WorkerEngine({"model": folder, "role": "encode", "device": args.device, "dtype": args.dtype,
                           "load_format": args.load_format, "transfer": {},
                           "encoder_cache": {"staging_bytes": args.staging_mib << 20}}, timeout_s=600)
    b = (EngineBuilder(folder).device(args.device).dtype(args.dtype).load_format(args.load_format)
         .max_model_len(args.max_model_len).cache(prefix_caching=False)
         .encoder_cache(staging_bytes=args.staging_mib << 20))
    if args.device.startswith("cuda"):
        b.cache(memory_utilization=args.memory_utilization)
    engine = b.build()
    image_token = engine.config.model.hf_config["image_token_id"]
    hf = engine.config.model.hf_config
    start, end = hf["vision_start_token_id"], hf["vision_end_token_id"]
    vocab = engine.config.model.vocab_size
    text = [100 + (7 * i) % (vocab - 200) for i in range(args.text_tokens)]  # ordinary (non-special) token ids
    try:
        paths = images(tmp, args.image_size, args.iters + 2, seed=7)
        local, epd, encode_ms = [], [], []
        for k, path in enumerate(paths):
            prompt = {"prompt": text[:8] + [start, image_token, end] + text[8:], "images": [path]}
            t = time.perf_counter()
            first_token(engine, prompt)
            sync(args.device)
            if k >= 2:  # the first two warm up
                local.append(time.perf_counter() - t)
            t = time.perf_counter()
            ec = worker.encode([path])
            t_enc = time.perf_counter()
            first_token(engine, prompt, ec)
            sync(args.device)
            if k >= 2:
                epd.append(time.perf_counter() - t)
                encode_ms.append((t_enc - t) * 1e3)
        result = dict(image_tokens=sum(im["num_tokens"] for im in ec["images"]),
                      prompt_tokens=args.text_tokens + 2 + sum(im["num_tokens"] for im in ec["images"]),
                      ttft_local_ms=statistics.median(local) * 1e3, ttft_epd_ms=statistics.median(epd) * 1e3,
                      epd_encode_leg_ms=statistics.median(encode_ms),
                      pulled=engine.describe().get("ec_pulls"))
        print(f"TTFT one {args.image_size}px image ({result['image_tokens']} image tokens, {result['prompt_tokens']} "
              f"prompt tokens): local encode {result['ttft_local_ms']:.2f} ms, separate encoder "
              f"{result['ttft_epd_ms']:.2f} ms (encode leg {result['epd_encode_leg_ms']:.2f} ms)")
        return result
    finally:
        engine.close()
        worker.close()


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-vl-8b" if cuda else "tiny-qwen3-vl")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--load-format", default=None, help="default: dummy for config-only presets, else auto")
    p.add_argument("--image-size", type=int, default=1024 if cuda else 64, help="square images, pixels per side")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16] if cuda else [1, 4],
                   help="images per encoder call (throughput)")
    p.add_argument("--iters", type=int, default=5 if cuda else 3)
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens around the image (TTFT prompt)")
    p.add_argument("--max-model-len", type=int, default=8192 if cuda else 1024)
    p.add_argument("--memory-utilization", type=float, default=0.5)
    p.add_argument("--staging-mib", type=int, default=512 if cuda else 16)
    p.add_argument("--skip", choices=("throughput", "ttft"), action="append", default=[])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.load_format is None:  # config-only presets have no weights
        has_weights = any(f.endswith(".safetensors") for f in os.listdir(resolve_model_path(args.model)))
        args.load_format = "auto" if has_weights else "dummy"
    env = gc.device_env() if cuda and args.device.startswith("cuda") else {"device": "cpu", "torch": torch.__version__}
    print(f"{args.model} ({args.load_format} weights), {args.dtype} on {env['device']}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.model, tmp)
        results = dict(env=env, model=args.model, dtype=args.dtype, image_size=args.image_size)
        if "throughput" not in args.skip:
            results["encoder_throughput"] = encoder_throughput(args, folder, tmp)
        if "ttft" not in args.skip:
            results["ttft_one_image"] = ttft(args, folder, tmp)
    gc.write_json(gc.out_path("vision.json", args.json), results)


if __name__ == "__main__":
    main()
