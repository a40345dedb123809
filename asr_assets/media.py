"""Probe and decode media to 16 kHz mono FLAC with FFmpeg (through PyAV, in-process).

Runs inside pool workers: this module must stay import-light and never import Dagster or the definitions.
Why PyAV rather than one ``ffmpeg`` CLI process per file: see README "Decoding" (bench/decode.py measures both).
"""

from __future__ import annotations

import errno
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from asr_assets.fingerprint import PcmHasher
from asr_assets.records import SAMPLE_RATE

# Container families recognised from the first bytes of a file. Order matters: more specific signatures first.
_SIGNATURES: tuple[tuple[str, int, bytes], ...] = (
    ("flac", 0, b"fLaC"),
    ("ogg", 0, b"OggS"),
    ("mkv", 0, b"\x1a\x45\xdf\xa3"),  # EBML: Matroska and WebM
    ("flv", 0, b"FLV"),
    ("asf", 0, bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c")),  # wma/wmv
    ("mp3", 0, b"ID3"),
    ("caf", 0, b"caff"),
    ("amr", 0, b"#!AMR"),
)

# The FFmpeg demuxer for each sniffed family. The file is opened with that demuxer only (never FFmpeg's own probing)
# and only through the ``file`` protocol: a file that sniffs as mp3 but is an HLS playlist or a concat list behind an
# ID3 tag must not make FFmpeg open other files (``format_whitelist`` also binds demuxers nested inside this one).
DEMUXERS: dict[str, str] = {
    "flac": "flac",
    "ogg": "ogg",
    "mkv": "matroska",
    "flv": "flv",
    "asf": "asf",
    "mp3": "mp3",
    "caf": "caf",
    "amr": "amr",
    "wav": "wav",
    "avi": "avi",
    "aiff": "aiff",
    "mp4": "mov",
    "aac": "aac",
    "ts": "mpegts",
}

# Streams beyond these are refused before decoding: no real recording needs them, and a forged header (a WAV
# claiming 2 GHz) would otherwise make one second of audio, the decoder's unit of work, gigabytes.
MAX_SOURCE_SAMPLE_RATE = 384_000
MAX_SOURCE_CHANNELS = 32
# Samples x channels held in one chunk before resampling: 8 MiB even as doubles, whatever the stream claims.
MAX_CHUNK_VALUES = 1 << 20
# Timestamps later than the audio decoded so far by more than this are a gap, filled with silence. Decoders overlap
# or trim a few ms at block edges (Vorbis: 128 samples), so smaller differences are jitter, not damage.
GAP_TOLERANCE_S = 0.02


class MediaError(Exception):
    """An item-level failure with a short kind; the item is dead-lettered, the shard goes on."""

    kind = "MediaError"


class EmptyFile(MediaError):
    kind = "EmptyFile"


class TooLarge(MediaError):
    kind = "TooLarge"


class UnsupportedFormat(MediaError):
    kind = "UnsupportedFormat"


class NoAudioStream(MediaError):
    kind = "NoAudioStream"


class DecodeError(MediaError):
    kind = "DecodeError"


class TooLong(MediaError):
    kind = "TooLong"


class EmptyAudio(MediaError):
    kind = "EmptyAudio"


class UnsupportedStream(MediaError):
    kind = "UnsupportedStream"


class Damaged(MediaError):
    kind = "Damaged"


def sniff_format(head: bytes) -> str:
    """The container family of a file from its first bytes (``unknown`` when nothing matches).

    Args:
        head: at least the first 16 bytes of the file (64 recommended).
    """
    for name, offset, magic in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return name
    if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"AVI "):
        return "wav" if head[8:12] == b"WAVE" else "avi"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[4:8] == b"ftyp":
        return "mp4"  # ISO base media: mp4, m4a, mov, 3gp
    if head[:4] in (b"\x00\x00\x00\x14", b"\x00\x00\x00\x08") and head[4:8] in (b"wide", b"mdat", b"moov"):
        return "mp4"  # QuickTime without ftyp
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xF6) == 0xF0:
        return "aac"  # ADTS
    if len(head) >= 2 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0 and (head[1] & 0x06) != 0:
        return "mp3"  # MPEG audio frame sync without an ID3 tag
    if head[:1] == b"\x47" and len(head) > 188 and head[188:189] == b"\x47":
        return "ts"
    return "unknown"


