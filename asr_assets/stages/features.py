"""segment_features: each segment cut, measured and packed into the shard's FLAC parts in worker processes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import soundfile as sf

from asr_assets import dedup, dnsmos, failures, layout
from asr_assets.failures import BugGuard
from asr_assets.pool import PoolOutcome, run_pool
from asr_assets.records import (
    AUDIO_SCHEMA,
    FEATURE_SCHEMA,
    MEL_SCHEMA,
    SAMPLE_RATE,
    SEGMENT_SCHEMA,
    DeadLetterRow,
    FeatureRow,
    to_table,
)
from asr_assets.segments import CutJob, Measured, SegmentSpan, cut_and_measure
from asr_assets.stages.common import PoolSettings, StageReport, dead_letter_state, error_of, ids_of
from resources.storage import (
    ObjectStore,
    read_table,
    write_table,
)


@dataclass(frozen=True)
class PackSettings:
    """Packed segment audio: a new FLAC part starts once the current one holds ``part_max_s`` seconds."""

    part_max_s: float = 4 * 3600.0


COPY_FRAMES = 1 << 16  # samples per read when copying a worker's segments into the packed part (128 KB)


class _PackWriter:
    """Appends segments to packed FLAC parts (and their log-mel features to a Parquet part beside each) in scratch
    space, and moves each finished part into the store. A part is named after its first segment."""

    def __init__(self, out: ObjectStore, shard: str, settings: PackSettings) -> None:
        self._out, self._shard, self._settings = out, shard, settings
        self._first = ""  # the open part's first segment id
        self._file: sf.SoundFile | None = None
        self._mel: pq.ParquetWriter | None = None
        self._frames = 0
        self.written: list[str] = []

    def _scratch(self, key: str) -> Path:
        return self._out.scratch_dir() / key.replace("/", "-")

    @property
    def open_part_key(self) -> str | None:
        """The audio part being written (not yet in the store), if any."""
        return layout.packed_audio_key(self._shard, self._first) if self._file is not None else None

    def append(
        self, pcm: sf.SoundFile, frames: int, mel: pa.Table | None = None, segment_id: str = ""
    ) -> tuple[str, int, str | None]:
        """Appends one segment: ``frames`` 16-bit samples copied from ``pcm``'s read position a block at a time, and
        its log-mel row; returns its audio part key, frame offset and log-mel part key. A new part is named after
        ``segment_id``, its first segment."""
        if self._file is None:
            self._first = segment_id
        audio_key = layout.packed_audio_key(self._shard, self._first)
        mel_key = layout.mel_part_key(self._shard, self._first)
        if self._file is None:
            self._file = sf.SoundFile(
                self._scratch(audio_key), "w", samplerate=SAMPLE_RATE, channels=1, format="FLAC", subtype="PCM_16"
            )
            self._frames = 0
        offset = self._frames
        left = frames
        while left:
            block = pcm.read(min(COPY_FRAMES, left), dtype="int16")
            if not block.shape[0]:
                raise RuntimeError(f"segment_features: {pcm.name} ends {left} samples before its segments do")
            self._file.write(block)
            left -= block.shape[0]
        self._frames += frames
        if mel is not None:
            if self._mel is None:
                self._mel = pq.ParquetWriter(self._scratch(mel_key), MEL_SCHEMA, compression="zstd")
            self._mel.write_table(mel)
        if self._frames >= self._settings.part_max_s * SAMPLE_RATE:
            self.close()
        return audio_key, offset, mel_key if mel is not None else None

    def close(self) -> None:
        """Finishes the open part (if any) and moves it into the store."""
        if self._file is None:
            return
        self._file.close()
        audio_key = layout.packed_audio_key(self._shard, self._first)
        self._out.put_file(audio_key, self._scratch(audio_key))
        self.written.append(audio_key)
        if self._mel is not None:
            self._mel.close()
            mel_key = layout.mel_part_key(self._shard, self._first)
            self._out.put_file(mel_key, self._scratch(mel_key))
            self.written.append(mel_key)
        self._file, self._mel = None, None

    def abort(self) -> None:
        for handle in (self._file, self._mel):
            if handle is not None:
                handle.close()
        for key in (layout.packed_audio_key(self._shard, self._first), layout.mel_part_key(self._shard, self._first)):
            self._scratch(key).unlink(missing_ok=True)
        self._file, self._mel = None, None


def features_shard(
    out: ObjectStore,
    shard: str,
    pack: PackSettings,
    pool: PoolSettings,
    mel_bins: int = 0,
    dnsmos_fraction: float = 0.0,
) -> StageReport:
    """Cuts and measures every segment without a feature row, packing its audio into the shard's FLAC parts (and,
    with ``mel_bins`` 80 or 128, its Whisper log-mel features into Parquet parts beside them). A ``dnsmos_fraction``
    of the segments, chosen by a hash of their id, is scored with DNSMOS; rows already written keep their scores.

    Checkpoints as each part is finished: feature rows are written only after the part they point into is in the
    store, so a crash loses at most the open part's work and leaves an unreferenced part that the re-run removes.
    """
    started = time.perf_counter()
    report = StageReport()
    # Checked here, not in the workers: a missing model is a broken install, not a reason to dead-letter every item.
    dnsmos_sha = dnsmos.model_sha256() if dnsmos_fraction > 0 else None
    segments = read_table(out, layout.segments_key(shard), SEGMENT_SCHEMA)
    features = read_table(out, layout.features_key(shard), FEATURE_SCHEMA)
    guard = BugGuard("segment_features", shard, fresh=features.num_rows == 0)
    featured = ids_of(features, "segment_id")
    letters = dead_letter_state(out, "segment_features", shard, featured)
    retried, attempts = letters.retried, letters.attempts
    done = featured | letters.final
    audio = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    audio_keys = dict(zip(audio["media_id"].to_pylist(), audio["audio_key"].to_pylist(), strict=True))
    uris = dict(zip(audio["media_id"].to_pylist(), audio["uri"].to_pylist(), strict=True))

    by_media: dict[str, list[SegmentSpan]] = {}
    for row in segments.to_pylist():
        if row["segment_id"] not in done:
            by_media.setdefault(row["media_id"], []).append(
                SegmentSpan(row["segment_id"], row["start_s"], row["end_s"], row["prob_mean"], row["prob_min"])
            )
    # Each worker writes its media's segments to scratch files named after the media, in this run's private scratch
    # folder; the step copies them into the packed part and deletes them.
    scratch = out.scratch_dir()

    def jobs(media_ids: list[str]) -> Iterator[CutJob]:
        for mid in media_ids:
            yield CutJob(
                mid,
                out.local_path(audio_keys[mid]),
                tuple(by_media[mid]),
                mel_bins,
                dnsmos_fraction,
                scratch / f"segment_features-{shard}-cut-{mid}",
            )

    _remove_unreferenced_parts(out, shard, features)
    writer = _PackWriter(out, shard, settings=pack)
    rows: list[FeatureRow] = []
    dead: list[DeadLetterRow] = []
    prints: list[pa.Table] = []  # fingerprint rows waiting for their feature rows' checkpoint

    def flush(final: bool) -> None:
        """Checkpoint: dead letters, then the feature rows whose packed part is already in the store."""
        nonlocal features
        still_open = None if final else writer.open_part_key
        ready = [r for r in rows if r.audio_key != still_open]
        if (not ready and not dead) or not guard.may_flush(final):
            return
        layout.append_dead_letters(out, "segment_features", shard, dead)
        dead.clear()
        # Fingerprints before the feature rows: a crash in between leaves rows that the re-cut segment replaces.
        waiting = pa.concat_tables(prints) if prints else dedup.FINGERPRINT_SCHEMA.empty_table()
        is_ready = pc.is_in(waiting["segment_id"], value_set=pa.array([r.segment_id for r in ready], pa.string()))
        dedup.append_fingerprints(out, shard, waiting.filter(is_ready))
        prints[:] = [waiting.filter(pc.invert(is_ready))]
        features = pa.concat_tables([features, to_table(ready, FEATURE_SCHEMA)])
        write_table(out, layout.features_key(shard), features)
        # After the rows that replace them: a crash in between leaves stale rows the next run removes.
        layout.remove_dead_letters(out, "segment_features", shard, {r.segment_id for r in ready} & retried)
        rows[:] = [r for r in rows if r.audio_key == still_open]

    closed_parts = 0
    tries: dict[str, int] = {}  # suspect failures of each media's job in this run

    def failed(job: CutJob, outcome: PoolOutcome, again: list[str]) -> None:
        kind, message = error_of(outcome)
        suspect = failures.classify(kind) == failures.SUSPECT
        if suspect:
            tries[job.media_id] = tries.get(job.media_id, 0) + 1
            prior = max(attempts.get(span.segment_id, 0) for span in job.spans)
            if prior + tries[job.media_id] < failures.MAX_ATTEMPTS:
                again.append(job.media_id)  # retried alone: the worker may have died of another item's load
                return
        message = f"segment_features: media {job.media_id} ({uris[job.media_id]}): {message}"
        for span in job.spans:
            attempt = attempts.get(span.segment_id, 0) + (tries.get(job.media_id, 0) if suspect else 1)
            dead.append(
                layout.dead_letter(span.segment_id, uris[job.media_id], "segment_features", kind, message, attempt)
            )
            guard.failed(kind, message, failures.is_unexpected(outcome.error), job.media_id)
            report.fail(kind)

    queue = list(by_media)
    try:
        while queue:
            again: list[str] = []
            for outcome in run_pool(
                cut_and_measure,
                jobs(queue),
                workers=pool.workers,
                timeout_s=pool.timeout_s,
                memory_limit_bytes=pool.memory_limit_bytes,
            ):
                job: CutJob = outcome.job
                measured: list[Measured] | None = outcome.result
                if measured is None:
                    _remove_scratch(job)  # a failed or killed worker may have left them half written
                    failed(job, outcome, again)
                    continue
                prints.append(dedup.fingerprint_rows(measured, job.media_id))
                for m, (key, offset, mel_key) in zip(measured, _append_job(writer, job, measured), strict=True):
                    rows.append(_feature_row(job.media_id, m, key, offset, mel_key))
                    guard.ok()
                    report.ok(m.frames / SAMPLE_RATE)
                if len(writer.written) > closed_parts or len(dead) >= pool.checkpoint_every:
                    closed_parts = len(writer.written)
                    flush(final=False)
            queue = again
        writer.close()
    except BaseException:
        writer.abort()
        raise
    flush(final=True)
    if report.processed:
        report.outputs += [*writer.written, layout.features_key(shard)]
    report.totals = {
        "segments": segments.num_rows,
        "featured": features.num_rows,
        "hours": (pc.sum(features["duration_s"]).as_py() or 0.0) / 3600,
        "dnsmos_scored": features.num_rows - features["dnsmos_ovrl"].null_count,
    }
    if dnsmos_sha is not None:
        report.totals["dnsmos_model_sha256"] = dnsmos_sha
    report.seconds = time.perf_counter() - started
    return report


def _append_job(writer: _PackWriter, job: CutJob, measured: list[Measured]) -> list[tuple[str, int, str | None]]:
    """Copies a worker's segments from its scratch files into the packed part, one segment at a time, then deletes
    the scratch files; returns where each segment went (audio part key, frame offset, log-mel part key)."""
    assert job.audio_out is not None
    placed = []
    try:
        with sf.SoundFile(job.audio_out) as pcm, contextlib.ExitStack() as stack:
            mels = None if job.mel_out is None else stack.enter_context(pq.ParquetFile(job.mel_out))
            for i, m in enumerate(measured):
                placed.append(
                    writer.append(pcm, m.frames, None if mels is None else mels.read_row_group(i), m.span.segment_id)
                )
    finally:
        _remove_scratch(job)
    return placed


def _remove_scratch(job: CutJob) -> None:
    for path in (job.audio_out, job.mel_out):
        if path is not None:
            path.unlink(missing_ok=True)


def _remove_unreferenced_parts(out: ObjectStore, shard: str, features: pa.Table) -> None:
    """Deletes parts no feature row points into: published by a step killed before its rows were (its segments are
    cut again, perhaps into parts named differently). Only this step writes here, under its lease."""
    referenced = set(features["audio_key"].to_pylist()) | set(features["mel_key"].drop_null().to_pylist())
    for info in out.list(f"{layout.FOLDERS['segment_features']}/{shard}/"):
        name = info.key.rsplit("/", 1)[-1]
        if name.startswith(("part-", "mel-part-")) and info.key not in referenced:
            out.delete(info.key)


def _feature_row(media_id: str, m: Measured, key: str, offset: int, mel_key: str | None) -> FeatureRow:
    return FeatureRow(
        segment_id=m.span.segment_id,
        media_id=media_id,
        start_s=m.span.start_s,
        end_s=m.span.end_s,
        duration_s=m.frames / SAMPLE_RATE,
        rms_dbfs=m.rms_dbfs,
        peak_dbfs=m.peak_dbfs,
        clip_ratio=m.clip_ratio,
        snr_db=m.snr_db,
        prob_mean=m.span.prob_mean,
        prob_min=m.span.prob_min,
        audio_key=key,
        audio_offset=offset,
        audio_frames=m.frames,
        mel_key=mel_key,
        dnsmos_sig=None if m.dnsmos is None else m.dnsmos.sig,
        dnsmos_bak=None if m.dnsmos is None else m.dnsmos.bak,
        dnsmos_ovrl=None if m.dnsmos is None else m.dnsmos.ovrl,
    )
