"""What every GPU script in scripts/ shares: the repository on sys.path, the CUDA check, the
environment line, timing helpers and where results are written.

    import gpu_common as gc            # first import of a script: puts the repository on sys.path
    if not gc.require_cuda(): ...      # prints why and returns False without a CUDA device
    env = gc.device_env(flashinfer=gc.flashinfer_version())
    bw = gc.copy_bandwidth()           # GB/s of a 1 GiB device copy (bytes read + written)
    t = gc.bench_s(fn)                 # median seconds of eager calls (triton's do_bench)
    t = gc.graph_bench_s(fn)           # median seconds of fn replayed from a CUDA graph
    gc.write_json(gc.out_path("x.json", explicit), results)

Scripts run as `python scripts/NAME.py` (scripts/ is then on sys.path, so `import gpu_common`
works) and from tests that put scripts/ on sys.path. Importing this module touches no GPU and
sets no environment variable: `gpu_suite.sh` sets the run's environment.

Timing notes (why the helpers look like this): a kernel shorter than its Python launch timed
from eager calls measures the host, so time it from a CUDA graph (`graph_bench_s`, or
`capture_graph(fn, launches=N)` for N launches per replay); under sustained load the H100's clocks
drift by several percent, so compare variants by alternating their graph replays
(`interleaved_graph_times`) rather than timing one after the other.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DEV = "cuda"


# ------------------------------------------------------------------------------ device and environment


def require_cuda(message: str = "needs a CUDA device") -> bool:
    """True when a CUDA device is visible; otherwise prints `message` and returns False."""
    if torch.cuda.is_available():
        return True
    print(message)
    return False


def device_env(**extra: Any) -> dict:
    """Device name, capability, SM count, torch and triton versions, plus `extra`."""
    import triton

    props = torch.cuda.get_device_properties(0)
    return dict(device=props.name, capability=torch.cuda.get_device_capability(),
                sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__, **extra)


def flashinfer_version() -> str:
    """FlashInfer's version, or "unavailable (why)" when it does not import."""
    try:
        import flashinfer  # type: ignore

        return getattr(flashinfer, "__version__", "?")
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"unavailable ({type(e).__name__}: {str(e)[:80]})"


# ------------------------------------------------------------------------------ results


def out_path(name: str, explicit: str | Path | None = None) -> Path | None:
    """Where to write a result file: `explicit` when given, else $OUT/name when $OUT is set."""
    if explicit:
        return Path(explicit)
    return Path(os.environ["OUT"]) / name if os.environ.get("OUT") else None


def write_json(path: str | Path | None, data: Any, announce: bool = True) -> None:
    """Write `data` as indented JSON (non-JSON values as str); nothing when path is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
    if announce:
        print(f"wrote {path}")


# ------------------------------------------------------------------------------ timing


def bench_s(fn: Callable[[], Any], warmup: int = 10, rep: int = 50, mode: str = "median") -> float:
    """Seconds of `fn` called eagerly, the median (or `mode`: "mean", "min", ...) of
    triton.testing.do_bench's timings (L2 flushed before each call; warmup / rep in ms)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode=mode) * 1e-3


def copy_bandwidth(device: str = DEV, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy of `nbytes`, counting bytes read + written (median); the
    buffers are freed before returning. What the "% of copy bandwidth" columns divide by."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = bench_s(lambda: y.copy_(x), warmup=10, rep=50)
    del x, y
    torch.cuda.empty_cache()
    return 2 * nbytes / t / 1e9


def capture_graph(fn: Callable[[], Any], launches: int = 1, side_stream_warmup: bool = False) -> torch.cuda.CUDAGraph:
    """`fn` run once (compiles), then captured `launches` times into one CUDA graph.
    side_stream_warmup: also run it once on a side stream first (what torch recommends before a
    capture; some libraries allocate lazily on the first call of a stream)."""
    fn()
    torch.cuda.synchronize()
    if side_stream_warmup:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    torch.cuda.synchronize()
    return graph


def graph_bench_s(fn: Callable[[], Any], warmup: int = 10, rep: int = 50, side_stream_warmup: bool = False) -> float:
    """Median seconds of GPU time: `fn` captured once in a CUDA graph, its replays timed by bench_s."""
    return bench_s(capture_graph(fn, side_stream_warmup=side_stream_warmup).replay, warmup=warmup, rep=rep)


def host_us(fn: Callable[[], Any], n: int = 200) -> float:
    """Host microseconds per call (enqueue only: the GPU queue absorbs the launches)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return dt * 1e6


def interleaved_graph_times(graphs: list[torch.cuda.CUDAGraph], rounds: int = 40, warmup: int = 20) -> list[list[float]]:
    """Per graph, the sorted milliseconds of `rounds` replays, the graphs alternated (who goes
    first rotating each round) after `warmup` replays of each, every replay timed by CUDA events:
    the A/B method that keeps the H100's clock drift out of a comparison."""
    for _ in range(warmup):
        for g in graphs:
            g.replay()
    marks: list[list] = [[] for _ in graphs]
    for i in range(rounds):
        for j in range(len(graphs)):
            k = (i + j) % len(graphs)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graphs[k].replay()
            b.record()
            marks[k].append((a, b))
    torch.cuda.synchronize()
    return [sorted(a.elapsed_time(b) for a, b in pairs) for pairs in marks]
