"""Cut VAD segments out of decoded audio and measure them (``segment_features``).

Runs inside pool workers (import-light, no Dagster). A worker reads each segment by seeking in the decoded FLAC and
writes the segments' 16-bit samples (and their log-mel features) to scratch files of its own; the step copies them into
one packed FLAC per run so the teacher reads a few large objects sequentially instead of millions of small ones.
Neither the worker nor the step holds more than one segment (or a 1 M-sample chunk of a gap), however long the file.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf

from asr_assets import dnsmos, fingerprint
from asr_assets.dnsmos import DnsmosScore
from asr_assets.logmel import log_mel, num_frames
from asr_assets.records import MEL_SCHEMA, SAMPLE_RATE

SILENCE_DBFS = -120.0  # floor for digital silence, instead of -inf
MIN_NOISE_S = 0.5  # the noise floor needs at least this much non-speech audio
CLIP_LEVEL = 0.999
LOW_SPACE_BYTES = 1 << 20  # a write error with less free space than this is a full disk


@dataclass(frozen=True)
class SegmentSpan:
    """A segment to cut: its id, bounds in seconds and VAD probability stats."""

    segment_id: str
    start_s: float
    end_s: float
    prob_mean: float
    prob_min: float


@dataclass(frozen=True)
class CutJob:
    """All segments of one media object, cut in one pass over its audio.

    Attributes:
        scratch: where the worker writes the segments' samples (``scratch`` + ``.flac``, 16-bit, in segment order) and,
            with ``mel_bins``, their log-mel rows (``scratch`` + ``.mel.parquet``, one row group per segment); None:
            measure only, write nothing.
        mel_bins: Whisper log-mel bins to compute (0: none).
        dnsmos_fraction: the fraction of segments (chosen by a hash of their id) to score with DNSMOS (0: none).
    """

    media_id: str
    audio_path: Path
    spans: tuple[SegmentSpan, ...]
    mel_bins: int = 0
    dnsmos_fraction: float = 0.0
    scratch: Path | None = None

    @property
    def audio_out(self) -> Path | None:
        """The scratch FLAC of the segments' samples."""
        return None if self.scratch is None else self.scratch.with_name(self.scratch.name + ".flac")

    @property
    def mel_out(self) -> Path | None:
        """The scratch Parquet of the segments' log-mel rows."""
        if self.scratch is None or not self.mel_bins:
            return None
        return self.scratch.with_name(self.scratch.name + ".mel.parquet")


@dataclass(frozen=True)
class Measured:
    """One cut segment: its measurements; its samples are in the job's scratch FLAC.

    Attributes:
        span: the segment.
        rms_dbfs: RMS level in dBFS.
        peak_dbfs: peak level in dBFS.
        clip_ratio: fraction of samples at or above 0.999 full scale.
        snr_db: RMS of the segment over RMS of the media's non-speech audio, in dB (None if too little non-speech).
        frames: its samples; in the scratch FLAC they follow the previous segment's.
        dnsmos: DNSMOS scores, when the segment is in the scored sample.
        prints: its sampled landmark fingerprints on the media's timeline (``fingerprint.stored_prints``).
    """

    span: SegmentSpan
    rms_dbfs: float
    peak_dbfs: float
    clip_ratio: float
    snr_db: float | None
    frames: int
    dnsmos: DnsmosScore | None = None
    prints: tuple[bytes, bytes, list[int]] | None = None


def dbfs(value: float) -> float:
    """Amplitude (1.0 = full scale) in dBFS, floored at -120 dB."""
    return max(SILENCE_DBFS, 20.0 * float(np.log10(max(value, 1e-6))))


def rms(x: np.ndarray) -> float:
    """Root mean square of float samples (0 for no samples)."""
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """Float samples as 16-bit integers (clipped at full scale)."""
    return np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def mel_row(segment_id: str, mel: np.ndarray) -> pa.Table:
    """One row of a log-mel part: the features as little-endian float16 bytes."""
    row = {
        "segment_id": [segment_id],
        "n_mels": [mel.shape[0]],
        "frames": [mel.shape[1]],
        "mel": [mel.astype("<f2").tobytes()],
    }
    return pa.table(row, schema=MEL_SCHEMA)


