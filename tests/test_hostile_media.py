"""Hostile media: every file ends as a recorded outcome (decoded, or dead-lettered with a specific reason), never a
failed shard, never a hang; a worker that dies or hangs costs only its own item."""

from __future__ import annotations

import os
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from asr_assets import layout
from asr_assets.checks import reconcile_audio, reconcile_features, reconcile_vad
from asr_assets.media import DecodeJob, decode_media
from asr_assets.pool import ItemTimeout, WorkerCrashed, run_pool
from asr_assets.sample_corpus import Corpus
from asr_assets.stages import DecodeSettings, PoolSettings, build_index, decode_shard, features_shard, vad_shard
from asr_assets.stages import PackSettings as AudioPackSettings
from asr_assets.vad import VadParams, silero_model_path
from partitions import NUM_SHARDS, shard_partitions
from resources.storage import LocalStore
from tests.workers import double_or_die

MAX_FILE_MB = 4


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def hostile(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[str, str | None]]]:
    """A folder of hostile files and, per file name, the expected (status, error class)."""
    src = tmp_path_factory.mktemp("hostile")
    speech = corpus.media_dir / next(i.path for i in corpus.items if i.path.endswith(".wav") and not i.broken)
    mp3 = corpus.media_dir / next(i.path for i in corpus.items if i.path.endswith(".mp3") and not i.broken)
    expected: dict[str, tuple[str, str | None]] = {}

    def made(name: str, status: str, error: str | None = None) -> Path:
        expected[name] = (status, error)
        return src / name

    made("zero.wav", "failed", "EmptyFile").write_bytes(b"")
    # These random bytes happen to start with ff e4 22, a well-formed MPEG-2.5 frame header: the sniffer lets them
    # through and FFmpeg rejects them. (The sample corpus's random file covers the UnsupportedFormat path.)
    made("random.mp3", "failed", "DecodeError").write_bytes(np.random.default_rng(1).bytes(8192))
    made("text.flac", "failed", "UnsupportedFormat").write_text("this is not audio\n" * 50)
    data = mp3.read_bytes()
    made("truncated.mp3", "decoded").write_bytes(data[: len(data) // 2])
    made("really-an-mp3.wav", "decoded").write_bytes(data)
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "color=c=red:s=32x32:r=5",
        "-t",
        "2",
        made("video-only.mp4", "failed", "NoAudioStream").as_posix(),
    )
    _ffmpeg(
        "-i",
        speech.as_posix(),
        "-ar",
        "16000",
        "-c:a",
        "aac",
        "-f",
        "3gp",
        made("audio-only.3gp", "decoded").as_posix(),
    )
    for name, codec_args in {
        "clip.flv": ["-c:a", "aac"],
        "clip.avi": ["-c:a", "pcm_s16le"],
        "clip.mov": ["-c:a", "aac"],
        "clip.mkv": ["-c:a", "libvorbis"],
        "clip.webm": ["-c:a", "libopus"],
        "clip.wma": ["-c:a", "wmav2"],
    }.items():
        video = [] if name.endswith(".wma") else ["-f", "lavfi", "-i", "color=c=blue:s=32x32:r=5"]
        _ffmpeg("-i", speech.as_posix(), *video, "-shortest", *codec_args, made(name, "decoded").as_posix())
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=300:sample_rate=48000:duration=3",
        "-ac",
        "6",
        made("six-channel-48k.wav", "decoded").as_posix(),
    )
    _ffmpeg("-i", speech.as_posix(), "-ar", "8000", made("telephone-8k.wav", "decoded").as_posix())
    sf.write(made("tenth-of-a-second.wav", "decoded"), np.zeros(1600, np.float32), 16000)
    sf.write(made("three-minutes-silence.flac", "decoded"), np.zeros(16000 * 180, np.int16), 16000)
    noise = np.random.default_rng(2).normal(0, 0.2, 16000 * 10).astype(np.float32)
    sf.write(made("white-noise.wav", "decoded"), noise, 16000)
    big = np.random.default_rng(3).normal(0, 0.1, 16000 * 140).astype(np.float32)  # ~4.5 MB as 16-bit wav
    sf.write(made("over-the-limit.wav", "failed", "TooLarge"), big, 16000, subtype="PCM_16")
    for name in ["with space.mp3", 'quote\'s "double".mp3', "ünïcödé 名前.mp3", "-leading-dash.mp3"]:
        made(name, "decoded").write_bytes(data)
    made("notes.txt", "failed", "UnsupportedFormat").write_text("a stray text file among the media\n")
    (src / "tab\tin-name.wav").write_bytes(data)  # cannot be a safe key: dead-lettered by media_index
    (src / "escape.wav").symlink_to(mp3)  # points outside the source: not one of its objects, dead-lettered as such
    return src, expected


