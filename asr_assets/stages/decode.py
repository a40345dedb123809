"""audio_wav: every indexed object probed and decoded to 16 kHz mono FLAC in worker processes, or dead-lettered."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from asr_assets import failures, layout
from asr_assets.failures import BugGuard, RetryBudget, TransientFailure
from asr_assets.media import DecodeJob, DecodeResult, decode_media
from asr_assets.pool import run_pool
from asr_assets.records import (
    AUDIO_SCHEMA,
    AudioRow,
    DeadLetterRow,
    to_table,
)
from asr_assets.stages.common import PoolSettings, StageReport, dead_letter_state, error_of
from resources.storage import (
    ObjectStore,
    StorageAuthError,
    is_out_of_space,
    read_table,
    write_table,
)


@dataclass(frozen=True)
class DecodeSettings:
    """Limits for decoding. Files over ``max_bytes`` or ``max_duration_s`` are dead-lettered, not decoded."""

    max_bytes: int
    max_duration_s: float
    max_damaged_fraction: float = 0.2


def decode_shard(
    source: ObjectStore,
    out: ObjectStore,
    shard: str,
    settings: DecodeSettings,
    pool: PoolSettings,
    budget: RetryBudget | None = None,
) -> StageReport:
    """Decodes every indexed media object without an outcome to ``audio_wav/{shard}/{media_id}.flac``.

    Failures follow the taxonomy (asr_assets/failures.py): a fetch that fails the way a network does is retried
    within ``budget`` and then fails the step (:class:`TransientFailure`, nothing dead-lettered); a worker timeout or
    crash is retried alone up to three attempts; bad input is dead-lettered at once. Items whose old dead letter is not
    final are retried, and their row is removed when they succeed.
    """
    started = time.perf_counter()
    budget = budget or RetryBudget()
    report = StageReport()
    index_parts = layout.index_part_keys(out, shard)
    index = layout.read_index(out, shard, index_parts)
    manifest = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    decoded = set(manifest.filter(pc.equal(manifest["status"], "decoded"))["media_id"].to_pylist())
    superseded = set(manifest.filter(pc.equal(manifest["status"], "superseded"))["media_id"].to_pylist())
    guard = BugGuard("audio_wav", shard, fresh=not decoded)
    # Dead letters count as outcomes only when final (written first, so a crash between the two writes does not run
    # a failed item again); transient and not-yet-exhausted suspect ones are retried.
    letters = dead_letter_state(out, "audio_wav", shard, decoded | superseded)
    retried, attempts = letters.retried, letters.attempts
    done = decoded | letters.final | superseded
    todo = [r for r in index.to_pylist() if r["media_id"] not in done]
    scratch = out.scratch_dir()
    rows: list[AudioRow] = []
    dead: list[DeadLetterRow] = []
    # A version replaced before it was decoded: its bytes are gone (the object holds the newer version, which has its
    # own id and row), so it is recorded as superseded instead of decoding the new bytes under the old id.
    retired = layout.retired_media(index)
    for row in (r for r in todo if r["media_id"] in retired):
        message = (
            f"audio_wav: media {row['media_id']} ({row['uri']}): replaced by a newer version before it was decoded"
        )
        rows.append(_audio_row_superseded(row, message))
        report.processed += 1
    todo = [r for r in todo if r["media_id"] not in retired]

    def fail(row: dict, kind: str, message: str, unexpected: bool = False) -> None:
        # The real count: a suspect kind's attempts were counted as they failed (_retry_alone), any other is one more.
        suspect = failures.classify(kind) == failures.SUSPECT
        attempt = attempts.get(row["media_id"], 1) if suspect else attempts.get(row["media_id"], 0) + 1
        rows.append(_audio_row_failed(row, kind, message))
        dead.append(layout.dead_letter(row["media_id"], row["uri"], "audio_wav", kind, message, attempt))
        guard.failed(kind, message, unexpected, row["media_id"])
        report.fail(kind)

    def fetch(row: dict) -> Path | None:
        where = f"audio_wav: media {row['media_id']} ({row['uri']})"
        if row["size"] > settings.max_bytes:  # refused before any download: the index knows the size
            fail(row, "TooLarge", f"{where}: file is {row['size']} bytes, over the {settings.max_bytes}-byte limit")
            return None
        try:
            return budget.call(
                lambda: source.local_path(row["key"], max_bytes=settings.max_bytes, version=row["version"] or "")
            )
        except FileNotFoundError as exc:
            fail(row, "Missing", f"{where}: the object is gone: {exc}")
        except Exception as exc:
            if is_out_of_space(exc) or isinstance(exc, StorageAuthError):
                raise  # a full cache disk or refused credentials: the step's failure, not the file's
            if failures.is_transient_error(exc):
                raise TransientFailure("audio_wav", shard, len(todo) - report.processed, exc) from exc
            fail(row, getattr(exc, "kind", "Unfetchable"), f"{where}: cannot fetch it: {exc}")  # e.g. unsafe key
        return None

    def jobs(queue: list[dict]) -> Iterator[DecodeJob]:
        for row in queue:
            src = fetch(row)
            if src is not None:
                yield DecodeJob(
                    media_id=row["media_id"],
                    uri=row["uri"],
                    src=src,
                    dst=scratch / f"{shard}-{row['media_id']}.flac",
                    max_bytes=settings.max_bytes,
                    max_duration_s=settings.max_duration_s,
                    max_damaged_fraction=settings.max_damaged_fraction,
                )

    def flush(final_flush: bool = False) -> None:
        nonlocal manifest
        if rows and guard.may_flush(final_flush):
            new = to_table(rows, AUDIO_SCHEMA)
            ok_ids = {r.media_id for r in rows if r.status in ("decoded", "superseded")}
            layout.append_dead_letters(out, "audio_wav", shard, dead)
            # One row per item: a retried item's new outcome replaces its old failed row.
            manifest = manifest.filter(pc.invert(pc.is_in(manifest["media_id"], value_set=new["media_id"])))
            manifest = pa.concat_tables([manifest, new])
            write_table(out, layout.audio_manifest_key(shard), manifest)
            layout.remove_dead_letters(out, "audio_wav", shard, ok_ids & retried)  # after the result that replaces it
            rows.clear()
            dead.clear()

    by_id = {r["media_id"]: r for r in todo}
    queue = todo
    try:
        while queue:
            again: list[dict] = []
            for outcome in run_pool(
                decode_media,
                jobs(queue),
                workers=pool.workers,
                timeout_s=pool.timeout_s,
                memory_limit_bytes=pool.memory_limit_bytes,
            ):
                job: DecodeJob = outcome.job
                result: DecodeResult | None = outcome.result
                if result is not None and result.error_class is None:
                    key = layout.audio_key(shard, job.media_id)
                    out.put_file(key, job.dst)
                    rows.append(_audio_row(job, result, "decoded", key))
                    guard.ok()
                    report.ok(result.duration_s or 0.0)
                else:
                    job.dst.unlink(missing_ok=True)
                    unexpected = result is None and failures.is_unexpected(outcome.error)
                    if result is None:
                        kind, message = error_of(outcome)
                        if isinstance(outcome.error, FileNotFoundError):
                            # Gone from the source: Missing. Still there: the local copy vanished under the worker
                            # (a download cache another process evicted), worth another fetch.
                            unexpected = False
                            kind = "WorkerIOError" if _still_listed(source, by_id[job.media_id]) else "Missing"
                        message = f"audio_wav: media {job.media_id} ({job.uri}): {message}"
                        result = DecodeResult(job.media_id, "unknown", kind, message)
                    if _retry_alone(result.error_class, job.media_id, attempts):
                        again.append(by_id[job.media_id])  # fetched again: a new local copy
                        continue
                    fail(by_id[job.media_id], result.error_class, result.error, unexpected)
                    rows[-1] = _audio_row(job, result, "failed", None)  # keeps what the worker learned
                if len(rows) >= pool.checkpoint_every:
                    flush()
            queue = again
    except TransientFailure:
        flush(final_flush=True)  # what finished stays finished; the rest is pending
        raise
    flush(final_flush=True)
    # After the manifest: what the step covered. A crash in between leaves the older record, which covers less, so the
    # check only ever counts too many rows as arrived since (see checks.reconcile_audio), never one as lost.
    out.put_bytes(layout.audio_index_seen_key(shard), json.dumps({"index_parts": index_parts}).encode())
    if report.processed:
        report.outputs.append(layout.audio_manifest_key(shard))
    statuses = Counter(manifest["status"].to_pylist())
    report.totals = {
        "media": index.num_rows,
        "decoded": statuses["decoded"],
        "failed": statuses["failed"],
        "superseded": statuses["superseded"],
        "hours": (pc.sum(manifest["duration_s"]).as_py() or 0.0) / 3600,
    }
    report.seconds = time.perf_counter() - started
    return report


def _retry_alone(kind: str, media_id: str, attempts: dict[str, int]) -> bool:
    """Counts a suspect failure (timeout, crash, memory, I/O in the worker) as an attempt; whether the item gets
    another one."""
    if failures.classify(kind) != failures.SUSPECT:
        return False
    attempts[media_id] = attempts.get(media_id, 0) + 1
    return attempts[media_id] < failures.MAX_ATTEMPTS


def _still_listed(source: ObjectStore, row: dict) -> bool:
    try:
        return source.exists(row["key"])
    except Exception:  # the store cannot say: do not call it missing for good
        return True


def _audio_row_superseded(row: dict, message: str) -> AudioRow:
    return AudioRow(
        row["media_id"], row["uri"], "superseded", None, None, "unknown", None, None, None, None, None, message, 0.0
    )


def _audio_row_failed(row: dict, kind: str, message: str) -> AudioRow:
    return AudioRow(
        row["media_id"],
        row["uri"],
        "failed",
        None,
        None,
        "unknown",
        None,
        None,
        None,
        None,
        kind,
        message,
        0.0,
        None,
        None,
    )


def _audio_row(job: DecodeJob, result: DecodeResult, status: str, key: str | None) -> AudioRow:
    return AudioRow(
        media_id=job.media_id,
        uri=job.uri,
        status=status,
        audio_key=key,
        duration_s=result.duration_s if status == "decoded" else None,
        detected_format=result.detected_format,
        container=result.container,
        codec=result.codec,
        source_sample_rate=result.source_sample_rate,
        source_channels=result.source_channels,
        error_class=result.error_class,
        error=result.error,
        seconds=result.seconds,
        gap_s=result.gap_s,
        skipped_packets=result.skipped_packets,
        pcm_sha256=result.pcm_sha256 if status == "decoded" else None,
    )
