"""The failure taxonomy: which error kinds dead-letter an item, which are retried, and for how long.

Every error kind a stage records is one of three classes:

- ``permanent``: the input is bad (a MediaError kind such as ``DecodeError``, ``Missing``, ``TooLarge``, or any kind
  not named here). Dead-lettered at once, never retried.
- ``transient``: the world is failing (``FetchError``, ``UnreadableAudio``, ``StorageError``). Retried with backoff
  inside the run until a deadline; then the step fails with :class:`TransientFailure` and the item stays pending for
  the next run. Never a final dead letter (a row of such a kind left by an older version is retried).
- ``suspect``: the item or the machine (``Timeout``, ``WorkerCrashed``, ``MemoryLimit``, ``EngineCallFailed``).
  Retried alone up to :data:`MAX_ATTEMPTS` attempts, then dead-lettered with the real attempt count.

A dead letter is an item's final outcome only when :func:`is_final` says so; stages count only those as done, so the
next run retries the others and removes their rows once they succeed.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pyarrow as pa

PERMANENT, TRANSIENT, SUSPECT = "permanent", "transient", "suspect"
MAX_ATTEMPTS = 3
TRANSIENT_KINDS = frozenset({"FetchError", "UnreadableAudio", "StorageError"})
SUSPECT_KINDS = frozenset(
    {
        "Timeout",
        "WorkerCrashed",
        "MemoryLimit",
        "EngineCallFailed",
        # An I/O error inside a worker (EIO on a network mount, a local copy another process evicted): the file may
        # well read next time.
        "WorkerIOError",
        "OSError",
        "TimeoutError",
        "ConnectionError",
        "ConnectionResetError",
        "BrokenPipeError",
        "InterruptedError",
    }
)
# A stage whose every item failed with one suspect kind (say MemoryLimit under a cap set too low) is the machine's or
# the configuration's failure once it has hit this many items; fewer may be a few genuinely hostile files.
SUSPECT_BROKEN_AT = 5
DEFAULT_DEADLINE_S = 900.0

T = TypeVar("T")


def classify(kind: str) -> str:
    """The class of an error kind; anything not named transient or suspect is permanent (bad input)."""
    if kind in TRANSIENT_KINDS:
        return TRANSIENT
    if kind in SUSPECT_KINDS:
        return SUSPECT
    return PERMANENT


def is_final(kind: str, attempt: int) -> bool:
    """Whether a dead letter of this kind after ``attempt`` attempts is the item's last word."""
    cls = classify(kind)
    return cls == PERMANENT or (cls == SUSPECT and attempt >= MAX_ATTEMPTS)


def final_ids(dead: pa.Table) -> set[str]:
    """Items whose dead letter is final (their outcome); the others are pending and retried."""
    return {
        r["item_id"]
        for r in dead.select(["item_id", "error_class", "attempt"]).to_pylist()
        if is_final(r["error_class"], r["attempt"] or 1)
    }


def prior_attempts(dead: pa.Table) -> dict[str, int]:
    """Attempts already spent on each pending (non-final) suspect item, from its dead-letter row."""
    return {
        r["item_id"]: r["attempt"] or 1
        for r in dead.select(["item_id", "error_class", "attempt"]).to_pylist()
        if classify(r["error_class"]) == SUSPECT and not is_final(r["error_class"], r["attempt"] or 1)
    }


def is_unexpected(exc: BaseException) -> bool:
    """An exception that names no error kind: a code bug (TypeError, KeyError...) rather than a known input failure."""
    return not hasattr(exc, "kind")


def is_transient_error(exc: BaseException) -> bool:
    """Whether a store call failed the way a network or an overloaded service does: worth retrying."""
    from resources.storage import StorageAuthError, is_out_of_space

    if isinstance(exc, FileNotFoundError | StorageAuthError | IsADirectoryError) or is_out_of_space(exc):
        return False
    if getattr(exc, "transient", True) is False:  # StorageRefused: a 4xx that retrying cannot fix
        return False
    return isinstance(exc, OSError)


def transient_deadline_s() -> float:
    """How long one item's transient failures are retried inside a run: ``$ASR_TRANSIENT_DEADLINE_S`` (default 900)."""
    value = os.environ.get("ASR_TRANSIENT_DEADLINE_S", "")
    return float(value) if value.strip() else DEFAULT_DEADLINE_S


