"""Cut VAD segments out of decoded audio and measure them (``segment_features``).

Runs inside pool workers (import-light, no Dagster). A worker returns each segment's 16-bit samples; the step appends
them to one packed FLAC per run so the teacher reads a few large objects sequentially instead of millions of small ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asr_assets import dnsmos
from asr_assets.dnsmos import DnsmosScore
from asr_assets.logmel import log_mel, num_frames
from asr_assets.media import read_audio
from asr_assets.records import SAMPLE_RATE

SILENCE_DBFS = -120.0  # floor for digital silence, instead of -inf
MIN_NOISE_S = 0.5  # the noise floor needs at least this much non-speech audio
CLIP_LEVEL = 0.999


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
    """All segments of one media object, cut in one read of its audio.

    Attributes:
        mel_bins: Whisper log-mel bins to compute (0: none).
        dnsmos_fraction: the fraction of segments (chosen by a hash of their id) to score with DNSMOS (0: none).
    """

    media_id: str
    audio_path: Path
    spans: tuple[SegmentSpan, ...]
    mel_bins: int = 0
    dnsmos_fraction: float = 0.0


@dataclass(frozen=True)
class Measured:
    """One cut segment: its measurements and its samples.

    Attributes:
        span: the segment.
        rms_dbfs: RMS level in dBFS.
        peak_dbfs: peak level in dBFS.
        clip_ratio: fraction of samples at or above 0.999 full scale.
        snr_db: RMS of the segment over RMS of the media's non-speech audio, in dB (None if too little non-speech).
        pcm: the samples as int16.
        mel: Whisper log-mel features, float16 (n_mels, frames), when asked for.
        dnsmos: DNSMOS scores, when the segment is in the scored sample.
    """

    span: SegmentSpan
    rms_dbfs: float
    peak_dbfs: float
    clip_ratio: float
    snr_db: float | None
    pcm: np.ndarray
    mel: np.ndarray | None = None
    dnsmos: DnsmosScore | None = None


def dbfs(value: float) -> float:
    """Amplitude (1.0 = full scale) in dBFS, floored at -120 dB."""
    return max(SILENCE_DBFS, 20.0 * float(np.log10(max(value, 1e-6))))


def rms(x: np.ndarray) -> float:
    """Root mean square of float samples (0 for no samples)."""
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def _energy(x: np.ndarray, chunk: int = 1 << 20) -> float:
    """Sum of squares in float64, a chunk at a time."""
    total = 0.0
    for i in range(0, x.shape[0], chunk):
        part = x[i : i + chunk].astype(np.float64)
        total += float(np.dot(part, part))
    return total


def cut_and_measure(job: CutJob) -> list[Measured]:
    """Worker entry point: reads the media's audio once and returns every segment measured, in segment order."""
    audio = read_audio(job.audio_path)
    bounds = [
        (max(0, round(s.start_s * SAMPLE_RATE)), min(audio.shape[0], round(s.end_s * SAMPLE_RATE))) for s in job.spans
    ]
    # Noise floor over the gaps between segments (which never overlap), summed in float64 chunks rather than through
    # a mask and a copy of the non-speech samples: a long file stays in memory once.
    gaps, cursor = [], 0
    for start, end in sorted(bounds):
        gaps.append((cursor, start))
        cursor = max(cursor, end)
    gaps.append((cursor, audio.shape[0]))
    noise_samples = sum(max(0, b - a) for a, b in gaps)
    noise_energy = sum(_energy(audio[a:b]) for a, b in gaps if b > a)
    noise_rms = float(np.sqrt(noise_energy / noise_samples)) if noise_samples >= MIN_NOISE_S * SAMPLE_RATE else None

    measured = []
    for span, (start, end) in zip(job.spans, bounds, strict=True):
        x = audio[start:end]
        if x.size == 0:
            raise ValueError(f"segment_features: segment {span.segment_id} is empty ({start}..{end} samples)")
        seg_rms = rms(x)
        measured.append(
            Measured(
                span=span,
                rms_dbfs=dbfs(seg_rms),
                peak_dbfs=dbfs(float(np.max(np.abs(x)))),
                clip_ratio=float(np.mean(np.abs(x) >= CLIP_LEVEL)),
                snr_db=None if noise_rms is None else dbfs(seg_rms) - dbfs(noise_rms),
                pcm=np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16),
                mel=log_mel(x, job.mel_bins, num_frames(x.shape[0])).astype(np.float16) if job.mel_bins else None,
                dnsmos=dnsmos.score(x) if dnsmos.selected(span.segment_id, job.dnsmos_fraction) else None,
            )
        )
    return measured