def sniff_file(path: Path) -> str:
    """The container family of a file, looking past an ID3v2 tag: FFmpeg skips the tag whatever the demuxer, and
    ADTS AAC and FLAC files are found behind one too (anything else behind it is read as mp3)."""
    with open(path, "rb") as f:
        head = f.read(512)
        family = sniff_format(head)
        if head[:3] != b"ID3" or len(head) < 10:
            return family
        size = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(head[6:10])) + (10 if head[5] & 0x10 else 0)
        f.seek(size)
        inner = sniff_format(f.read(512))
    return inner if inner in ("aac", "flac") else family


@dataclass(frozen=True)
class DecodeJob:
    """One media object to decode in a worker.

    Attributes:
        media_id: the index id.
        uri: the source uri, for messages.
        src: local path of the media.
        dst: local path for the FLAC output (written whole; the caller moves it into the store).
        max_bytes: files larger than this are refused before decoding.
        max_duration_s: audio longer than this is refused (by the probed duration, or while decoding).
        max_damaged_fraction: a file whose timestamp gaps and skipped corrupt packets add up to more than this
            fraction of its duration is refused as Damaged.
    """

    media_id: str
    uri: str
    src: Path
    dst: Path
    max_bytes: int
    max_duration_s: float
    max_damaged_fraction: float = 1.0


@dataclass(frozen=True)
class DecodeResult:
    """What a worker found and wrote for one media object.

    Attributes:
        media_id: the index id.
        detected_format: container family from the file's first bytes.
        error_class: the MediaError kind when it failed, else None.
        error: readable message when it failed.
        container: FFmpeg's demuxer name, when the file opened.
        codec: audio codec name.
        source_sample_rate: Hz of the source stream.
        source_channels: channels of the source stream.
        duration_s: decoded seconds at 16 kHz.
        seconds: wall time spent.
        gap_s: seconds of silence filled in where the stream's timestamps jump ahead of its audio.
        skipped_packets: corrupt packets the decoder refused (their time is silence when the timestamps show it).
        pcm_sha256: SHA-256 of the decoded 16 kHz samples as 16-bit integers (exact duplicates share it).
    """

    media_id: str
    detected_format: str
    error_class: str | None = None
    error: str | None = None
    container: str | None = None
    codec: str | None = None
    source_sample_rate: int | None = None
    source_channels: int | None = None
    duration_s: float | None = None
    seconds: float = 0.0
    gap_s: float | None = None
    skipped_packets: int | None = None
    pcm_sha256: str | None = None


def _raise_if_disk_full(dst: Path, exc: BaseException) -> None:
    # libsndfile reports a full disk as a generic "System error": look at the disk before blaming the file.
    if shutil.disk_usage(dst.parent).free < 1 << 20:
        dst.unlink(missing_ok=True)
        raise OSError(errno.ENOSPC, f"no space left on the device of {dst.parent} while writing {dst.name} ({exc})")


def decode_media(job: DecodeJob) -> DecodeResult:
    """Probes ``job.src`` and decodes its first audio stream to 16 kHz mono 16-bit FLAC at ``job.dst``.

    Never raises for a bad file: the failure comes back as ``error_class``/``error`` and no output is left behind.
    """
    started = time.perf_counter()
    detected = "unknown"
    info: dict[str, object] = {}
    try:
        status = job.src.stat()
        if stat.S_ISREG(status.st_mode):  # a stream (fifo, device) has no size to check before reading
            if status.st_size == 0:
                raise EmptyFile("file is empty (0 bytes)")
            if status.st_size > job.max_bytes:
                raise TooLarge(f"file is {status.st_size} bytes, over the {job.max_bytes}-byte limit")
        detected = sniff_file(job.src)
        if detected == "unknown":
            raise UnsupportedFormat("content matches no supported audio or video format")
        _decode_to_flac(job, detected, info)
    except MediaError as exc:
        job.dst.unlink(missing_ok=True)
        return DecodeResult(
            media_id=job.media_id,
            detected_format=detected,
            error_class=exc.kind,
            error=f"audio_wav: media {job.media_id} ({job.uri}): {exc}",
            seconds=time.perf_counter() - started,
            **info,  # type: ignore[arg-type]
        )
    return DecodeResult(
        media_id=job.media_id,
        detected_format=detected,
        seconds=time.perf_counter() - started,
        **info,  # type: ignore[arg-type]
    )


