"""How many threads torch uses for a benchmark on CPU.

torch's OpenMP pool defaults to one thread per core and every parallel op ends in a barrier that
waits for all of them. When other processes keep the cores busy, one of those threads is often
descheduled and every op waits a whole scheduler time slice for it: on a 2-core machine with
other work running, `dlengine bench` on the tiny preset ran 10-25x slower with 2 threads than
with 1 (idle, 2 threads were at best ~17% faster). So unless told (--threads, or OMP_NUM_THREADS
in the environment), the bench takes the physical cores less one kept spare (load that arrives
mid-run lands there instead of stalling every op), at most MAX_AUTO_THREADS, less the CPUs other
processes keep busy when it starts, and at least one. The result records the choice and the
report prints it.
"""

from __future__ import annotations

import glob
import math
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch

MAX_AUTO_THREADS = 16  # beyond this small-batch decode gains little and each barrier costs more


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{base}/physical_package_id") as f, open(f"{base}/core_id") as g:
                cores.add((f.read().strip(), g.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology (not Linux, or hidden): count the CPU
    return max(1, len(cores))


def busy_cpus(samples: int = 10, interval_s: float = 0.01) -> float:
    """CPUs other processes keep busy now: the mean count of runnable tasks in /proc/loadavg's
    4th field over a few samples, less this process (0.0 where that file does not exist)."""
    if not glob.glob("/proc/loadavg"):
        return 0.0
    counts = []
    for i in range(samples):
        with open("/proc/loadavg") as f:
            counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0.0, sum(counts) / len(counts))


def choose_cpu_threads(requested: int | None = None) -> dict[str, Any]:
    """{"threads", "source" ("--threads" | "OMP_NUM_THREADS" | "auto"), and for "auto" the
    "physical_cores" and "busy_cpus" it was chosen from}."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            from dlengine.bench.common import BenchError

            raise BenchError(f"threads must be a positive integer, got {requested!r}")
        return {"threads": requested, "source": "--threads"}
    if os.environ.get("OMP_NUM_THREADS"):
        return {"threads": torch.get_num_threads(), "source": "OMP_NUM_THREADS"}
    cores, busy = physical_cores(), busy_cpus()
    free = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(cores - 1, MAX_AUTO_THREADS, math.floor(free - busy + 0.5)))
    return {"threads": threads, "source": "auto", "physical_cores": cores, "busy_cpus": round(busy, 1)}


def describe_cpu_threads(info: dict[str, Any]) -> str:
    """'1 (auto: 2 physical cores, ~5.2 CPUs busy elsewhere)' or '4 (--threads)'."""
    if info["source"] != "auto":
        return f"{info['threads']} ({info['source']})"
    return (f"{info['threads']} (auto: {info['physical_cores']} physical cores, "
            f"~{info['busy_cpus']:g} CPUs busy elsewhere; --threads N to choose)")


@contextmanager
def cpu_threads(device: torch.device | str | None, requested: int | None = None) -> Iterator[dict[str, Any] | None]:
    """Run the body with the chosen torch thread count on a CPU `device` (the previous count is
    restored afterwards, so a benchmark called from Python leaves the process as it found it).
    Yields the choice, or None on other devices (threads are not touched there)."""
    if device is None or torch.device(device).type != "cpu":
        yield None
        return
    info = choose_cpu_threads(requested)
    before = torch.get_num_threads()
    torch.set_num_threads(info["threads"])
    try:
        yield info
    finally:
        torch.set_num_threads(before)