def _energy(f: sf.SoundFile, start: int, end: int, chunk: int = 1 << 20) -> float:
    """Sum of squares of samples ``start .. end``, in float64, read a chunk at a time."""
    f.seek(start)
    total = 0.0
    for i in range(start, end, chunk):
        part = f.read(min(chunk, end - i), dtype="float32").astype(np.float64)
        total += float(np.dot(part, part))
    return total


def _noise_rms(f: sf.SoundFile, bounds: list[tuple[int, int]]) -> float | None:
    """RMS of the audio outside every segment (None when under MIN_NOISE_S of it), read gap by gap: segments never
    overlap, so the gaps are what lies between them in time order."""
    gaps, cursor = [], 0
    for start, end in sorted(bounds):
        gaps.append((cursor, start))
        cursor = max(cursor, end)
    gaps.append((cursor, f.frames))
    noise_samples = sum(max(0, b - a) for a, b in gaps)
    if noise_samples < MIN_NOISE_S * SAMPLE_RATE:
        return None
    return float(np.sqrt(sum(_energy(f, a, b) for a, b in gaps if b > a) / noise_samples))


def cut_and_measure(job: CutJob) -> list[Measured]:
    """Worker entry point: measures every segment of the media, in segment order, writing their samples (and log-mel
    rows) to the job's scratch files. Holds one segment (or a 1 M-sample chunk of a gap) at a time.

    Raises:
        OSError: ENOSPC when a write fails on a full disk (libsndfile says only "System error"): the pool then fails
            the step instead of dead-lettering the item.
    """
    try:
        return _cut_and_measure(job)
    except (sf.LibsndfileError, OSError) as exc:
        if job.scratch is not None and shutil.disk_usage(job.scratch.parent).free < LOW_SPACE_BYTES:
            raise OSError(errno.ENOSPC, f"no space left on the device of {job.scratch.parent} ({exc})") from exc
        raise


def _cut_and_measure(job: CutJob) -> list[Measured]:
    with sf.SoundFile(job.audio_path) as f, contextlib.ExitStack() as outputs:
        if f.samplerate != SAMPLE_RATE or f.channels != 1:
            raise ValueError(f"{job.audio_path}: expected 16 kHz mono, got {f.samplerate} Hz x {f.channels}")
        bounds = [
            (max(0, round(s.start_s * SAMPLE_RATE)), min(f.frames, round(s.end_s * SAMPLE_RATE))) for s in job.spans
        ]
        noise_rms = _noise_rms(f, bounds)
        pcm_out = mel_out = None
        if job.audio_out is not None:
            pcm_out = outputs.enter_context(
                sf.SoundFile(job.audio_out, "w", samplerate=SAMPLE_RATE, channels=1, format="FLAC", subtype="PCM_16")
            )
        if job.mel_out is not None:
            mel_out = outputs.enter_context(pq.ParquetWriter(job.mel_out, MEL_SCHEMA, compression="zstd"))
        measured = []
        for span, (start, end) in zip(job.spans, bounds, strict=True):
            if end <= start:
                raise ValueError(f"segment_features: segment {span.segment_id} is empty ({start}..{end} samples)")
            f.seek(start)
            x = f.read(end - start, dtype="float32")
            seg_rms = rms(x)
            if pcm_out is not None:
                pcm_out.write(to_pcm16(x))
            if mel_out is not None:
                mel_out.write_table(
                    mel_row(span.segment_id, log_mel(x, job.mel_bins, num_frames(x.shape[0])).astype(np.float16))
                )
            measured.append(
                Measured(
                    span=span,
                    rms_dbfs=dbfs(seg_rms),
                    peak_dbfs=dbfs(float(np.max(np.abs(x)))),
                    clip_ratio=float(np.mean(np.abs(x) >= CLIP_LEVEL)),
                    snr_db=None if noise_rms is None else dbfs(seg_rms) - dbfs(noise_rms),
                    frames=x.shape[0],
                    dnsmos=dnsmos.score(x) if dnsmos.selected(span.segment_id, job.dnsmos_fraction) else None,
                    # The samples are in memory here; the dedup index reads these instead of the audio.
                    prints=fingerprint.stored_prints(x, round(start / fingerprint.HOP)),
                )
            )
    return measured