def _decode_to_flac(job: DecodeJob, detected: str, info: dict[str, object]) -> None:
    """Decodes into ``job.dst``, filling ``info`` with what it learns as it goes (kept for failures too)."""
    demuxer = DEMUXERS[detected]
    try:
        container = av.open(
            str(job.src),
            mode="r",
            format=demuxer,
            options={"protocol_whitelist": "file", "format_whitelist": demuxer},
            metadata_errors="ignore",
        )
    except MemoryError:
        raise  # av.MemoryError is an FFmpegError too: the cap's verdict, not the file's
    except av.FFmpegError as exc:
        raise DecodeError(f"FFmpeg cannot open it as {demuxer}: {exc}") from None
    with container:
        audio_streams = container.streams.audio
        if not audio_streams:
            raise NoAudioStream(
                f"no audio stream ({container.format.name} with {len(container.streams)} other streams)"
            )
        stream = audio_streams[0]
        info.update(
            {
                "container": container.format.name,
                "codec": stream.codec_context.name,
                "source_sample_rate": stream.codec_context.sample_rate or None,
                "source_channels": stream.codec_context.channels or None,
            }
        )
        _check_stream(stream.codec_context.sample_rate, stream.codec_context.channels)
        probed = _probed_duration(container, stream)
        if probed is not None and probed > job.max_duration_s:
            raise TooLong(f"duration {probed:.0f} s is over the {job.max_duration_s:.0f} s limit")
        damage = _Damage()
        hasher = PcmHasher()
        written = _stream_to_flac(job, container, stream, damage, hasher)
        if written == 0:
            raise EmptyAudio("the audio stream decoded to no samples")
        duration = written / SAMPLE_RATE
        info.update(
            duration_s=duration,
            gap_s=damage.gap_s,
            skipped_packets=damage.skipped_packets,
            pcm_sha256=hasher.hexdigest(),
        )
        damaged = damage.damaged_s()
        timeline = duration + damage.unseen_s + damage.pending_s  # lost time that left no gap is missing from both
        if damaged > job.max_damaged_fraction * timeline:
            raise Damaged(
                f"{damaged:.2f} s of its {timeline:.2f} s are missing ({damage.gap_s:.2f} s of timestamp gaps, "
                f"{damage.skipped_packets} corrupt packets skipped): over the {job.max_damaged_fraction:.0%} limit"
            )


def _check_stream(sample_rate: int, channels: int) -> None:
    if sample_rate > MAX_SOURCE_SAMPLE_RATE:
        raise UnsupportedStream(f"sample rate {sample_rate} Hz is over the {MAX_SOURCE_SAMPLE_RATE} Hz limit")
    if channels > MAX_SOURCE_CHANNELS:
        raise UnsupportedStream(f"{channels} channels are over the {MAX_SOURCE_CHANNELS}-channel limit")


def _stream_to_flac(
    job: DecodeJob,
    container: av.container.InputContainer,
    stream: av.AudioStream,
    damage: _Damage,
    hasher: PcmHasher | None = None,
) -> int:
    """Decodes, resamples and writes the stream; returns the samples written at 16 kHz."""
    # FFmpeg's resampler (swresample) converts any layout/rate to mono 16 kHz float; audio streams to the FLAC
    # writer so a long file is never held whole in memory. Decoded frames are small (1152 samples for mp3), and
    # per-frame Python calls cost more than the decoding itself, so frames are grouped into ~1 s chunks first.
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    max_frames = int(job.max_duration_s * SAMPLE_RATE)
    written = 0
    frames = _on_timeline(_audio_frames(container, stream, damage), damage, job.max_duration_s)
    try:
        with sf.SoundFile(job.dst, "w", samplerate=SAMPLE_RATE, channels=1, format="FLAC", subtype="PCM_16") as out:
            for chunk in _chunked(frames):
                for converted in resampler.resample(_downmixed(chunk)):
                    written += _write(out, converted, hasher)
                if written > max_frames:
                    raise TooLong(f"decoded audio is over the {job.max_duration_s:.0f} s limit")
            for converted in resampler.resample(None):
                written += _write(out, converted, hasher)
    except (MediaError, MemoryError):
        raise
    except (av.FFmpegError, ValueError, RuntimeError) as exc:
        _raise_if_disk_full(job.dst, exc)
        raise DecodeError(f"decoding failed after {written / SAMPLE_RATE:.2f} s: {exc}") from None
    return written


