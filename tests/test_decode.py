"""Decoding: content sniffing, every container of the sample corpus, a video's audio track, and each broken kind."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from asr_assets.media import DecodeJob, decode_media, sniff_file, sniff_format
from asr_assets.sample_corpus import Corpus

LIMITS = {"max_bytes": 1 << 30, "max_duration_s": 3600.0}


def _decode(src: Path, tmp_path: Path, **limits) -> tuple:
    dst = tmp_path / f"{src.stem}.flac"
    job = DecodeJob(media_id="m", uri=str(src), src=src, dst=dst, **{**LIMITS, **limits})
    return decode_media(job), dst


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "wav"),
        (b"RIFF\x00\x00\x00\x00AVI LIST", "avi"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00", "mp3"),
        (b"\xff\xfb\x90\x64\x00\x00\x00\x00", "mp3"),
        (b"\xff\xf1\x50\x80\x00\x1f\xfc\x00", "aac"),
        (b"fLaC\x00\x00\x00\x22", "flac"),
        (b"OggS\x00\x02\x00\x00", "ogg"),
        (b"\x00\x00\x00\x20ftypisom", "mp4"),
        (b"\x1a\x45\xdf\xa3\x01\x00\x00\x00", "mkv"),
        (b"FLV\x01\x05\x00\x00\x00\x09", "flv"),
        (bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c"), "asf"),
        (b"hello, this is text", "unknown"),
        (b"", "unknown"),
    ],
)
def test_sniff_format(head: bytes, expected: str) -> None:
    assert sniff_format(head) == expected


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "ogg", "opus", "m4a", "mp4"])
def test_each_container_decodes_to_16k_mono(corpus: Corpus, tmp_path: Path, fmt: str) -> None:
    item = next(i for i in corpus.items if i.path.endswith(f".{fmt}") and not i.broken)
    result, dst = _decode(corpus.media_dir / item.path, tmp_path)
    assert result.error_class is None, result.error
    audio, rate = sf.read(dst)
    assert rate == 16_000 and audio.ndim == 1
    expected_s = item.speech[-1][1] + 0.5  # the generator's 0.5 s tail
    assert abs(len(audio) / rate - expected_s) < 0.06  # AAC priming/padding adds up to ~46 ms
    assert result.duration_s == pytest.approx(len(audio) / rate)
    assert (result.gap_s, result.skipped_packets) == (0.0, 0)  # priming and encoder delay are not gaps
    # Speech is where the references say: louder inside the first sentence than in the lead-in silence.
    start, end = item.speech[0]
    speech = audio[int(start * rate) : int(end * rate)]
    lead = audio[: int(0.4 * rate)]
    assert (speech**2).mean() > 100 * (lead**2).mean()


def test_video_decodes_its_audio_track(corpus: Corpus, tmp_path: Path) -> None:
    item = next(i for i in corpus.items if i.path.endswith(".mp4") and not i.broken)
    result, _ = _decode(corpus.media_dir / item.path, tmp_path)
    assert result.error_class is None
    assert result.detected_format == "mp4" and result.codec == "aac"


@pytest.mark.parametrize(
    ("kind", "error_class"),
    [
        ("empty", "EmptyFile"),
        ("random", "UnsupportedFormat"),
        ("text", "UnsupportedFormat"),
        ("noaudio", "NoAudioStream"),
    ],
)
def test_broken_files_fail_with_a_reason_and_leave_nothing(corpus: Corpus, tmp_path: Path, kind, error_class) -> None:
    item = next(i for i in corpus.items if i.broken == kind)
    result, dst = _decode(corpus.media_dir / item.path, tmp_path)
    assert result.error_class == error_class
    assert item.path in result.error and result.error.startswith("audio_wav: media m (")
    assert not dst.exists()


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def test_multichannel_48k_and_8k_are_resampled(tmp_path: Path) -> None:
    six = tmp_path / "six.wav"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=2", "-ac", "6", six.as_posix())
    low = tmp_path / "low.wav"
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=8000:duration=2", low.as_posix())
    for src, channels, rate in ((six, 6, 48000), (low, 1, 8000)):
        result, dst = _decode(src, tmp_path)
        assert result.error_class is None, result.error
        assert (result.source_channels, result.source_sample_rate) == (channels, rate)
        assert sf.info(dst).samplerate == 16_000 and sf.info(dst).channels == 1
        assert result.duration_s == pytest.approx(2.0, abs=0.01)


def test_mp3_named_wav_is_detected_by_content(corpus: Corpus, tmp_path: Path) -> None:
    mp3 = next(i for i in corpus.items if i.path.endswith(".mp3") and not i.broken)
    disguised = tmp_path / "disguised.wav"
    disguised.write_bytes((corpus.media_dir / mp3.path).read_bytes())
    result, _ = _decode(disguised, tmp_path)
    assert result.error_class is None and result.detected_format == "mp3"


def test_limits_refuse_before_decoding(corpus: Corpus, tmp_path: Path) -> None:
    item = next(i for i in corpus.items if i.path.endswith(".flac") and not i.broken)
    src = corpus.media_dir / item.path
    too_big, _ = _decode(src, tmp_path, max_bytes=100)
    assert too_big.error_class == "TooLarge"
    too_long, dst = _decode(src, tmp_path, max_duration_s=1.0)
    assert too_long.error_class == "TooLong" and not dst.exists()


def _remux(src: Path, dst: Path, fmt: str, edit: Callable[[int, av.Packet], av.Packet]) -> None:
    """Copies ``src``'s audio packets into a new ``fmt`` container, each passed through ``edit(index, packet)``."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format=fmt) as out:
        stream = out.add_stream_from_template(inp.streams.audio[0])
        for i, packet in enumerate(inp.demux(inp.streams.audio[0])):
            if packet.size:
                packet = edit(i, packet)
                packet.stream = stream
                out.mux(packet)