def test_every_hostile_file_ends_in_one_recorded_outcome(hostile, tmp_path: Path) -> None:
    src_dir, expected = hostile
    source, out = LocalStore(src_dir), LocalStore(tmp_path / "out")
    pool = PoolSettings(workers=2, timeout_s=120)
    outcomes: dict[str, tuple[str, str | None]] = {}
    started = time.monotonic()
    for shard in shard_partitions.get_partition_keys():
        build_index(source, out, shard, NUM_SHARDS)
        decode_shard(source, out, shard, DecodeSettings(MAX_FILE_MB * 1024 * 1024, 3600.0), pool)
        vad_shard(out, shard, VadParams(), silero_model_path(), pool)
        features_shard(out, shard, AudioPackSettings(), pool)
        for check in (reconcile_audio, reconcile_vad, reconcile_features):
            assert check(out, shard).passed, (shard, check.__name__, check(out, shard).problems)
        if out.exists(layout.audio_manifest_key(shard)):
            for row in pq.read_table(out.local_path(layout.audio_manifest_key(shard))).to_pylist():
                outcomes[Path(row["uri"]).name] = (row["status"], row["error_class"])
    assert outcomes == expected
    assert time.monotonic() - started < 300
    unsafe = [
        row
        for shard in shard_partitions.get_partition_keys()
        for row in layout.read_dead_letters(out, "media_index", shard).to_pylist()
    ]
    assert sorted((Path(r["uri"]).name, r["error_class"]) for r in unsafe) == [
        ("escape.wav", "OutsideRoot"),
        ("tab\tin-name.wav", "UnsafeName"),
    ]


def test_silence_and_tiny_files_have_no_speech(hostile, tmp_path: Path) -> None:
    src_dir, _ = hostile
    from asr_assets.vad import SileroVad, speech_timestamps

    vad = SileroVad(silero_model_path())
    for name in ["three-minutes-silence.flac", "tenth-of-a-second.wav"]:
        dst = tmp_path / "a.flac"
        result = decode_media(DecodeJob("m", name, src_dir / name, dst, 1 << 30, 3600.0))
        audio = sf.read(dst, dtype="float32")[0]
        assert result.error_class is None
        assert speech_timestamps(vad.speech_probs(audio), len(audio), VadParams()) == []


def test_a_worker_that_dies_costs_only_its_item() -> None:
    outcomes = {o.job: o for o in run_pool(double_or_die, [1, 2, -1, 3, 4], workers=2, timeout_s=60)}
    assert isinstance(outcomes[-1].error, WorkerCrashed) and "exit code" in str(outcomes[-1].error)
    assert {j: o.result for j, o in outcomes.items() if j != -1} == {1: 2, 2: 4, 3: 6, 4: 8}


def test_a_hung_worker_is_killed_at_the_timeout() -> None:
    started = time.monotonic()
    outcomes = {o.job: o for o in run_pool(double_or_die, [-2, 5, 6], workers=2, timeout_s=3)}
    assert isinstance(outcomes[-2].error, ItemTimeout)
    assert outcomes[5].result == 10 and outcomes[6].result == 12
    assert time.monotonic() - started < 60


def _wav_header(data_bytes: int) -> bytes:
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, 16000, 32000, 2, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def test_a_decoder_blocked_on_its_input_is_killed_and_recorded(corpus: Corpus, tmp_path: Path) -> None:
    """A source that stops delivering bytes mid-file (a stalled network mount) hangs the real decoder."""
    fifo = tmp_path / "stalled.wav"
    os.mkfifo(fifo)
    release = threading.Event()

    def stall() -> None:
        with open(fifo, "wb") as w:  # blocks until the worker opens it
            w.write(_wav_header(16000 * 2 * 600) + b"\x00\x01" * 16000)  # claims 10 min, sends 1 s
            w.flush()
            release.wait(120)

    writer = threading.Thread(target=stall, daemon=True)
    writer.start()
    good = next(i for i in corpus.items if i.path.endswith(".flac") and not i.broken)
    jobs = [
        DecodeJob("hang", str(fifo), fifo, tmp_path / "hang.flac", 1 << 30, 3600.0),
        DecodeJob("good", good.path, corpus.media_dir / good.path, tmp_path / "good.flac", 1 << 30, 3600.0),
    ]
    try:
        outcomes = {o.job.media_id: o for o in run_pool(decode_media, jobs, workers=2, timeout_s=5)}
    finally:
        release.set()
    assert isinstance(outcomes["hang"].error, ItemTimeout)
    assert outcomes["good"].result.error_class is None and (tmp_path / "good.flac").exists()
