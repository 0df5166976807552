"""Prefill-decode disaggregation on one CPU machine: a prefill engine in a child process, a decode
engine here, KV migrated over DLSlime's TCP transport on 127.0.0.1. Checks the text against a
hybrid engine and prints a migration report.

    pip install -e ".[dlslime]"  &&  apt-get install libibverbs1
    python examples/pd_disagg.py                     # tiny Qwen3
    python examples/pd_disagg.py --model tiny-deepseek-v3
    python examples/pd_disagg.py --control-plane http://127.0.0.1:4479   # register both with dlslime-ctrl
    python examples/pd_disagg.py --device cuda --dtype bfloat16   # both engines on one GPU (pinned staging)
"""

import argparse
import time

from dlengine import EngineBuilder, SamplingParams
from dlengine.disagg import PDRouter
from dlengine.disagg.worker import WorkerEngine

PROMPTS = [
    "The quick brown fox",
    "Paged attention keeps the key value cache in fixed size blocks, so requests of different lengths",
    "Once upon a time there was a tiny language model that wanted to be exact.",
    "Prefix caching reuses blocks of identical prompt prefixes.",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-qwen3")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--control-plane", default=None, help="dlslime-ctrl URL (optional)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (both engines share the device)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    # two engines (three with the hybrid reference) on one device: a fixed small cache each
    cache = {"num_blocks": 512, "block_size": 16}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    cp = {"url": args.control_plane} if args.control_plane else None

    prefill = WorkerEngine({"model": args.model, "role": "prefill", "dtype": args.dtype, "device": args.device,
                            "cache": cache, "transfer": {"transport": "tcp"}, "control_plane": cp})
    try:
        b = (EngineBuilder(args.model).dtype(args.dtype).device(args.device).cache(**cache)
             .role("decode").transfer("dlslime", transport="tcp"))
        if cp:
            b.control_plane(args.control_plane)
        decode = b.build()
        print(f"prefill engine {prefill.engine_id} (pid {prefill.pid}) at "
              f"{prefill.endpoint['host']}:{prefill.endpoint['port']}")
        print(decode)
        router = PDRouter(prefill, decode)
        t0 = time.perf_counter()
        outs = router.generate(PROMPTS, params)
        elapsed = time.perf_counter() - t0
        hybrid = (EngineBuilder(args.model).dtype(args.dtype).device(args.device).cache(**cache).build()
                  .generate(PROMPTS, params))
        for prompt, o, h in zip(PROMPTS, outs, hybrid):
            same = "same as hybrid" if o.token_ids == h.token_ids else "DIFFERS from hybrid"
            print(f"{prompt!r}\n  -> {o.text!r}  [{same}]")
        r = router.migration_report()
        print(f"\nmigration report: {r['requests']} requests, {r['tokens']} tokens, {r['blocks']} blocks, "
              f"{r['segments']} segments, {r['bytes'] / 2**10:.1f} KiB, "
              f"{r['ms_per_request']:.2f} ms per pull (issue -> verified), wall {elapsed * 1e3:.0f} ms for the batch")
        for m in decode.connector.migrations:
            print(f"  {m.request_id}: {m.num_tokens} tokens, {m.num_blocks} blocks, {m.num_segments} segments, "
                  f"{m.nbytes} bytes, {m.seconds * 1e3:.2f} ms")
        stats = prefill.stats()
        print(f"prefill side: {stats['role']}")
        assert all(o.token_ids == h.token_ids for o, h in zip(outs, hybrid)), "disaggregated output differs"
        decode.close()
    finally:
        prefill.close()


if __name__ == "__main__":
    main()