def _sine(tmp_path: Path, codec: str, seconds: float = 4.0) -> Path:
    clean = tmp_path / f"clean-{codec}.mkv"
    _ffmpeg("-f", "lavfi", "-i", f"sine=frequency=300:sample_rate=44100:duration={seconds}", "-c:a", codec, str(clean))
    return clean


def _rms(audio: np.ndarray, start_s: float, end_s: float) -> float:
    return float(np.sqrt((audio[int(start_s * 16000) : int(end_s * 16000)] ** 2).mean()))


@pytest.mark.parametrize("codec", ["libmp3lame", "mp2"])
def test_a_timestamp_gap_becomes_silence_where_it_was(tmp_path: Path, codec: str) -> None:
    """Packets from 1.0 s on are stamped 0.5 s later (a dropout in a recorded stream): the decoded audio keeps the
    source's timeline, so a segment found at 3 s is at 3 s in the source."""

    def shifted(_: int, packet: av.Packet) -> av.Packet:
        if packet.pts * packet.time_base >= 1.0:
            late = int(0.5 / packet.time_base)
            packet.pts, packet.dts = packet.pts + late, packet.dts + late
        return packet

    clean = _sine(tmp_path, codec)
    gapped = tmp_path / "gapped.ts"
    _remux(clean, gapped, "mpegts", shifted)
    clean_result, _ = _decode(clean, tmp_path)
    result, dst = _decode(gapped, tmp_path)
    assert result.error_class is None, result.error
    assert clean_result.gap_s == 0.0 and result.skipped_packets == 0
    assert result.gap_s == pytest.approx(0.5, abs=0.03)
    assert result.duration_s == pytest.approx(clean_result.duration_s + 0.5, abs=0.03)
    audio, _ = sf.read(dst, dtype="float32")
    assert _rms(audio, 1.15, 1.45) < 1e-3  # the gap is silent...
    assert (
        _rms(audio, 0.2, 0.9) > 0.05 and _rms(audio, 1.7, 4.3) > 0.05
    )  # ...and the tone (rms 0.088) is on both sides of it


@pytest.mark.parametrize(("every", "error_class"), [(2, "Damaged"), (25, None)])
def test_corrupt_packets_are_counted_and_a_mostly_broken_file_is_damaged(
    tmp_path: Path, every: int, error_class: str | None
) -> None:
    rng = np.random.default_rng(every)

    def garbled(i: int, packet: av.Packet) -> av.Packet:
        if i < 3 or i % every:
            return packet
        bad = av.Packet(rng.bytes(packet.size))
        bad.pts, bad.dts, bad.time_base, bad.duration = packet.pts, packet.dts, packet.time_base, packet.duration
        return bad

    clean = _sine(tmp_path, "aac")
    broken = tmp_path / "broken.mkv"
    _remux(clean, broken, "matroska", garbled)
    clean_result, _ = _decode(clean, tmp_path)
    result, dst = _decode(broken, tmp_path, max_damaged_fraction=0.2)
    assert result.error_class == error_class, result.error
    assert result.skipped_packets >= 172 // every // 2  # 4 s of 1024-sample AAC frames is ~172 packets
    assert result.gap_s > 0
    if error_class:
        assert "corrupt packets skipped" in result.error and "over the 20% limit" in result.error
        assert not dst.exists()
    else:
        assert result.duration_s == pytest.approx(clean_result.duration_s, abs=0.03)  # holes filled, not dropped


def test_aac_and_flac_behind_an_id3_tag_keep_their_demuxer(tmp_path: Path) -> None:
    tag = b"ID3\x04\x00\x00\x00\x00\x00\x05" + b"\x00" * 5  # an ID3v2.4 header and 5 bytes of padding
    for codec, fmt, family in (("aac", "adts", "aac"), ("flac", "flac", "flac")):
        plain = tmp_path / f"plain.{fmt}"
        _ffmpeg("-f", "lavfi", "-i", "sine=frequency=300:duration=1", "-c:a", codec, "-f", fmt, str(plain))
        tagged = tmp_path / f"tagged-{fmt}.mp3"
        tagged.write_bytes(tag + plain.read_bytes())
        assert sniff_file(tagged) == family
        result, _ = _decode(tagged, tmp_path)
        assert result.error_class is None, result.error
        assert result.detected_format == family and result.duration_s == pytest.approx(1.0, abs=0.05)
