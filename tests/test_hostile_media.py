"""Hostile media: every file ends as a recorded outcome (decoded, or dead-lettered with a specific reason), never a
failed shard, never a hang; a worker that dies or hangs costs only its own item."""

from __future__ import annotations

import os
import struct
import subprocess
import threading
import time
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from asr_assets import layout
from asr_assets.checks import reconcile_audio, reconcile_features, reconcile_vad
from asr_assets.media import DecodeJob, decode_media
from asr_assets.pool import ItemTimeout, MemoryLimit, WorkerCrashed, _oom_kills, run_pool
from asr_assets.sample_corpus import Corpus
from asr_assets.stages import DecodeSettings, PoolSettings, build_index, decode_shard, features_shard, vad_shard
from asr_assets.stages import PackSettings as AudioPackSettings
from asr_assets.vad import VadParams, silero_model_path
from partitions import NUM_SHARDS, shard_partitions
from resources.storage import LocalStore
from tests.test_decode import _remux
from tests.workers import allocate, decode_and_peak_rss, double_or_die

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


def _wav_header(data_bytes: int, rate: int = 16000, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV header that claims what it is told (sizes and rates need not match the bytes after it)."""
    return (
        b"RIFF"
        + struct.pack("<I", (36 + data_bytes) & 0xFFFFFFFF)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, (rate * channels * 2) & 0xFFFFFFFF, channels * 2, 16)
        + b"data"
        + struct.pack("<I", data_bytes)
    )


def test_a_decoder_blocked_on_its_input_is_killed_and_recorded(corpus: Corpus, tmp_path: Path) -> None:
    """A source that stops delivering bytes mid-file (a stalled network mount) hangs the real decoder.

    It stalls inside the first 512 bytes, which the worker reads to pick the demuxer: a fifo cannot be read twice, so
    stalling later would leave FFmpeg a stream without its header (refused at once, not hung)."""
    fifo = tmp_path / "stalled.wav"
    os.mkfifo(fifo)
    release = threading.Event()

    def stall() -> None:
        with open(fifo, "wb") as w:  # blocks until the worker opens it
            w.write(_wav_header(16000 * 2 * 600) + b"\x00\x01" * 100)  # claims 10 min, sends 200 bytes
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


CAP = 3 << 30  # per-worker address-space cap in these tests: normal workers peak near 0.6 GiB virtual


class _OpenDetector:
    """A fifo standing for a file outside the source: it records whether anything ever opened it."""

    def __init__(self, path: Path) -> None:
        self.path, self.opened, self._closing = path, False, threading.Event()
        os.mkfifo(path)
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        with open(self.path, "wb"):  # returns as soon as a reader opens the fifo
            self.opened = not self._closing.is_set()

    def close(self) -> bool:
        """Stops watching; returns whether something opened the file."""
        self._closing.set()
        os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))  # releases the waiting writer
        self._thread.join(10)
        return self.opened


def _playlist(segment: Path) -> str:
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{segment}\n#EXT-X-ENDLIST\n"


def _late_after_one_second(_: int, packet: av.Packet) -> av.Packet:
    if packet.pts * packet.time_base >= 1.0:
        packet.pts, packet.dts = packet.pts + int(0.5 / packet.time_base), packet.dts + int(0.5 / packet.time_base)
    return packet


def _garble_every_other(i: int, packet: av.Packet) -> av.Packet:
    if i < 3 or i % 2:
        return packet
    bad = av.Packet(np.random.default_rng(i).bytes(packet.size))
    bad.pts, bad.dts, bad.time_base, bad.duration = packet.pts, packet.dts, packet.time_base, packet.duration
    return bad


def test_forged_and_damaged_files_get_one_outcome_each_under_the_memory_cap(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    tone = (np.sin(np.arange(32000) / 5) * 3000).astype(np.int16).tobytes()  # 2 s at 16 kHz
    noise = np.random.default_rng(4).integers(-3000, 3000, 10 << 20, dtype=np.int16).tobytes()
    # 20 MB of samples under a header that claims 2 GHz: one "second" of it used to be the whole file, buffered.
    (src / "two-gigahertz.wav").write_bytes(_wav_header(len(noise), rate=2_000_000_000) + noise)
    (src / "claims-2-gb.wav").write_bytes(_wav_header(2 << 30) + tone)  # the header's size is a lie: 2 s follow
    (src / "64-channels.wav").write_bytes(_wav_header(16000 * 128, channels=64) + bytes(16000 * 128))
    # The largest stream still accepted: 0.25 s at 384 kHz x 32 channels (no channel mask, so no known order: the
    # decoder averages the channels itself), a 1 kHz tone at a quarter of full scale on every channel.
    wave = (np.sin(2 * np.pi * 1000 * np.arange(96_000) / 384_000) * 8192).astype(np.int16)
    highest = np.repeat(wave, 32).tobytes()
    (src / "384k-32ch.wav").write_bytes(_wav_header(len(highest), rate=384_000, channels=32) + highest)
    # The hazard is real: FFmpeg left to probe on its own follows a playlist to a file anywhere.
    real = tmp_path / "real.ts"
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=2", "-c:a", "aac", "-f", "mpegts", real.as_posix())
    (tmp_path / "probe.m3u8").write_text(_playlist(real))
    with av.open((tmp_path / "probe.m3u8").as_posix()) as followed:
        assert followed.format.name == "hls"
    detector = _OpenDetector(tmp_path / "secret.ts")
    (src / "playlist.m3u8").write_text(_playlist(detector.path))
    (src / "id3-playlist.mp3").write_bytes(b"ID3\x04\x00\x00\x00\x00\x00\x00" + _playlist(detector.path).encode())
    clean = tmp_path / "clean.mkv"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:duration=4", "-c:a", "aac", clean.as_posix())
    _remux(clean, src / "gap.ts", "mpegts", _late_after_one_second)
    _remux(clean, src / "every-other-packet-garbled.mkv", "matroska", _garble_every_other)
    expected = {
        "two-gigahertz.wav": ("failed", "UnsupportedStream"),
        "claims-2-gb.wav": ("decoded", None),
        "64-channels.wav": ("failed", "UnsupportedStream"),
        "384k-32ch.wav": ("decoded", None),
        "playlist.m3u8": ("failed", "UnsupportedFormat"),
        "id3-playlist.mp3": ("failed", "DecodeError"),
        "gap.ts": ("decoded", None),
        "every-other-packet-garbled.mkv": ("failed", "Damaged"),
    }
    source, out = LocalStore(src), LocalStore(tmp_path / "out")
    pool = PoolSettings(workers=2, timeout_s=120, memory_limit_bytes=CAP)
    outcomes, durations, gaps, keys = {}, {}, {}, {}
    for shard in shard_partitions.get_partition_keys():
        build_index(source, out, shard, NUM_SHARDS)
        decode_shard(source, out, shard, DecodeSettings(1 << 30, 3600.0), pool)
        assert reconcile_audio(out, shard).passed
        if out.exists(layout.audio_manifest_key(shard)):
            for row in pq.read_table(out.local_path(layout.audio_manifest_key(shard))).to_pylist():
                name = Path(row["uri"]).name
                assert name not in outcomes
                outcomes[name], durations[name] = (row["status"], row["error_class"]), row["duration_s"]
                gaps[name], keys[name] = row["gap_s"], row["audio_key"]
    assert outcomes == expected
    assert durations["claims-2-gb.wav"] == pytest.approx(2.0) and durations["384k-32ch.wav"] == pytest.approx(0.25)
    assert not detector.close()  # the playlists never reached the file outside the source
    assert gaps["gap.ts"] == pytest.approx(0.5, abs=0.03) and gaps["claims-2-gb.wav"] == 0.0
    assert durations["gap.ts"] == pytest.approx(4.5, abs=0.06)  # the timeline: 4 s of tone and the 0.5 s gap
    audio = sf.read(out.local_path(keys["384k-32ch.wav"]), dtype="float32")[0]
    assert np.sqrt((audio[400:-400] ** 2).mean()) == pytest.approx(0.25 / np.sqrt(2), rel=0.05)
    # The forged rate is refused before decoding: the worker stays small, far under its cap.
    job = DecodeJob("fast", "fast", src / "two-gigahertz.wav", tmp_path / "fast.flac", 1 << 30, 3600.0)
    [outcome] = run_pool(decode_and_peak_rss, [job], workers=1, timeout_s=120, memory_limit_bytes=CAP)
    result, peak_rss = outcome.result
    assert result.error_class == "UnsupportedStream" and "2000000000 Hz" in result.error
    assert peak_rss < 1 << 30


def test_an_item_over_the_memory_cap_fails_alone_as_memory_limit() -> None:
    jobs = [16, 8 << 10, 1 << 10, 64]  # MiB: 8 GiB cannot fit under the 3 GiB cap, 1 GiB does
    outcomes = {o.job: o for o in run_pool(allocate, jobs, workers=2, timeout_s=120, memory_limit_bytes=CAP)}
    assert isinstance(outcomes[8 << 10].error, MemoryLimit) and "3 GiB per-worker cap" in str(outcomes[8 << 10].error)
    assert {j: o.result for j, o in outcomes.items() if j != 8 << 10} == {16: 16, 1 << 10: 1 << 10, 64: 64}


def test_oom_kills_are_read_from_the_cgroup(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n")
    assert _oom_kills(str(events)) == 2
    assert _oom_kills(str(tmp_path / "missing")) == 0
