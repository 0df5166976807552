"""Start N processes that form one torch.distributed world, and bring them all down together.

`launch(fn, world_size)` is for scripts and notebooks: it spawns the ranks, runs `fn(*args)` in
each with the default process group initialised (gloo on CPU, NCCL on GPUs), and returns the
ranks' results. `WorkerGroup` is the same machinery kept alive: the parallel engine front
(`dlengine.parallel.front`) uses it to hold one rank-local engine per process.

Failure behaviour, the reason this is not a bare `mp.spawn`: a rank that raises sends its
traceback to the parent and exits at once; the parent then terminates every other rank (they may
be blocked in a collective that will never complete) and raises `WorkerError` carrying the failing
rank's traceback. A rank that dies without a word (killed, segfault) is noticed through its
process sentinel and handled the same way. Nothing is left running.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable

_READY_TIMEOUT_S = 600.0


class WorkerError(RuntimeError):
    """A rank failed; the message holds its traceback. `rank` is the failing rank."""

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_when_orphaned(parent_pid: int) -> None:
    """A rank blocked in a collective never notices that its parent died (killed with SIGKILL,
    so no cleanup ran): check once a second and leave, instead of lingering until the
    process-group timeout."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def _worker_entry(fn: Callable, rank: int, world_size: int, port: int, backend: str, conn, args: tuple,
                  pass_conn: bool, dist_timeout_s: float, num_threads: int | None, parent_pid: int) -> None:
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True, name="orphan-watch").start()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch
        import torch.distributed as dist

        if num_threads:
            torch.set_num_threads(num_threads)  # ranks share the host's cores: do not oversubscribe
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=dist_timeout_s))
        result = fn(conn, *args) if pass_conn else fn(*args)
        conn.send(("result", rank, result))
    except BaseException as e:  # noqa: BLE001 - any failure must reach the parent
        tb = traceback.format_exc()
        try:
            conn.send(("error", rank, f"rank {rank} failed: {type(e).__name__}: {e}\n{tb}"))
        except Exception:
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        # skip interpreter teardown: destroying a process group whose peers are stuck can hang
        os._exit(1)
    try:
        from dlengine.parallel.state import destroy_distributed

        destroy_distributed()
    finally:
        conn.close()


@contextlib.contextmanager
def _main_module_hidden(hide: bool):
    """Start children without re-running the caller's __main__ module.

    A spawned child normally re-imports the parent's main script (that is how it finds
    functions defined there), which re-runs any unguarded top-level code: a script that calls
    `EngineBuilder(...).parallel(tp=2).build()` at top level would build again in every worker.
    When `fn` does not live in __main__ the child never needs it, so the preparation data
    `Process.start()` computes is made without it (restored right after the start)."""
    main = sys.modules.get("__main__")
    if not hide or main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    try:
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


