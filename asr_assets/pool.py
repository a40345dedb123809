"""Fan per-item work out to worker processes with bounded memory, per-item timeouts and crash isolation.

pebble's ProcessPool gives what concurrent.futures lacks: a task that overruns its timeout has its worker killed, and
a worker that dies (a codec segfault, the OOM killer) fails only its own task with ``ProcessExpired`` while the pool
starts a replacement. Workers are spawned (not forked): the parent may hold threads (gRPC, polars) that fork would
copy in a broken state.
"""

from __future__ import annotations

import errno
import math
import multiprocessing
import os
import resource
import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Generic, TypeVar

from pebble import ProcessExpired, ProcessPool

J = TypeVar("J")
R = TypeVar("R")


class ItemTimeout(Exception):
    """The item ran past its time limit; its worker was killed."""

    kind = "Timeout"


class WorkerCrashed(Exception):
    """The worker process died while handling the item (signal or hard exit).

    Attributes:
        signal: the signal that ended it (exit code -N), None for a hard exit.
    """

    kind = "WorkerCrashed"

    def __init__(self, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.signal = -exitcode if exitcode is not None and exitcode < 0 else None


class MemoryLimit(Exception):
    """The worker ran out of memory under its cap (or the kernel killed it for memory) while handling the item."""

    kind = "MemoryLimit"


@dataclass(frozen=True)
class PoolOutcome(Generic[J, R]):
    """One finished item: its job and either the worker's result or the exception that ended it."""

    job: J
    result: R | None
    error: BaseException | None


def default_workers() -> int:
    """Worker count: the CPUs this process may use, capped by its cgroup CPU quota (a k8s pod's CPU limit: the
    affinity mask of a pod still lists every core of the node)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(usable, math.ceil(quota)) if quota else usable)


def cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> float | None:
    """CPUs allowed by the cgroup v2 quota ("max 100000" means none), or None where there is no quota."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def run_pool(
    fn: Callable[[J], R],
    jobs: Iterable[J],
    *,
    workers: int,
    timeout_s: float,
    max_in_flight: int | None = None,
    memory_limit_bytes: int = 0,
) -> Iterator[PoolOutcome[J, R]]:
    """Runs ``fn`` on every job in worker processes and yields outcomes as they complete.

    At most ``max_in_flight`` jobs (default 2 per worker) are submitted at once, so memory does not grow with the
    number of jobs. ``fn`` must be importable by module path (spawned workers import it) and should turn expected
    item failures into results; anything it raises comes back as ``error`` for that item alone.

    Args:
        fn: the per-item function.
        jobs: the items; consumed lazily.
        workers: worker processes.
        timeout_s: wall-time limit per item; a worker past it is killed and the item ends with ItemTimeout.
        max_in_flight: bound on submitted-but-unfinished items.
        memory_limit_bytes: address-space cap (RLIMIT_AS) of each worker, 0 for none. An item that needs more ends
            with MemoryLimit (its worker's allocation fails, or the worker is replaced) instead of taking the machine.
    """
    limit = max_in_flight or 2 * workers
    job_iter = iter(jobs)
    pending: dict[Future, J] = {}
    oom_kills = _oom_kills()
    pool_args = {"initializer": _limit_memory, "initargs": (memory_limit_bytes,)} if memory_limit_bytes else {}
    with ProcessPool(max_workers=workers, context=multiprocessing.get_context("spawn"), **pool_args) as pool:
        try:
            while True:
                while len(pending) < limit:
                    job = next(job_iter, _END)
                    if job is _END:
                        break
                    pending[pool.schedule(fn, args=(job,), timeout=timeout_s)] = job
                if not pending:
                    return
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in done:
                    outcome = _outcome(pending.pop(future), future, timeout_s, memory_limit_bytes)
                    if isinstance(outcome.error, WorkerCrashed) and outcome.error.signal == signal.SIGKILL:
                        # A SIGKILL is what the kernel's OOM killer sends: its cgroup counter tells it from other kills.
                        kills, oom_kills = oom_kills, _oom_kills()
                        if oom_kills > kills:
                            outcome = PoolOutcome(
                                outcome.job, None, MemoryLimit(f"{outcome.error}: out-of-memory kill")
                            )
                    yield outcome
        finally:
            for future in pending:
                future.cancel()
            pool.stop()


_END = object()


def _limit_memory(limit_bytes: int) -> None:
    """Pool initializer: caps the worker's address space, so a decompression or allocation bomb fails its own item
    with MemoryError instead of pushing the node into swap or the OOM killer."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(
        resource.RLIMIT_AS, (limit_bytes if hard == resource.RLIM_INFINITY else min(limit_bytes, hard), hard)
    )


def _oom_kills(path: str = "/sys/fs/cgroup/memory.events") -> int:
    """How many processes the kernel has killed for memory in this cgroup (v2), 0 where it cannot tell."""
    try:
        with open(path) as f:
            return next((int(line.split()[1]) for line in f if line.startswith("oom_kill ")), 0)
    except (OSError, ValueError, IndexError):
        return 0


# What native libraries say when an allocation fails under the cap: onnxruntime and other C++ code rethrow
# std::bad_alloc as a RuntimeError; FFmpeg's ENOMEM is already a MemoryError subclass (av.MemoryError).
_OUT_OF_MEMORY_MESSAGES = ("bad_alloc", "bad allocation", "failed to allocate memory", "cannot allocate memory")


def _outcome(job: J, future: Future, timeout_s: float, memory_limit_bytes: int = 0) -> PoolOutcome:
    try:
        return PoolOutcome(job, future.result(), None)
    except FutureTimeout:
        return PoolOutcome(job, None, ItemTimeout(f"no result within {timeout_s:g} s; worker killed"))
    except ProcessExpired as exc:
        return PoolOutcome(job, None, WorkerCrashed(f"worker process died (exit code {exc.exitcode})", exc.exitcode))
    except MemoryError as exc:
        cap = f"the {memory_limit_bytes / 2**30:g} GiB per-worker cap" if memory_limit_bytes else "no per-worker cap"
        return PoolOutcome(job, None, MemoryLimit(f"out of memory under {cap}: {type(exc).__name__} {exc}".strip()))
    except Exception as exc:
        if memory_limit_bytes and any(m in str(exc).lower() for m in _OUT_OF_MEMORY_MESSAGES):
            limit = f"{memory_limit_bytes / 2**30:g} GiB"
            return PoolOutcome(job, None, MemoryLimit(f"out of memory under the {limit} per-worker cap: {exc}"))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the machine's failure, not the item's: the stage stops instead of dead-lettering everything
        return PoolOutcome(job, None, exc)  # the item's own failure; the shard goes on
