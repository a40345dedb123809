"""segment_features: measurements, packed audio, and Whisper log-mel features matching transformers to 1e-4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from asr_assets import layout
from asr_assets.logmel import log_mel, num_frames
from asr_assets.media import read_audio
from asr_assets.records import AUDIO_SCHEMA
from asr_assets.sample_corpus import Corpus
from asr_assets.segments import CutJob, SegmentSpan, cut_and_measure, dbfs, to_pcm16
from asr_assets.stages import DecodeSettings, PoolSettings, build_index, decode_shard, features_shard, vad_shard
from asr_assets.stages import PackSettings as AudioPackSettings
from asr_assets.vad import VadParams, silero_model_path
from resources.storage import LocalStore, read_table


@pytest.fixture(scope="module")
def extractor():
    transformers = pytest.importorskip("transformers")  # a dev dependency: present whenever make test runs
    return transformers.WhisperFeatureExtractor


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize(
    "audio",
    [
        np.random.default_rng(0).normal(0, 0.1, 16000 * 3),
        0.3 * np.sin(np.arange(16000 * 12) / 5),
        np.zeros(1600),
        np.random.default_rng(1).normal(0, 0.1, 16000 * 30),
        np.random.default_rng(2).normal(0, 0.1, 16000 * 31),  # longer than Whisper's window: cut at 30 s
        np.random.default_rng(3).normal(0, 1e-7, 150),
    ],
    ids=["noise-3s", "tone-12s", "silence", "noise-30s", "noise-31s", "tiny"],
)
def test_log_mel_matches_whisper_feature_extractor(extractor, audio: np.ndarray, n_mels: int) -> None:
    audio = audio.astype(np.float32)
    reference = extractor(feature_size=n_mels)(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    assert np.abs(log_mel(audio, n_mels) - reference).max() < 1e-4
    frames = num_frames(audio.shape[0])
    assert np.abs(log_mel(audio, n_mels, frames) - reference[:, :frames]).max() < 1e-4


@pytest.mark.parametrize(
    ("amplitude", "expected_rms", "expected_peak"),
    [(0.5, dbfs(0.5 / np.sqrt(2)), dbfs(0.5)), (1.0, dbfs(1 / np.sqrt(2)), 0.0)],
)
def test_levels_and_clipping(tmp_path: Path, amplitude: float, expected_rms: float, expected_peak: float) -> None:
    t = np.arange(16000 * 4) / 16000
    audio = np.zeros(16000 * 6, np.float32)
    audio[16000 : 16000 * 5] = amplitude * np.sin(2 * np.pi * 250 * t)
    audio[:16000] = audio[16000 * 5 :] = 0.001  # a constant noise floor everywhere outside the segment
    sf.write(tmp_path / "a.flac", audio, 16000, subtype="PCM_16")
    job = CutJob("m", tmp_path / "a.flac", (SegmentSpan("m-00000", 1.0, 5.0, 0.9, 0.8),), 80, scratch=tmp_path / "cut")
    (m,) = cut_and_measure(job)
    assert m.rms_dbfs == pytest.approx(expected_rms, abs=0.05)
    assert m.peak_dbfs == pytest.approx(expected_peak, abs=0.05)
    assert (m.clip_ratio > 0.01) is (amplitude == 1.0)
    assert m.snr_db == pytest.approx(expected_rms - dbfs(0.001), abs=0.5)
    pcm = sf.read(job.audio_out, dtype="int16")[0]  # the worker wrote the segment's samples itself
    assert m.frames == pcm.shape[0] == 16000 * 4
    assert np.abs(pcm / 32767.0 - audio[16000 : 16000 * 5]).max() < 1e-4
    (mel,) = pq.read_table(job.mel_out).to_pylist()
    assert (mel["segment_id"], mel["n_mels"], mel["frames"]) == ("m-00000", 80, 400)


def test_features_shard_packs_audio_and_log_mel(corpus: Corpus, tmp_path: Path) -> None:
    source, out = LocalStore(corpus.media_dir), LocalStore(tmp_path / "out")
    shard, pool = "shard-00000", PoolSettings(workers=2, timeout_s=120)
    build_index(source, out, shard, 1)
    decode_shard(source, out, shard, DecodeSettings(1 << 30, 3600.0), pool)
    vad_shard(out, shard, VadParams(), silero_model_path(), pool)
    report = features_shard(out, shard, AudioPackSettings(part_max_s=20.0), pool, mel_bins=128)
    rows = pq.read_table(out.local_path(layout.features_key(shard))).to_pylist()
    assert report.succeeded == len(rows) > 0
    assert len({r["audio_key"] for r in rows}) > 1  # parts rolled over at 20 s
    mels = {}
    for key in {r["mel_key"] for r in rows}:
        for m in pq.read_table(out.local_path(key)).to_pylist():
            mels[m["segment_id"]] = np.frombuffer(m["mel"], "<f2").reshape(m["n_mels"], m["frames"])
    assert set(mels) == {r["segment_id"] for r in rows}
    assert not list(out.scratch_dir().glob("*-cut-*"))  # the workers' scratch files, copied in and deleted
    decoded = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA).to_pylist()
    decoded = {r["media_id"]: out.local_path(r["audio_key"]) for r in decoded if r["status"] == "decoded"}
    for row in rows[:5]:
        audio = read_audio(out.local_path(row["audio_key"]), row["audio_offset"], row["audio_frames"])
        assert audio.shape[0] == row["audio_frames"]
        source = read_audio(decoded[row["media_id"]], round(row["start_s"] * 16000), row["audio_frames"])
        assert np.array_equal(audio, to_pcm16(source) / np.float32(32768))  # the segment, packed as cut
        expected = log_mel(audio, 128, num_frames(audio.shape[0]))
        assert np.abs(mels[row["segment_id"]].astype(np.float32) - expected).max() < 1e-2  # float16 storage
