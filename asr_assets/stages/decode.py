"""audio_wav: every indexed object probed and decoded to 16 kHz mono FLAC in worker processes, or dead-lettered."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from asr_assets import layout
from asr_assets.media import DecodeJob, DecodeResult, decode_media
from asr_assets.pool import run_pool
from asr_assets.records import (
    AUDIO_SCHEMA,
    AudioRow,
    DeadLetterRow,
    to_table,
)
from asr_assets.stages.common import PoolSettings, StageReport, error_of, ids_of
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
    source: ObjectStore, out: ObjectStore, shard: str, settings: DecodeSettings, pool: PoolSettings
) -> StageReport:
    """Decodes every indexed media object without an outcome to ``audio_wav/{shard}/{media_id}.flac``."""
    started = time.perf_counter()
    report = StageReport()
    index = layout.read_index(out, shard)
    manifest = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    # Dead letters count as outcomes too: they are written first, so a crash between the two writes must not make an
    # item run again (and perhaps end both decoded and dead-lettered).
    done = ids_of(manifest, "media_id") | ids_of(layout.read_dead_letters(out, "audio_wav", shard), "item_id")
    todo = [r for r in index.to_pylist() if r["media_id"] not in done]
    scratch = out.scratch_dir()
    rows: list[AudioRow] = []
    dead: list[DeadLetterRow] = []

    def jobs() -> Iterator[DecodeJob]:
        for row in todo:
            try:
                src = source.local_path(row["key"])
            except Exception as exc:  # unreadable object (missing, refused, unsafe): this item's outcome only
                if is_out_of_space(exc) or isinstance(exc, StorageAuthError):
                    raise  # a full cache disk or refused credentials: the step's failure, not the file's
                message = f"audio_wav: media {row['media_id']} ({row['uri']}): cannot fetch it: {exc}"
                rows.append(_audio_row_failed(row, "FetchError", message))
                dead.append(layout.dead_letter(row["media_id"], row["uri"], "audio_wav", "FetchError", message))
                report.fail("FetchError")
                continue
            yield DecodeJob(
                media_id=row["media_id"],
                uri=row["uri"],
                src=src,
                dst=scratch / f"{shard}-{row['media_id']}.flac",
                max_bytes=settings.max_bytes,
                max_duration_s=settings.max_duration_s,
                max_damaged_fraction=settings.max_damaged_fraction,
            )

    def flush() -> None:
        nonlocal manifest
        if rows:
            manifest = pa.concat_tables([manifest, to_table(rows, AUDIO_SCHEMA)])
            layout.append_dead_letters(out, "audio_wav", shard, dead)
            write_table(out, layout.audio_manifest_key(shard), manifest)
            rows.clear()
            dead.clear()

    for outcome in run_pool(
        decode_media, jobs(), workers=pool.workers, timeout_s=pool.timeout_s, memory_limit_bytes=pool.memory_limit_bytes
    ):
        job: DecodeJob = outcome.job
        result: DecodeResult | None = outcome.result
        if result is not None and result.error_class is None:
            key = layout.audio_key(shard, job.media_id)
            out.put_file(key, job.dst)
            rows.append(_audio_row(job, result, "decoded", key))
            report.ok(result.duration_s or 0.0)
        else:
            job.dst.unlink(missing_ok=True)
            if result is None:
                kind, message = error_of(outcome)
                message = f"audio_wav: media {job.media_id} ({job.uri}): {message}"
                result = DecodeResult(job.media_id, "unknown", kind, message)
            rows.append(_audio_row(job, result, "failed", None))
            dead.append(layout.dead_letter(job.media_id, job.uri, "audio_wav", result.error_class, result.error))
            report.fail(result.error_class)
        if len(rows) >= pool.checkpoint_every:
            flush()
    flush()
    if report.processed:
        report.outputs.append(layout.audio_manifest_key(shard))
    statuses = Counter(manifest["status"].to_pylist())
    report.totals = {
        "media": index.num_rows,
        "decoded": statuses["decoded"],
        "failed": statuses["failed"],
        "hours": (pc.sum(manifest["duration_s"]).as_py() or 0.0) / 3600,
    }
    report.seconds = time.perf_counter() - started
    return report


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
    )