class WorkerGroup:
    """`world_size` processes running `fn`, each with a pipe to this process.

    With `pass_conn=True`, fn is called as `fn(conn, *args)` and may serve requests on the
    pipe (send replies with `conn.send(("reply", rank, value))`); its return value ends the rank.
    """

    def __init__(self, fn: Callable, world_size: int, args: tuple = (), *, backend: str = "gloo",
                 start_method: str = "spawn", pass_conn: bool = False, dist_timeout_s: float = 600.0,
                 num_threads: int | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        ctx = mp.get_context(start_method)
        port = free_port()
        if num_threads is None and backend == "gloo":
            num_threads = max(1, (os.cpu_count() or 1) // world_size)
        self.world_size = world_size
        self.conns = []
        self.procs = []
        self._closed = False
        hide_main = getattr(fn, "__module__", None) != "__main__"
        try:
            with _main_module_hidden(hide_main):
                for rank in range(world_size):
                    parent, child = ctx.Pipe()
                    p = ctx.Process(target=_worker_entry, name=f"dlengine-rank{rank}", daemon=True,
                                    args=(fn, rank, world_size, port, backend, child, args, pass_conn,
                                          dist_timeout_s, num_threads, os.getpid()))
                    p.start()
                    child.close()
                    self.conns.append(parent)
                    self.procs.append(p)
        except BaseException:
            self.terminate()
            raise

    # ------------------------------------------------------------------ messages
    def send(self, rank: int, message: Any) -> None:
        try:
            self.conns[rank].send(message)
        except (BrokenPipeError, EOFError, OSError):
            self._raise_dead(rank)

    def send_all(self, message: Any) -> None:
        for rank in range(self.world_size):
            self.send(rank, message)

    def recv_all(self, kind: str = "reply", timeout: float | None = None) -> list[Any]:
        """One message of `kind` from every rank, in rank order. Any rank's error (or death, or
        the timeout) terminates every rank and raises WorkerError / TimeoutError."""
        got: dict[int, Any] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(got) < self.world_size:
            waiting = [r for r in range(self.world_size) if r not in got]
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.terminate()
                raise TimeoutError(f"ranks {waiting} did not answer within {timeout:.0f} s; all ranks were stopped")
            objs = [self.conns[r] for r in waiting] + [self.procs[r].sentinel for r in waiting]
            ready = wait(objs, timeout=remaining)
            for r in waiting:
                conn = self.conns[r]
                if conn in ready or conn.poll():
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        self._raise_dead(r)
                    tag, rank, value = msg
                    if tag == "error":
                        self.terminate()
                        raise WorkerError(rank, value)
                    if tag == kind:
                        got[r] = value
                    elif tag == "result":  # the rank's function returned while a reply was expected
                        self.terminate()
                        raise WorkerError(r, f"rank {r} returned before answering")
                    else:
                        self.terminate()
                        raise RuntimeError(f"rank {r} sent {tag!r} while {kind!r} was expected")
                elif self.procs[r].sentinel in ready:
                    self._raise_dead(r)
        return [got[r] for r in range(self.world_size)]

    def _raise_dead(self, rank: int) -> None:
        p = self.procs[rank]
        p.join(1.0)
        code = p.exitcode
        self.terminate()
        raise WorkerError(rank, f"rank {rank} exited (exit code {code}) without reporting an error")

    # ------------------------------------------------------------------ ending
    def join(self, timeout: float | None = None) -> list[Any]:
        """Wait for every rank's return value (the "result" message), then for the processes."""
        values = self.recv_all("result", timeout)
        for p in self.procs:
            p.join(10.0)
        self.terminate()
        return values

    def terminate(self) -> None:
        """Stop every rank that is still running (SIGTERM, then SIGKILL) and close the pipes."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(3.0)
            if p.is_alive():
                p.kill()
                p.join(3.0)
        for c in self.conns:
            c.close()
        self._closed = True

    @property
    def alive(self) -> list[bool]:
        return [p.is_alive() for p in self.procs]


def launch(fn: Callable[..., Any], world_size: int, *args: Any, backend: str | None = None,
           timeout: float | None = 600.0, start_method: str = "spawn") -> list[Any]:
    """Run `fn(*args)` on `world_size` new processes forming one torch.distributed world and
    return their results in rank order.

    Inside `fn`, the default process group is initialised (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT are set, as torchrun sets them), so `torch.distributed` calls and
    `EngineBuilder(...).parallel(...).build()` work as under torchrun. `backend` defaults to
    gloo (NCCL needs `backend="nccl"`, one GPU per rank). If any rank raises, every rank is
    stopped and WorkerError carries that rank's traceback; past `timeout` seconds TimeoutError.

    `fn` and `args` are pickled to the new processes: with the default "spawn" start method `fn`
    must be importable (defined in a module, not in a notebook cell); in a notebook on CPU use
    `start_method="fork"`.

    >>> import torch, torch.distributed as dist
    >>> from dlengine.parallel import launch
    >>> def rank_sum():
    ...     t = torch.tensor([dist.get_rank() + 1.0])
    ...     dist.all_reduce(t)
    ...     return t.item()
    >>> launch(rank_sum, 2, start_method="fork")   # "fork": rank_sum is defined right here
    [3.0, 3.0]
    """
    group = WorkerGroup(fn, world_size, args, backend=backend or "gloo", start_method=start_method)
    try:
        return group.join(timeout)
    finally:
        group.terminate()