def _probed_duration(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


@dataclass
class _Damage:
    """What decoding one file could not recover, counted as it goes.

    Attributes:
        gap_s: silence filled in for timestamp gaps.
        skipped_packets: corrupt packets dropped.
        pending_s: duration of packets dropped since the last decoded frame (not yet seen as a gap).
        unseen_s: duration of dropped packets that left no gap in the timestamps (no timestamps, or none after).
    """

    gap_s: float = 0.0
    skipped_packets: int = 0
    pending_s: float = 0.0
    unseen_s: float = 0.0

    def damaged_s(self) -> float:
        return self.gap_s + self.unseen_s + self.pending_s

    def account(self, filled_s: float) -> None:
        """A frame arrived after ``filled_s`` of filled gap: dropped packets it does not explain are lost time too."""
        self.unseen_s += max(0.0, self.pending_s - filled_s)
        self.pending_s = 0.0


def _audio_frames(container: av.container.InputContainer, stream: av.AudioStream, damage: _Damage):
    for packet in container.demux(stream):
        try:
            yield from packet.decode()
        except av.InvalidDataError:
            # One corrupt packet (common in crawled mp3s) costs that packet, not the file; it is counted, and its time
            # becomes silence where the timestamps show it (a file that yields no audio at all fails as EmptyAudio).
            damage.skipped_packets += 1
            if packet.duration and packet.time_base is not None:
                damage.pending_s += float(packet.duration * packet.time_base)


def _on_timeline(frames, damage: _Damage, max_duration_s: float):
    """Keeps decoded audio where the stream's timestamps put it: a jump ahead is filled with silence (so segment times
    stay times in the source), a jump back re-anchors. The first frame's timestamp is the origin, so encoder
    priming and a stream's start offset are not gaps."""
    origin: float | None = None
    emitted = 0.0  # seconds of audio (decoded and filled) so far
    for frame in frames:
        _check_stream(frame.sample_rate, frame.layout.nb_channels)
        filled = 0.0
        if frame.pts is not None and frame.time_base is not None:
            at = float(frame.pts * frame.time_base)
            if origin is None:
                origin = at
            lag = at - origin - emitted
            if lag > GAP_TOLERANCE_S:
                if emitted + lag > max_duration_s:
                    raise TooLong(f"a timestamp {at - origin:.0f} s in is over the {max_duration_s:.0f} s limit")
                samples = round(lag * frame.sample_rate)
                yield from _silence(frame, samples)
                filled = samples / frame.sample_rate
                emitted += filled
                damage.gap_s += filled
            elif lag < -GAP_TOLERANCE_S:
                origin = at - emitted  # timestamps went back (a discontinuity): follow them from here
        damage.account(filled)
        yield frame
        emitted += frame.samples / frame.sample_rate


def _silence(like: av.AudioFrame, samples: int):
    """Silent frames of ``samples`` in ``like``'s format, at most one chunk each."""
    fmt, channels = like.format, like.layout.nb_channels
    step = max(1, MAX_CHUNK_VALUES // channels)
    zero = 128 if fmt.name.startswith("u8") else 0  # unsigned 8-bit PCM is silent at mid-scale
    while samples > 0:
        n = min(samples, step)
        shape = (channels, n) if fmt.is_planar else (1, n * channels)
        frame = av.AudioFrame.from_ndarray(
            np.full(shape, zero, av.audio.frame.format_dtypes[fmt.name]), format=fmt.name, layout=like.layout.name
        )
        frame.sample_rate = like.sample_rate
        yield frame
        samples -= n


def _chunked(frames, seconds: float = 1.0):
    """Regroups decoded frames into chunks of about ``seconds``, at most MAX_CHUNK_VALUES samples x channels (a new
    group starts when the format changes)."""
    fifo, key = None, None
    for frame in frames:
        frame_key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if frame_key != key:
            if fifo is not None and fifo.samples:
                yield fifo.read()
            fifo, key = av.AudioFifo(), frame_key
        frame.pts = None  # the fifo checks timestamp continuity; _on_timeline has already made the audio continuous
        fifo.write(frame)
        size = max(1, min(int(frame.sample_rate * seconds), MAX_CHUNK_VALUES // frame.layout.nb_channels))
        while fifo.samples >= size:
            yield fifo.read(size)
    if fifo is not None and fifo.samples:
        yield fifo.read()


# Full scale of integer sample formats (planar or not), to bring them to float -1..1.
_FULL_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2.0**31, "s64": 2.0**63}


def _downmixed(chunk: av.AudioFrame) -> av.AudioFrame:
    """Averages the channels of a layout swresample refuses to remix (over 8 channels in no known order, as a
    32-channel WAV without a channel mask has) into mono; other chunks pass through to the resampler unchanged."""
    channels = chunk.layout.nb_channels
    if channels <= 8 or chunk.layout.name != f"{channels} channels":
        return chunk
    data = chunk.to_ndarray()
    data = data if chunk.format.is_planar else data.reshape(-1, channels).T
    base = chunk.format.name.rstrip("p")
    mono = data.astype(np.float32).mean(axis=0, keepdims=True)
    if base in _FULL_SCALE:
        mono = (mono - (128.0 if base == "u8" else 0.0)) / _FULL_SCALE[base]
    frame = av.AudioFrame.from_ndarray(mono, format="flt", layout="mono")
    frame.sample_rate = chunk.sample_rate
    return frame


def _write(out: sf.SoundFile, frame: av.AudioFrame, hasher: PcmHasher | None = None) -> int:
    samples = frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)
    out.write(np.clip(samples, -1.0, 1.0))
    if hasher is not None:  # the samples are in memory here: hashing them costs no second read of the file
        hasher.update(samples)
    return samples.shape[0]


def read_audio(path: Path, start: int = 0, frames: int = -1) -> np.ndarray:
    """Reads 16 kHz mono float32 samples from a FLAC/WAV written by this project."""
    with sf.SoundFile(path) as f:
        if f.samplerate != SAMPLE_RATE or f.channels != 1:
            raise ValueError(f"{path}: expected 16 kHz mono, got {f.samplerate} Hz x {f.channels}")
        if start:
            f.seek(start)
        return f.read(frames, dtype="float32")


class PartReader:
    """Reads segments out of packed FLAC parts, keeping up to ``keep`` parts open: a step that reads thousands of
    segments from a few parts opens each once instead of once per segment (opening a part and reading its header cost
    about a third of a segment read, measured by hand on a 5-minute part). A failed read closes its part, so a retry
    opens it afresh."""

    def __init__(self, keep: int = 4) -> None:
        self._open: dict[Path, sf.SoundFile] = {}
        self._keep = keep

    def read(self, path: Path, start: int = 0, frames: int = -1) -> np.ndarray:
        """``read_audio(path, start, frames)`` through an open handle."""
        f = self._open.pop(path, None)
        try:
            if f is None:
                f = sf.SoundFile(path)
                if f.samplerate != SAMPLE_RATE or f.channels != 1:
                    raise ValueError(f"{path}: expected 16 kHz mono, got {f.samplerate} Hz x {f.channels}")
            f.seek(start)
            samples = f.read(frames, dtype="float32")
        except BaseException:
            if f is not None:
                f.close()
            raise
        self._open[path] = f  # most recently used last
        if len(self._open) > self._keep:
            self._open.pop(next(iter(self._open))).close()
        return samples

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()
