"""segment_features: each segment cut, measured and packed into the shard's FLAC parts in worker processes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import soundfile as sf

from asr_assets import dnsmos, layout
from asr_assets.pool import run_pool
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
from asr_assets.stages.common import PoolSettings, StageReport, error_of, ids_of
from resources.storage import (
    ObjectStore,
    read_table,
    write_table,
)


@dataclass(frozen=True)
class PackSettings:
    """Packed segment audio: a new FLAC part starts once the current one holds ``part_max_s`` seconds."""

    part_max_s: float = 4 * 3600.0


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

    def append(self, pcm, mel=None, segment_id: str = "") -> tuple[str, int, str | None]:
        """Appends one segment; returns its audio part key, frame offset and log-mel part key."""
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
        self._file.write(pcm)
        self._frames += pcm.shape[0]
        if mel is not None:
            if self._mel is None:
                self._mel = pq.ParquetWriter(self._scratch(mel_key), MEL_SCHEMA, compression="zstd")
            row = {
                "segment_id": [segment_id],
                "n_mels": [mel.shape[0]],
                "frames": [mel.shape[1]],
                "mel": [mel.astype("<f2").tobytes()],
            }
            self._mel.write_table(pa.table(row, schema=MEL_SCHEMA))
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
    dead_table = layout.read_dead_letters(out, "segment_features", shard)
    done = ids_of(features, "segment_id") | ids_of(dead_table, "item_id")
    audio = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    audio_keys = dict(zip(audio["media_id"].to_pylist(), audio["audio_key"].to_pylist(), strict=True))
    uris = dict(zip(audio["media_id"].to_pylist(), audio["uri"].to_pylist(), strict=True))

    by_media: dict[str, list[SegmentSpan]] = {}
    for row in segments.to_pylist():
        if row["segment_id"] not in done:
            by_media.setdefault(row["media_id"], []).append(
                SegmentSpan(row["segment_id"], row["start_s"], row["end_s"], row["prob_mean"], row["prob_min"])
            )
    jobs = (
        CutJob(mid, out.local_path(audio_keys[mid]), tuple(spans), mel_bins, dnsmos_fraction)
        for mid, spans in by_media.items()
    )
    _remove_unreferenced_parts(out, shard, features)
    writer = _PackWriter(out, shard, settings=pack)
    rows: list[FeatureRow] = []
    dead: list[DeadLetterRow] = []

    def flush(final: bool) -> None:
        """Checkpoint: dead letters, then the feature rows whose packed part is already in the store."""
        nonlocal features
        still_open = None if final else writer.open_part_key
        ready = [r for r in rows if r.audio_key != still_open]
        if not ready and not dead:
            return
        layout.append_dead_letters(out, "segment_features", shard, dead)
        dead.clear()
        features = pa.concat_tables([features, to_table(ready, FEATURE_SCHEMA)])
        write_table(out, layout.features_key(shard), features)
        rows[:] = [r for r in rows if r.audio_key == still_open]

    closed_parts = 0
    try:
        for outcome in run_pool(cut_and_measure, jobs, workers=pool.workers, timeout_s=pool.timeout_s):
            job: CutJob = outcome.job
            measured: list[Measured] | None = outcome.result
            if measured is None:
                kind, message = error_of(outcome)
                message = f"segment_features: media {job.media_id} ({uris[job.media_id]}): {message}"
                for span in job.spans:
                    dead.append(
                        layout.dead_letter(span.segment_id, uris[job.media_id], "segment_features", kind, message)
                    )
                    report.fail(kind)
                continue
            for m in measured:
                key, offset, mel_key = writer.append(m.pcm, m.mel, m.span.segment_id)
                rows.append(_feature_row(job.media_id, m, key, offset, mel_key))
                report.ok(m.pcm.shape[0] / SAMPLE_RATE)
            if len(writer.written) > closed_parts or len(dead) >= pool.checkpoint_every:
                closed_parts = len(writer.written)
                flush(final=False)
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
        duration_s=m.pcm.shape[0] / SAMPLE_RATE,
        rms_dbfs=m.rms_dbfs,
        peak_dbfs=m.peak_dbfs,
        clip_ratio=m.clip_ratio,
        snr_db=m.snr_db,
        prob_mean=m.span.prob_mean,
        prob_min=m.span.prob_min,
        audio_key=key,
        audio_offset=offset,
        audio_frames=m.pcm.shape[0],
        mel_key=mel_key,
        dnsmos_sig=None if m.dnsmos is None else m.dnsmos.sig,
        dnsmos_bak=None if m.dnsmos is None else m.dnsmos.bak,
        dnsmos_ovrl=None if m.dnsmos is None else m.dnsmos.ovrl,
    )
