"""Measured hardware peaks, the denominators of MBU and MFU.

    from dlengine.bench.peaks import measure_peaks
    measure_peaks("cuda")   # {"copy_gbps": 2950.1, "bf16_tflops": 745.3, "kind": "cuda", ...}

- `copy_gbps`: device-to-device copy bandwidth of one large tensor (1 GiB on CUDA), counting the
  bytes read plus the bytes written, median of several CUDA-event-timed copies. This is what a
  memory-bound kernel can reach on this device, usually 80-90% of the datasheet number.
- `bf16_tflops`: a warmed-up 8192x8192x8192 bfloat16 matmul (2*n^3 FLOPs), median of several
  CUDA-event-timed runs: the dense GEMM peak cuBLAS reaches here.

On CPU both are measured too (a 256 MiB tensor copy and a float32 1024^3 matmul, timed with
`time.perf_counter`) so the code path runs everywhere; the result says `kind: "cpu"` and
`gemm_dtype: "float32"`, and such numbers only make sense relative to each other.

`resolve_peaks` is what the benchmarks call: explicit values (--peak-bandwidth-gbps,
--peak-tflops) skip the corresponding measurement; measured values are cached per device for the
life of the process (on CPU, per thread count).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

CUDA_COPY_BYTES = 1 << 30
CUDA_GEMM_N = 8192
CPU_COPY_BYTES = 256 << 20
CPU_GEMM_N = 1024

_CACHE: dict[str, dict[str, Any]] = {}


def _median_time(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _oom_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [MemoryError]
    if hasattr(torch.cuda, "OutOfMemoryError"):
        errs.append(torch.cuda.OutOfMemoryError)
    return tuple(errs)


def _shrink_on_oom(alloc: Callable[[int], Any], size: int, smallest: int, device: torch.device) -> tuple[Any, int]:
    """alloc(size), halving size on out-of-memory down to `smallest` (then the error propagates)."""
    while True:
        try:
            return alloc(size), size
        except _oom_errors():
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if size // 2 < smallest:
                raise
            size //= 2


def measure_copy_gbps(device: torch.device | str, nbytes: int | None = None, repeats: int = 10) -> tuple[float, int]:
    """(GB/s, bytes copied) of a device-to-device copy of `nbytes` (read + write counted, 1 GB =
    1e9 bytes). On out-of-memory the size is halved (down to 16 MiB) rather than failing."""
    device = torch.device(device)
    nbytes = nbytes or (CUDA_COPY_BYTES if device.type == "cuda" else CPU_COPY_BYTES)

    def alloc(n: int):
        src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
        return src, torch.empty_like(src)

    (src, dst), nbytes = _shrink_on_oom(alloc, nbytes, min(nbytes, 16 << 20), device)
    try:
        t = _median_time(lambda: dst.copy_(src), device, repeats if device.type == "cuda" else max(3, repeats // 2), 2)
    finally:
        src = dst = None  # type: ignore[assignment]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 2 * nbytes / t / 1e9, nbytes


def measure_gemm_tflops(device: torch.device | str, n: int | None = None, dtype: torch.dtype | None = None,
                        repeats: int = 10) -> tuple[float, int, torch.dtype]:
    """(TFLOP/s, n, dtype) of an n x n x n matmul on random data (2*n^3 FLOPs per run). Defaults:
    bfloat16 n=8192 on CUDA, float32 n=1024 on CPU. Halves n on out-of-memory (down to 1024)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (CUDA_GEMM_N if device.type == "cuda" else CPU_GEMM_N)
    gen = torch.Generator(device=device).manual_seed(0)

    def alloc(m: int):
        a = torch.randn(m, m, device=device, dtype=dtype, generator=gen)
        b = torch.randn(m, m, device=device, dtype=dtype, generator=gen)
        return a, b, torch.empty(m, m, device=device, dtype=dtype)

    (a, b, c), n = _shrink_on_oom(alloc, n, min(n, 1024), device)
    try:
        t = _median_time(lambda: torch.matmul(a, b, out=c), device,
                         repeats if device.type == "cuda" else max(3, repeats // 2), 3)
    finally:
        a = b = c = None  # type: ignore[assignment]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 2 * n**3 / t / 1e12, n, dtype


def _bench_error(msg: str) -> Exception:
    from dlengine.bench.common import BenchError  # common imports the engine; peaks stays light

    return BenchError(msg)


def _cuda_index(device: torch.device) -> torch.device:
    """`device` with its CUDA index filled in; a clear error where CUDA cannot be used (torch's
    own is a bare AssertionError from deep inside its lazy initialisation)."""
    if device.type not in ("cuda", "cpu"):
        raise _bench_error(f"peaks are measured on 'cuda' or 'cpu' devices, not {str(device)!r}")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        why = ("this torch build has no CUDA support (a CPU-only wheel)" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise _bench_error(f"cannot measure peaks on {str(device)!r}: {why}; measure on 'cpu' instead, "
                           "or give the peaks (--peak-bandwidth-gbps, --peak-tflops)")
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise _bench_error(f"cannot measure peaks on {str(device)!r}: only {torch.cuda.device_count()} "
                           "CUDA device(s) are visible")
    return device


def _measure_copy(device: torch.device, copy_bytes: int | None, repeats: int) -> dict[str, Any]:
    with torch.no_grad():
        gbps, nbytes = measure_copy_gbps(device, copy_bytes, repeats)
    return {"copy_gbps": gbps, "copy_bytes": nbytes}


def _measure_gemm(device: torch.device, gemm_n: int | None, repeats: int) -> dict[str, Any]:
    with torch.no_grad():
        tflops, n, dtype = measure_gemm_tflops(device, gemm_n, repeats=repeats)
    return {"bf16_tflops": tflops, "gemm_dtype": str(dtype).replace("torch.", ""), "gemm_n": n}


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"kind": "cuda" if device.type == "cuda" else "cpu", "device": str(device)}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def measure_peaks(device: torch.device | str | None = None, *, copy_bytes: int | None = None,
                  gemm_n: int | None = None, repeats: int = 10) -> dict[str, Any]:
    """Measure copy bandwidth and GEMM throughput on `device` (default: cuda when available).

    Returns {"copy_gbps", "bf16_tflops", "kind" ("cuda" | "cpu"), "device", "gemm_dtype",
    "gemm_n", "copy_bytes"} (+ "device_name" on CUDA). On CPU `bf16_tflops` holds the float32
    matmul rate (see `gemm_dtype`): CPU numbers exercise the code path, they are not a roofline.
    """
    device = _cuda_index(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    return {**_measure_copy(device, copy_bytes, repeats), **_measure_gemm(device, gemm_n, repeats),
            **_device_info(device)}


def resolve_peaks(device: torch.device | str, peak_bandwidth_gbps: float | None = None,
                  peak_tflops: float | None = None) -> dict[str, Any]:
    """The peaks a benchmark divides by: a given value wins and skips its measurement; a missing
    one is measured (once per device per process, then cached). Adds `bandwidth_source` and
    `tflops_source` ("given" | "measured")."""
    for name, v in (("peak_bandwidth_gbps", peak_bandwidth_gbps), ("peak_tflops", peak_tflops)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0 and v != float("inf")):
            raise _bench_error(f"{name} must be a positive number, got {v!r}")
    device = _cuda_index(torch.device(device))
    out = _device_info(device)
    if peak_bandwidth_gbps is None:
        key = f"copy@{device}" + (f"x{torch.get_num_threads()}" if device.type == "cpu" else "")
        if key not in _CACHE:
            _CACHE[key] = _measure_copy(device, None, 10)
        out.update(_CACHE[key])
    else:
        out["copy_gbps"] = float(peak_bandwidth_gbps)
    if peak_tflops is None:
        key = f"gemm@{device}" + (f"x{torch.get_num_threads()}" if device.type == "cpu" else "")
        if key not in _CACHE:
            _CACHE[key] = _measure_gemm(device, None, 10)
        out.update(_CACHE[key])
    else:
        out["bf16_tflops"] = float(peak_tflops)
    out["bandwidth_source"] = "measured" if peak_bandwidth_gbps is None else "given"
    out["tflops_source"] = "measured" if peak_tflops is None else "given"
    return out
