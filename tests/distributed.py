"""The one place tests spawn processes: ``run_distributed(fn, world_size, *args)``.

Each rank is a fresh ``spawn`` process that imports torch once, joins a process group on a free localhost TCP
port, runs ``fn(rank, world_size, *args)`` and sends back its (picklable) result. A rank that raises makes the
call raise :class:`DistributedTestError` naming the rank and carrying its traceback; a rank that never reports
(hang, crash, kill) makes the call raise after ``timeout`` seconds — the parent never waits forever.

``fn`` must be picklable: a module-level function of an importable module (test modules are; the spawned
child gets the parent's ``sys.path``).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


class DistributedTestError(RuntimeError):
    """A spawned rank raised, crashed or did not finish within the timeout."""


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to 0, read, close). A tiny race is accepted in tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    args: tuple[Any, ...],
    results: Any,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks on 2 cores: oversubscribed intra-op threads only slow everyone down
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        value = fn(rank, world_size, *args)
        # Plain pickle copies tensor data. The queue's own pickler would pass tensors as shared-memory file
        # descriptors, which die with this process before the parent reads them (ConnectionResetError).
        results.put((rank, True, pickle.dumps(value)))
    except BaseException as exc:  # report everything, including KeyboardInterrupt/SystemExit in the child
        # Report *before* tearing the group down: the teardown makes the peers fail with "connection closed",
        # and the parent names the first report as the root cause.
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 60.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return the results in rank order.

    Raises :class:`DistributedTestError` naming the first failing rank (by rank number) with its exception and
    traceback, or naming the ranks that had not reported when ``timeout`` seconds ran out (those processes are
    terminated, so a hung collective never hangs the test run).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, rank, world_size, port, backend, timeout, args, results),
            name=f"rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        while len(values) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                # A rank that died without reporting (segfault, SIGFPE in a kernel, OOM kill) never will.
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
                dead = [r for r in dead if r not in errors]
                if dead and results.empty():
                    for r in dead:
                        errors[r] = f"process exited with code {procs[r].exitcode} without reporting"
                continue
            if ok:
                values[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
            if not ok:
                break  # the others are likely stuck in a collective with the failed rank; fail fast
    finally:
        for proc in procs:
            proc.join(timeout=0.0 if errors or len(values) < world_size else 5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
        results.close()
    if errors:
        rank = next(iter(errors))  # the first report (dicts keep insertion order): the root cause
        others = [r for r in errors if r != rank]
        also = f" (then ranks {others} failed too)" if others else ""
        raise DistributedTestError(f"rank {rank} of {world_size} failed{also}: {errors[rank]}")
    if len(values) < world_size:
        missing = [r for r in range(world_size) if r not in values]
        raise DistributedTestError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s")
    return [values[r] for r in range(world_size)]
