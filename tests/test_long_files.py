"""Long files in bounded memory: VAD and segment_features stream the decoded FLAC (VAD a block of windows at a time,
features a segment at a time) with the results of the whole-file code they replaced, and their peak memory does not
grow with the file's length."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from asr_assets.logmel import log_mel, num_frames
from asr_assets.media import DecodeJob, decode_media
from asr_assets.sample_corpus import Corpus
from asr_assets.segments import CLIP_LEVEL, MIN_NOISE_S, CutJob, SegmentSpan, cut_and_measure, dbfs, rms
from asr_assets.vad import (
    CONTEXT,
    WINDOW,
    SileroVad,
    VadItem,
    VadJob,
    VadParams,
    detect_speech,
    merge_spans,
    model_sha256,
    segment_rows,
    silero_model_path,
    speech_timestamps,
)

SR = 16_000


@pytest.fixture(scope="module")
def speech_track(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """About a minute of the corpus's speech (every good file decoded to 16 kHz), pauses included."""
    tmp = tmp_path_factory.mktemp("speech")
    parts = []
    for k, item in enumerate(i for i in corpus.items if not i.broken):
        dst = tmp / f"{k}.flac"
        assert decode_media(DecodeJob("m", item.path, corpus.media_dir / item.path, dst, 1 << 30, 3600.0)).error is None
        parts.append(sf.read(dst, dtype="float32")[0])
    return np.concatenate(parts)


def _long_file(track: np.ndarray, path: Path, seconds: float, seed: int = 0) -> Path:
    """The speech track repeated to ``seconds``, with pauses of 0.1-3 s between repeats over a faint noise floor,
    written block by block as 16-bit FLAC (a 20-minute file is never built in memory)."""
    rng = np.random.default_rng(seed)
    written, total = 0, int(seconds * SR)
    with sf.SoundFile(path, "w", samplerate=SR, channels=1, format="FLAC", subtype="PCM_16") as f:
        while written < total:
            pause = np.zeros(int(rng.uniform(0.1, 3.0) * SR), np.float32)
            block = np.concatenate([pause, track])[: total - written]
            block = block + rng.normal(0, 2e-3, block.shape[0]).astype(np.float32)
            f.write(np.clip(block, -1, 1))
            written += block.shape[0]
    return path


