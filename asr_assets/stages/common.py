"""What every stage shares: the run report, pool settings and small helpers."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from asr_assets import failures, layout
from asr_assets.pool import PoolOutcome
from resources.storage import ObjectStore


@dataclass
class StageReport:
    """What one stage run did on one shard; the asset turns it into Dagster metadata.

    Attributes:
        processed: items this run gave an outcome to.
        succeeded: of those, how many succeeded.
        failed: of those, how many were dead-lettered.
        errors: failures by error kind.
        audio_s: seconds of audio this run handled.
        seconds: wall time of the run.
        totals: whole-shard counts after the run (what the shard holds now).
        outputs: keys written.
    """

    processed: int = 0
    succeeded: int = 0
    failed: int = 0
    errors: Counter = field(default_factory=Counter)
    audio_s: float = 0.0
    seconds: float = 0.0
    totals: dict[str, float | int | str] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    def merge(self, other: StageReport) -> None:
        """Adds another shard's report (a run over several shards); totals stay per shard, so they are dropped."""
        self.processed += other.processed
        self.succeeded += other.succeeded
        self.failed += other.failed
        self.errors.update(other.errors)
        self.audio_s += other.audio_s
        self.seconds += other.seconds
        self.outputs.extend(other.outputs)

    def fail(self, kind: str) -> None:
        self.processed += 1
        self.failed += 1
        self.errors[kind] += 1

    def ok(self, audio_s: float = 0.0) -> None:
        self.processed += 1
        self.succeeded += 1
        self.audio_s += audio_s


@dataclass(frozen=True)
class PoolSettings:
    """Worker processes and per-item limits for a CPU stage (``memory_limit_bytes``: each worker's cap, 0 for none)."""

    workers: int
    timeout_s: float
    checkpoint_every: int = 200
    memory_limit_bytes: int = 0


def ids_of(table: pa.Table, column: str) -> set[str]:
    return set(table.column(column).to_pylist())


def error_of(outcome: PoolOutcome) -> tuple[str, str]:
    exc = outcome.error
    assert exc is not None
    return getattr(exc, "kind", type(exc).__name__), str(exc)


@dataclass(frozen=True)
class DeadLetterState:
    """A stage's dead letters on a shard, read against the items that have a result.

    Attributes:
        final: items whose dead letter is their outcome (permanent kinds, suspect ones out of attempts).
        retried: items whose dead letter is not final: they are work again, and their row goes once they succeed.
        attempts: attempts already spent on each pending suspect item.
    """

    final: set[str]
    retried: set[str]
    attempts: dict[str, int]


def dead_letter_state(out: ObjectStore, stage: str, shard: str, succeeded: set[str]) -> DeadLetterState:
    """Reads the stage's dead letters and finishes what a crash may have left: a retried item whose result was
    written before its old dead letter was removed has that row removed now (results win)."""
    table = layout.read_dead_letters(out, stage, shard)
    ids = ids_of(table, "item_id")
    layout.remove_dead_letters(out, stage, shard, ids & succeeded)
    final = failures.final_ids(table)
    return DeadLetterState(final, ids - final - succeeded, failures.prior_attempts(table))