@dataclass(frozen=True)
class RetryBudget:
    """Exponential backoff with full jitter until ``deadline_s`` after the first failure of one call.

    Attempt n (from 0) waits a random time in ``[0, min(max_delay_s, base_delay_s * 2**n)]``; a wait that would end
    past the deadline is not taken and the last error is raised instead.
    """

    deadline_s: float = field(default_factory=transient_deadline_s)
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def call(
        self,
        fn: Callable[[], T],
        retryable: Callable[[BaseException], bool] = is_transient_error,
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """``fn()``, retried while it raises a ``retryable`` error and time is left; raises the last error after."""
        ends = time.monotonic() + self.deadline_s
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                if not retryable(exc):
                    raise
                delay = self.delay(attempt)
                if time.monotonic() + delay > ends:
                    raise
                sleep(delay)
                attempt += 1

    def delay(self, attempt: int) -> float:
        """The jittered wait before retry ``attempt`` (from 0)."""
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))


class TransientFailure(RuntimeError):
    """The step's store or engine kept failing past the retry deadline. Nothing was dead-lettered for it: the items
    stay pending and the next run of the partition retries them."""

    def __init__(self, stage: str, shard: str, pending: int, cause: BaseException | str) -> None:
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        super().__init__(
            f"{stage} on {shard}: {pending} item(s) stay pending after retrying past the deadline "
            f"(ASR_TRANSIENT_DEADLINE_S): {reason}; nothing was dead-lettered for it. Re-run the partition once the "
            "store answers again"
        )
        self.pending = pending


class StageBroken(RuntimeError):
    """Every item of a stage run failed with the same unexpected error and none succeeded: a bug in the code or the
    install, not bad input. Fails the step before anything is dead-lettered, so the items stay pending."""


class BugGuard:
    """Holds back a stage's checkpoints while every item so far failed with one unexpected (bug-like) error.

    A stage calls :meth:`ok` for each success and :meth:`failed` for each failure, and asks :meth:`may_flush` before
    writing dead letters; at the end of the run, ``may_flush(final=True)`` raises :class:`StageBroken` when at least
    two items failed, all with the same unexpected error, and none succeeded. On a shard where the stage has never
    succeeded (``fresh``), one suspect kind failing :data:`SUSPECT_BROKEN_AT` distinct items and nothing else (say
    ``MemoryLimit`` under a cap set too low) counts too; on a shard with earlier successes such failures are more
    likely a batch of hostile files, and are dead-lettered after their attempts as usual.
    """

    def __init__(self, stage: str, shard: str, fresh: bool = False) -> None:
        self.stage, self.shard, self.fresh = stage, shard, fresh
        self.successes = 0
        self.failures = 0
        self.unexpected: dict[str, str] = {}  # kind -> first message
        self.items: set[str] = set()  # distinct items that failed suspiciously
        self.expected_failures = 0

    def ok(self) -> None:
        self.successes += 1

    def failed(self, kind: str, message: str, unexpected: bool, item: str = "") -> None:
        self.failures += 1
        if unexpected or (self.fresh and classify(kind) == SUSPECT):
            self.unexpected.setdefault(kind, message)
            self.items.add(item or str(self.failures))
        else:
            self.expected_failures += 1

    def _suspicious(self) -> bool:
        return not self.successes and not self.expected_failures and len(self.unexpected) == 1

    def may_flush(self, final: bool = False) -> bool:
        """Whether the stage may write its checkpoint now; raises StageBroken at the end of a broken run."""
        if not self._suspicious():
            return True
        if not final:
            return False
        kind, message = next(iter(self.unexpected.items()))
        suspect = classify(kind) == SUSPECT
        # A suspect kind counts distinct items (one long file's segments are one file), a bug every failure.
        count = len(self.items) if suspect else self.failures
        if count >= (SUSPECT_BROKEN_AT if suspect else 2):
            raise StageBroken(
                f"{self.stage} on {self.shard}: every one of {count} items failed with the same unexpected "
                f"error {kind} ({message}) and none succeeded: a bug, a broken install or a limit set too low, not bad "
                "input. Nothing was dead-lettered; fix it and re-run the partition"
            )
        return True