@pytest.fixture(scope="module")
def three_minutes(speech_track: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _long_file(speech_track, tmp_path_factory.mktemp("long") / "three.flac", 181.3)


# --- The whole-file code these modules had before streaming, kept here as the reference. ---


def _whole_file_probs(vad: SileroVad, audio: np.ndarray, block_windows: int = 2048) -> np.ndarray:
    num_windows = -(-audio.shape[0] // WINDOW)
    probs = np.empty(num_windows, dtype=np.float32)
    h = np.zeros((1, 1, 128), dtype=np.float32)
    c = np.zeros((1, 1, 128), dtype=np.float32)
    for first in range(0, num_windows, block_windows):
        count = min(block_windows, num_windows - first)
        start = first * WINDOW - CONTEXT
        buf = np.zeros(CONTEXT + count * WINDOW, dtype=np.float32)
        lo, hi = max(start, 0), min(start + buf.shape[0], audio.shape[0])
        buf[lo - start : hi - start] = audio[lo:hi]
        block = np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(buf, CONTEXT + WINDOW)[::WINDOW])
        probs[first : first + count], h, c = vad._session.run(None, {"input": block, "h": h, "c": c})
    return probs


def _whole_file_cut(path: Path, spans: tuple[SegmentSpan, ...], mel_bins: int) -> list[dict]:
    audio = sf.read(path, dtype="float32")[0]
    bounds = [(max(0, round(s.start_s * SR)), min(audio.shape[0], round(s.end_s * SR))) for s in spans]
    gaps, cursor = [], 0
    for start, end in sorted(bounds):
        gaps.append((cursor, start))
        cursor = max(cursor, end)
    gaps.append((cursor, audio.shape[0]))
    noise_samples = sum(max(0, b - a) for a, b in gaps)
    noise_energy = 0.0
    for a, b in gaps:
        x = audio[a:b]
        energy = 0.0
        for i in range(0, x.shape[0], 1 << 20):
            part = x[i : i + (1 << 20)].astype(np.float64)
            energy += float(np.dot(part, part))
        noise_energy += energy
    noise_rms = float(np.sqrt(noise_energy / noise_samples)) if noise_samples >= MIN_NOISE_S * SR else None
    out = []
    for start, end in bounds:
        x = audio[start:end]
        out.append(
            {
                "rms_dbfs": dbfs(rms(x)),
                "peak_dbfs": dbfs(float(np.max(np.abs(x)))),
                "clip_ratio": float(np.mean(np.abs(x) >= CLIP_LEVEL)),
                "snr_db": None if noise_rms is None else dbfs(rms(x)) - dbfs(noise_rms),
                "pcm": np.round(np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16),
                "mel": log_mel(x, mel_bins, num_frames(x.shape[0])).astype(np.float16),
            }
        )
    return out


def _spans(path: Path) -> tuple[SegmentSpan, ...]:
    (result,) = detect_speech(VadJob((VadItem("long", path),), VadParams(), silero_model_path()))
    return tuple(SegmentSpan(s.segment_id, s.start_s, s.end_s, s.prob_mean, s.prob_min) for s in result.segments)


def test_streaming_vad_equals_the_whole_file_run(three_minutes: Path) -> None:
    vad = SileroVad(silero_model_path())
    audio = sf.read(three_minutes, dtype="float32")[0]
    probs = _whole_file_probs(vad, audio)
    params = VadParams(merge_gap_s=0.5)
    spans = merge_spans(speech_timestamps(probs, audio.shape[0], params), params)
    expected = segment_rows("long", probs, spans, model_sha256(silero_model_path()), params)
    assert len(expected) >= 15  # many segments, across several 65 s model blocks

    (result,) = detect_speech(VadJob((VadItem("long", three_minutes),), params, silero_model_path()))
    assert result.error is None
    assert result.duration_s == audio.shape[0] / SR
    assert result.segments == expected
    # Small blocks too (many chunk boundaries, a partial last window): the same probabilities, bit for bit.
    small = SileroVad(silero_model_path(), block_windows=7)
    with sf.SoundFile(three_minutes) as f:
        assert np.array_equal(small.stream_probs(f.blocks(small.block_samples, dtype="float32")), probs)


def test_streaming_features_equal_the_whole_file_cut(three_minutes: Path, tmp_path: Path) -> None:
    spans = _spans(three_minutes)
    expected = _whole_file_cut(three_minutes, spans, 80)
    job = CutJob("long", three_minutes, spans, mel_bins=80, scratch=tmp_path / "cut")
    measured = cut_and_measure(job)
    assert len(measured) == len(spans) >= 15
    for m, e in zip(measured, expected, strict=True):
        got = (m.rms_dbfs, m.peak_dbfs, m.clip_ratio, m.snr_db, m.frames)
        assert got == (e["rms_dbfs"], e["peak_dbfs"], e["clip_ratio"], e["snr_db"], e["pcm"].shape[0])
    assert all(m.snr_db is not None and m.snr_db > 20 for m in measured)  # speech well over the faint noise
    pcm = sf.read(job.audio_out, dtype="int16")[0]
    assert np.array_equal(pcm, np.concatenate([e["pcm"] for e in expected]))
    mel = pq.ParquetFile(job.mel_out)
    assert mel.num_row_groups == len(spans)
    for i, e in enumerate(expected):
        row = mel.read_row_group(i).to_pylist()[0]
        assert row["segment_id"] == spans[i].segment_id and row["mel"] == e["mel"].astype("<f2").tobytes()


def _peak_bytes(fn: Callable[[], object]) -> int:
    """Peak Python and numpy allocations while ``fn`` runs (numpy reports its buffers to tracemalloc; onnxruntime's
    and libsndfile's own buffers are not seen, but they are per block, not per file)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_file(speech_track: np.ndarray, tmp_path: Path) -> None:
    short = _long_file(speech_track, tmp_path / "short.flac", 120.0)
    long = _long_file(speech_track, tmp_path / "long.flac", 1200.0)
    model = silero_model_path()

    def chain(path: Path) -> Callable[[], object]:
        def run() -> None:
            (result,) = detect_speech(VadJob((VadItem("m", path),), VadParams(), model))
            spans = tuple(SegmentSpan(s.segment_id, s.start_s, s.end_s, 0.9, 0.5) for s in result.segments)
            cut_and_measure(CutJob("m", path, spans, mel_bins=80, scratch=tmp_path / f"cut-{path.stem}"))

        return run

    chain(short)()  # a worker's one-time costs: the model session, the mel filter bank
    short_peak, long_peak = _peak_bytes(chain(short)), _peak_bytes(chain(long))
    # Ten times the audio: the window probabilities (4 bytes per 32 ms) and the segment records grow, the rest not.
    assert long_peak < 1.3 * short_peak, (short_peak, long_peak)
    # The measure can tell: the whole-file reading this replaced peaks at several times the short file's.
    whole = _peak_bytes(lambda: _whole_file_probs(SileroVad(model), sf.read(long, dtype="float32")[0]))
    assert whole > 3 * long_peak, (whole, long_peak)
