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
    """The worker process died while handling the item (signal or hard exit)."""

    kind = "WorkerCrashed"


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
    """
    limit = max_in_flight or 2 * workers
    job_iter = iter(jobs)
    pending: dict[Future, J] = {}
    with ProcessPool(max_workers=workers, context=multiprocessing.get_context("spawn")) as pool:
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
                    yield _outcome(pending.pop(future), future, timeout_s)
        finally:
            for future in pending:
                future.cancel()
            pool.stop()


_END = object()


def _outcome(job: J, future: Future, timeout_s: float) -> PoolOutcome:
    try:
        return PoolOutcome(job, future.result(), None)
    except FutureTimeout:
        return PoolOutcome(job, None, ItemTimeout(f"no result within {timeout_s:g} s; worker killed"))
    except ProcessExpired as exc:
        return PoolOutcome(job, None, WorkerCrashed(f"worker process died (exit code {exc.exitcode})"))
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the machine's failure, not the item's: the stage stops instead of dead-lettering everything
        return PoolOutcome(job, None, exc)  # the item's own failure; the shard goes on
