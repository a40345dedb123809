"""DNSMOS in segment_features: the real model through onnxruntime on espeak-ng speech and noise, the windowing, the
deterministic sample, and the columns the stage fills."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from asr_assets import dnsmos, layout
from asr_assets.dnsmos import WINDOW, Dnsmos, model_path, selected, windows
from asr_assets.records import FEATURE_SCHEMA
from asr_assets.sample_corpus import Corpus
from asr_assets.segments import CutJob, SegmentSpan, cut_and_measure
from asr_assets.stages import DecodeSettings, PoolSettings, build_index, decode_shard, features_shard, vad_shard
from asr_assets.stages import PackSettings as AudioPackSettings
from asr_assets.vad import VadParams, silero_model_path
from resources.storage import LocalStore, read_table, write_table

SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs back home before the rain."


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """About five seconds of espeak-ng speech at 16 kHz, peaking at -3 dBFS."""
    tmp = tmp_path_factory.mktemp("dnsmos")
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(tmp / "native.wav"), SENTENCE], check=True)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(tmp / "native.wav"), "-ar", "16000", str(tmp / "s.wav")],
        check=True,
    )
    audio, rate = sf.read(tmp / "s.wav", dtype="float32")
    assert rate == 16000 and audio.ndim == 1
    return (audio / np.abs(audio).max() * 10 ** (-3 / 20)).astype(np.float32)


def _noise(n: int, rms: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, rms, n).astype(np.float32)


def test_speech_scores_higher_than_noise_and_noisy_speech(speech: np.ndarray) -> None:
    clean = dnsmos.score(speech)
    noise = dnsmos.score(_noise(speech.shape[0], 0.1, seed=0))
    # 0 dB SNR: noise as loud as the speech.
    noisy = dnsmos.score(np.clip(speech + _noise(speech.shape[0], float(np.sqrt(np.mean(speech**2))), 1), -1, 1))
    assert all(1.0 <= s <= 5.0 for s in (*clean, *noise, *noisy))
    # Measured here: clean 2.9 OVRL / 4.0 BAK, noise 1.1 / 1.1, noisy speech 1.4 / 1.2.
    assert clean.ovrl > noise.ovrl + 1.0
    assert clean.ovrl > noisy.ovrl + 0.8
    assert clean.bak > noisy.bak + 1.5


@pytest.mark.parametrize(
    ("length", "count"),
    [(1, 1), (16000 * 3, 1), (WINDOW, 1), (WINDOW + 1, 2), (16000 * 30, 4), (3 * WINDOW, 3)],
)
def test_windows_cover_the_clip(length: int, count: int) -> None:
    clip = np.arange(length, dtype=np.float32)
    got = windows(clip)
    assert got.shape == (count, WINDOW) and got.dtype == np.float32
    if length < WINDOW:  # tiled: the clip repeats from its start
        assert np.array_equal(got[0], clip[np.arange(WINDOW) % length])
    else:  # the first window starts the clip, the last ends it, no gap between them
        assert got[0, 0] == 0 and got[-1, -1] == length - 1
        assert all(got[k + 1, 0] <= got[k, -1] + 1 for k in range(count - 1))


def test_windows_reject_an_empty_clip() -> None:
    with pytest.raises(ValueError, match="empty"):
        windows(np.zeros(0, np.float32))


def test_long_clip_scores_the_mean_of_its_windows(speech: np.ndarray) -> None:
    clip = np.resize(speech, 16000 * 20) + _noise(16000 * 20, 0.01, seed=2)
    parts = windows(clip)
    assert parts.shape[0] == 3
    each = np.array([dnsmos.score(w) for w in parts])  # a window of exactly 9.01 s is scored as it is
    whole = dnsmos.score(clip)
    np.testing.assert_allclose(whole, each.mean(axis=0), rtol=1e-5)
    # Windows fed several per call give the same scores.
    np.testing.assert_allclose(Dnsmos(model_path(), batch_windows=3).score(clip), whole, rtol=1e-4)


def test_sample_is_deterministic_and_sized() -> None:
    ids = [f"{m:016x}-{i:05d}" for m in range(400) for i in range(5)]
    picked = {s for s in ids if selected(s, 0.3)}
    assert picked == {s for s in ids if selected(s, 0.3)}
    assert abs(len(picked) / len(ids) - 0.3) < 0.04
    assert {s for s in ids if selected(s, 0.1)} < picked  # raising the fraction only adds segments
    assert not any(selected(s, 0.0) for s in ids) and all(selected(s, 1.0) for s in ids)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_cut_and_measure_scores_the_sample_only(
    tmp_path: Path, speech: np.ndarray, monkeypatch: pytest.MonkeyPatch, fraction: float
) -> None:
    audio = np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(8000, np.float32), speech])
    sf.write(tmp_path / "a.flac", audio, 16000, subtype="PCM_16")
    half = (speech.shape[0] + 8000) / 16000
    spans = (SegmentSpan("m-00000", 0.5, half, 0.9, 0.5), SegmentSpan("m-00001", half + 0.5, 2 * half, 0.9, 0.5))
    if fraction == 0.0:
        monkeypatch.setattr(dnsmos, "score", lambda pcm: pytest.fail("scored a segment at fraction 0"))
    measured = cut_and_measure(CutJob("m", tmp_path / "a.flac", spans, dnsmos_fraction=fraction))
    if fraction == 0.0:
        assert all(m.dnsmos is None for m in measured)
    else:
        assert all(m.dnsmos is not None and m.dnsmos.ovrl > 1.5 for m in measured)


def test_features_shard_fills_dnsmos_columns(corpus: Corpus, tmp_path: Path) -> None:
    source, out = LocalStore(corpus.media_dir), LocalStore(tmp_path / "out")
    shard, pool = "shard-00000", PoolSettings(workers=2, timeout_s=120)
    build_index(source, out, shard, 1)
    decode_shard(source, out, shard, DecodeSettings(1 << 30, 3600.0), pool)
    vad_shard(out, shard, VadParams(), silero_model_path(), pool)
    report = features_shard(out, shard, AudioPackSettings(), pool, dnsmos_fraction=0.5)
    rows = pq.read_table(out.local_path(layout.features_key(shard))).to_pylist()
    scored = [r for r in rows if selected(r["segment_id"], 0.5)]
    assert 0 < len(scored) < len(rows)
    for r in rows:
        values = [r["dnsmos_sig"], r["dnsmos_bak"], r["dnsmos_ovrl"]]
        if r in scored:
            assert all(1.0 <= v <= 5.0 for v in values), r
        else:
            assert values == [None, None, None], r
    assert report.totals["dnsmos_scored"] == len(scored)
    assert report.totals["dnsmos_model_sha256"] == dnsmos.model_sha256()


def test_tables_written_before_dnsmos_read_as_unscored(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    old = FEATURE_SCHEMA.empty_table().drop_columns(["dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl"])
    row = {name: [None] for name in old.column_names} | {"segment_id": ["m-00000"], "duration_s": [1.0]}
    write_table(store, "f.parquet", pa.table(row, schema=old.schema))
    table = read_table(store, "f.parquet", FEATURE_SCHEMA)
    assert table.schema == FEATURE_SCHEMA
    assert table["dnsmos_ovrl"].to_pylist() == [None]


def test_missing_model_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="make install"):
        model_path()
