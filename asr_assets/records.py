"""Data contracts: the rows each asset writes, as frozen dataclasses, and their Parquet schemas.

Times are seconds (float) from the start of the source file unless a field says otherwise; audio is 16 kHz mono.
A dataclass and its schema list the same fields in the same order; ``to_table`` checks that.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import pyarrow as pa

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class MediaRow:
    """One media object in the index.

    Attributes:
        media_id: 32 hex chars of blake2b over the uri and the version (``partitions.media_id``); stable, and the id
            every later row refers to. A replaced object gets a new id; the older row is then retired
            (``layout.retired_media``).
        uri: full uri of the object (``file:///...``).
        key: path of the object relative to the source root.
        size: bytes.
        mtime: last modification, seconds since the epoch.
        extension: lower-case file extension without the dot ("" when none).
        discovered_at: when the index first saw the object (UTC).
        version: what identifies this content of the uri (``ObjectInfo.version``: size and mtime in nanoseconds
            locally, the ETag on OSS; "" when a manifest gives neither).
    """

    media_id: str
    uri: str
    key: str
    size: int
    mtime: float
    extension: str
    discovered_at: datetime
    version: str = ""


MEDIA_SCHEMA = pa.schema(
    [
        ("media_id", pa.string()),
        ("uri", pa.string()),
        ("key", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.float64()),
        ("extension", pa.string()),
        ("discovered_at", pa.timestamp("us", tz="UTC")),
        ("version", pa.string()),
    ]
)


@dataclass(frozen=True)
class AudioRow:
    """The outcome of decoding one media object (``audio_wav``).

    Attributes:
        media_id: the index row this outcome belongs to.
        uri: the source object.
        status: ``decoded``, ``failed`` (then the item is also in the dead-letter table) or ``superseded`` (an object
            version replaced before it was decoded: its bytes are gone, the newer version has its own row).
        audio_key: output key of the 16 kHz mono FLAC (None when failed).
        duration_s: decoded duration in seconds (None when failed).
        detected_format: container family detected from the file's first bytes (``mp3``, ``mp4``, ``unknown``...).
        container: FFmpeg's demuxer name (None when the file did not open).
        codec: audio codec name.
        source_sample_rate: Hz of the source audio stream.
        source_channels: channel count of the source audio stream.
        error_class: short error kind when failed (``EmptyFile``, ``NoAudioStream``, ``DecodeError``, ...).
        error: readable message when failed.
        seconds: wall time spent on the item in the worker.
        gap_s: seconds of silence filled in where the source's timestamps jump ahead of its audio (so times stay
            times in the source). None when the file did not decode, and in tables written before it existed.
        skipped_packets: corrupt packets the decoder dropped (None as for ``gap_s``).
        pcm_sha256: SHA-256 of the decoded samples as 16-bit integers: files with equal audio share it (None as for
            ``gap_s``).
    """

    media_id: str
    uri: str
    status: str
    audio_key: str | None
    duration_s: float | None
    detected_format: str
    container: str | None
    codec: str | None
    source_sample_rate: int | None
    source_channels: int | None
    error_class: str | None
    error: str | None
    seconds: float
    gap_s: float | None = None
    skipped_packets: int | None = None
    pcm_sha256: str | None = None


AUDIO_SCHEMA = pa.schema(
    [
        ("media_id", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),
        ("audio_key", pa.string()),
        ("duration_s", pa.float64()),
        ("detected_format", pa.string()),
        ("container", pa.string()),
        ("codec", pa.string()),
        ("source_sample_rate", pa.int32()),
        ("source_channels", pa.int32()),
        ("error_class", pa.string()),
        ("error", pa.string()),
        ("seconds", pa.float64()),
        ("gap_s", pa.float64()),
        ("skipped_packets", pa.int32()),
        ("pcm_sha256", pa.string()),
    ]
)


@dataclass(frozen=True)
class DeadLetterRow:
    """An item a stage could not process, with the reason. Every failed item of every stage has exactly one.

    Attributes:
        item_id: ``media_id`` for media stages, ``segment_id`` for segment stages.
        uri: the source object the item came from.
        stage: the asset that failed it.
        error_class: short error kind (``DecodeError``, ``Timeout``, ``WorkerCrashed``...).
        message: readable message naming the item, the stage and the cause.
        attempt: 1 for the first failure.
        time: when it was recorded (UTC).
    """

    item_id: str
    uri: str
    stage: str
    error_class: str
    message: str
    attempt: int
    time: datetime


DEAD_LETTER_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("uri", pa.string()),
        ("stage", pa.string()),
        ("error_class", pa.string()),
        ("message", pa.string()),
        ("attempt", pa.int32()),
        ("time", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class VadMediaRow:
    """The VAD outcome of one decoded media object (``vad_segments``), also when it has no speech.

    Attributes:
        media_id: the decoded media.
        duration_s: audio duration in seconds.
        speech_s: total duration of its segments in seconds.
        num_segments: how many segments it was cut into (0: no speech found).
    """

    media_id: str
    duration_s: float
    speech_s: float
    num_segments: int


VAD_MEDIA_SCHEMA = pa.schema(
    [
        ("media_id", pa.string()),
        ("duration_s", pa.float64()),
        ("speech_s", pa.float64()),
        ("num_segments", pa.int32()),
    ]
)


@dataclass(frozen=True)
class SegmentRow:
    """A speech segment found by VAD.

    Attributes:
        segment_id: ``f"{media_id}-{index:05d}"``.
        media_id: the media it was cut from.
        index: position of the segment in its media, from 0.
        start_s: start in the media, seconds (padding included).
        end_s: end in the media, seconds (padding included).
        prob_mean: mean Silero speech probability over the segment's 32 ms windows.
        prob_min: lowest window probability inside the segment.
        prob_max: highest window probability inside the segment.
        vad_model_sha256: SHA-256 of the Silero ONNX file that found it.
        vad_params: the VAD parameters as canonical JSON.
        speech_s: voiced time inside the segment, seconds: its 32 ms windows at or above the VAD threshold (padding
            and pauses excluded; the speaking-rate rules divide by it). None in tables written before it existed.
    """

    segment_id: str
    media_id: str
    index: int
    start_s: float
    end_s: float
    prob_mean: float
    prob_min: float
    prob_max: float
    vad_model_sha256: str
    vad_params: str
    speech_s: float | None = None


SEGMENT_SCHEMA = pa.schema(
    [
        ("segment_id", pa.string()),
        ("media_id", pa.string()),
        ("index", pa.int32()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("prob_mean", pa.float32()),
        ("prob_min", pa.float32()),
        ("prob_max", pa.float32()),
        ("vad_model_sha256", pa.string()),
        ("vad_params", pa.string()),
        ("speech_s", pa.float64()),
    ]
)


@dataclass(frozen=True)
class FeatureRow:
    """A cut segment with its measurements and where its audio is packed (``segment_features``).

    Attributes:
        segment_id: the VAD segment.
        media_id: the media it was cut from.
        start_s: start in the media, seconds.
        end_s: end in the media, seconds.
        duration_s: end - start, seconds.
        rms_dbfs: RMS level, dB relative to full scale (-120 for digital silence).
        peak_dbfs: peak level, dBFS.
        clip_ratio: fraction of samples at or above 0.999 of full scale.
        snr_db: segment RMS over the RMS of the media's non-speech parts, dB (None when under 0.5 s of non-speech).
        prob_mean: mean VAD speech probability (copied from the segment).
        prob_min: lowest VAD window probability.
        audio_key: packed FLAC object holding the segment's samples.
        audio_offset: first frame of the segment in that object.
        audio_frames: number of frames (16 kHz samples).
        mel_key: Parquet part holding the segment's Whisper log-mel features (None when they were not computed).
        dnsmos_sig: DNSMOS P.835 speech signal quality, 1-5 (None when the segment was not in the scored sample).
        dnsmos_bak: DNSMOS background quality, 1-5 (higher: less intrusive noise; None when not scored).
        dnsmos_ovrl: DNSMOS overall quality, 1-5 (None when not scored).
    """

    segment_id: str
    media_id: str
    start_s: float
    end_s: float
    duration_s: float
    rms_dbfs: float
    peak_dbfs: float
    clip_ratio: float
    snr_db: float | None
    prob_mean: float
    prob_min: float
    audio_key: str
    audio_offset: int
    audio_frames: int
    mel_key: str | None
    dnsmos_sig: float | None = None
    dnsmos_bak: float | None = None
    dnsmos_ovrl: float | None = None


FEATURE_SCHEMA = pa.schema(
    [
        ("segment_id", pa.string()),
        ("media_id", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("rms_dbfs", pa.float32()),
        ("peak_dbfs", pa.float32()),
        ("clip_ratio", pa.float32()),
        ("snr_db", pa.float32()),
        ("prob_mean", pa.float32()),
        ("prob_min", pa.float32()),
        ("audio_key", pa.string()),
        ("audio_offset", pa.int64()),
        ("audio_frames", pa.int64()),
        ("mel_key", pa.string()),
        ("dnsmos_sig", pa.float32()),
        ("dnsmos_bak", pa.float32()),
        ("dnsmos_ovrl", pa.float32()),
    ]
)

# Log-mel parts (segment_features/{shard}/mel-part-{k}.parquet): one row per segment, the features as float16 bytes of
# shape (n_mels, frames), row-major.
MEL_SCHEMA = pa.schema(
    [("segment_id", pa.string()), ("n_mels", pa.int16()), ("frames", pa.int32()), ("mel", pa.binary())]
)


@dataclass(frozen=True)
class TranscriptRow:
    """The teacher's label for one segment (``transcripts``).

    Attributes:
        segment_id: the segment.
        media_id: its media.
        text: the transcript, stripped.
        language: language the teacher was asked for or detected (ISO 639-1).
        num_tokens: generated tokens.
        avg_logprob: mean log probability per generated token (None when no tokens).
        no_speech_prob: the engine's probability that there is no speech (Whisper), else None.
        compression_ratio: zlib compression ratio of the text (high: repetition loop), else None.
        finish_reason: ``stop`` or ``length`` (hit the token limit: likely a loop).
        model_id: the teacher model.
        engine: the registered engine name.
        settings_hash: hash of every engine and decoding setting that can change the output.
        prompt_version: version of the prompt or decoding recipe.
        second_text: an independent model's transcript of the same audio (the second opinion), stripped; None when
            the segment was not sampled for one, or the second model failed on it.
        second_model_id: the second opinion's model (None when ``second_text`` is None).
        disagreement: normalized error rate of ``second_text`` against ``text`` in [0, 1] (WER; CER for zh, ja, ko,
            th; 0 = the same words, 1 = nothing in common); None without a second opinion.
        language_prob: probability of ``language`` from spoken language ID (``ASR_LANGUAGE=auto``); None when the
            language was fixed.
        lid_model: the language ID model (None when the language was fixed).
    """

    segment_id: str
    media_id: str
    text: str
    language: str
    num_tokens: int
    avg_logprob: float | None
    no_speech_prob: float | None
    compression_ratio: float | None
    finish_reason: str
    model_id: str
    engine: str
    settings_hash: str
    prompt_version: str
    second_text: str | None = None
    second_model_id: str | None = None
    disagreement: float | None = None
    language_prob: float | None = None
    lid_model: str | None = None


TRANSCRIPT_SCHEMA = pa.schema(
    [
        ("segment_id", pa.string()),
        ("media_id", pa.string()),
        ("text", pa.string()),
        ("language", pa.string()),
        ("num_tokens", pa.int32()),
        ("avg_logprob", pa.float32()),
        ("no_speech_prob", pa.float32()),
        ("compression_ratio", pa.float32()),
        ("finish_reason", pa.string()),
        ("model_id", pa.string()),
        ("engine", pa.string()),
        ("settings_hash", pa.string()),
        ("prompt_version", pa.string()),
        ("second_text", pa.string()),
        ("second_model_id", pa.string()),
        ("disagreement", pa.float32()),
        ("language_prob", pa.float32()),
        ("lid_model", pa.string()),
    ]
)


@dataclass(frozen=True)
class DecisionRow:
    """The filter decision for one transcribed segment (``distilled_dataset``).

    Attributes:
        segment_id: the segment.
        media_id: its media.
        kept: whether it went into the dataset.
        drop_reason: the first rule that dropped it (None when kept).
        would_drop: every rule that would have dropped it, in rule order.
        tar_key: the tar shard holding it (None when dropped).
        duplicate_of: dropped as ``duplicate`` (or a copy found in an evaluation set too): the kept segment.
        similarity: the share of its landmarks that matched the kept copy or the evaluation recording.
        duplicate_kind: ``exact``, ``re_encode`` or ``contained_clip``.
        eval_set: dropped as ``eval_contamination``: the evaluation set it was found in.
    """

    segment_id: str
    media_id: str
    kept: bool
    drop_reason: str | None
    would_drop: list[str]
    tar_key: str | None
    duplicate_of: str | None = None
    similarity: float | None = None
    duplicate_kind: str | None = None
    eval_set: str | None = None


DECISION_SCHEMA = pa.schema(
    [
        ("segment_id", pa.string()),
        ("media_id", pa.string()),
        ("kept", pa.bool_()),
        ("drop_reason", pa.string()),
        ("would_drop", pa.list_(pa.string())),
        ("tar_key", pa.string()),
        ("duplicate_of", pa.string()),
        ("similarity", pa.float64()),
        ("duplicate_kind", pa.string()),
        ("eval_set", pa.string()),
    ]
)


def to_table(rows: Iterable[object], schema: pa.Schema) -> pa.Table:
    """Converts dataclass rows to a table of ``schema``."""
    dicts = [dataclasses.asdict(row) for row in rows]  # type: ignore[call-overload]
    if dicts and list(dicts[0]) != schema.names:
        raise TypeError(f"row fields {list(dicts[0])} do not match schema {schema.names}")
    return pa.Table.from_pylist(dicts, schema=schema)
