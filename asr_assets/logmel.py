"""Whisper-style log-mel features in numpy (no torch), for the student model.

Same recipe as Whisper and transformers' ``WhisperFeatureExtractor``: 25 ms Hann windows (400 samples, periodic) every
10 ms, centred with reflect padding, power spectrum, Slaney-style mel filter bank (0-8 kHz), log10 floored at 1e-10,
clamped to 8 below the maximum, then ``(x + 4) / 4``. Like Whisper, audio is zero-padded to a 30 s window before the
clamp, so a segment's features equal the first frames of what Whisper itself would compute for it.
"""

from __future__ import annotations

import functools

import numpy as np

from asr_assets.records import SAMPLE_RATE

N_FFT = 400
HOP = 160
WINDOW_S = 30.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    mels = 3.0 * hz / 200.0
    log_region = hz >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * 27.0 / np.log(6.4), mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    return np.where(mels >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mels - 15.0)), 200.0 * mels / 3.0)


@functools.cache
def mel_filters(n_mels: int = 128) -> np.ndarray:
    """Triangular filters on the Slaney mel scale with Slaney area normalisation, shape (n_fft // 2 + 1, n_mels)."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), n_mels + 2))
    lower = (fft_freqs[:, None] - edges[None, :-2]) / np.diff(edges)[None, :-1]
    upper = (edges[None, 2:] - fft_freqs[:, None]) / np.diff(edges)[None, 1:]
    filters = np.maximum(0.0, np.minimum(lower, upper))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


@functools.cache
def _hann() -> np.ndarray:
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float64)  # periodic


def log_mel(audio: np.ndarray, n_mels: int = 128, frames: int | None = None) -> np.ndarray:
    """Log-mel features of 16 kHz mono audio, shape (n_mels, frames), float32.

    Args:
        audio: samples; treated as zero-padded (or cut) to 30 s, as Whisper does.
        n_mels: 128 (Whisper large-v3) or 80 (earlier Whisper models).
        frames: how many 10 ms frames to return (default: all 3000 of the 30 s window).
    """
    window_samples = int(WINDOW_S * SAMPLE_RATE)
    total = window_samples // HOP  # 3000 frames after Whisper drops the last one
    frames = total if frames is None else min(frames, total)
    used = min(audio.shape[0], window_samples)
    # Only frames that touch the audio are computed: every later frame sees zeros only, so its log value is the
    # 1e-10 floor (-10), and all it can change is the clamp, through that floor.
    needed = min(total, max(frames, -(-(used + N_FFT // 2) // HOP) + 1))
    x = np.zeros(needed * HOP + N_FFT, dtype=np.float64)
    x[N_FFT // 2 : N_FFT // 2 + used] = audio[:used]
    # Centre padding is a reflection at both ends of the 30 s window (the end matters only when frames reach it).
    half = N_FFT // 2
    x[:half] = x[2 * half : half : -1]
    if needed == total:
        end = half + window_samples
        x[end : end + half] = x[end - 2 : end - 2 - half : -1]
    framed = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP][:needed]
    power = np.abs(np.fft.rfft(framed * _hann(), n=N_FFT)) ** 2
    log_spec = np.log10(np.maximum(power @ mel_filters(n_mels), 1e-10)).T
    peak = log_spec.max() if needed == total else max(log_spec.max(), -10.0)
    log_spec = np.maximum(log_spec[:, :frames], peak - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def num_frames(num_samples: int) -> int:
    """Frames that cover ``num_samples`` samples (10 ms each), at most the 30 s window's 3000."""
    return min(-(-num_samples // HOP), int(WINDOW_S * SAMPLE_RATE) // HOP)
