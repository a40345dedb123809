"""Silero VAD through onnxruntime on numpy, without torch.

The ONNX model ships inside the ``silero-vad`` wheel; importing that package would import torch, so the file is located
with ``resources.packaged.package_file`` instead. The window loop and the timestamp post-processing reproduce the
semantics of silero-vad's ``get_speech_timestamps`` (same parameters, same results); it is re-implemented here
because the original lives in a module that imports torch. Runs inside pool workers: import-light, no Dagster.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from asr_assets.records import SAMPLE_RATE, SegmentRow
from resources.packaged import package_file

WINDOW = 512  # samples per model window at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window the model sees before each window


@dataclass(frozen=True)
class VadParams:
    """Speech detection and segmentation parameters (silero-vad's names and meanings).

    Attributes:
        threshold: a window with speech probability at or above this is speech.
        neg_threshold: speech ends once probability drops below this (default: threshold - 0.15).
        min_speech_ms: speech runs shorter than this are dropped.
        min_silence_ms: silence must last this long to end a segment; shorter pauses stay inside it.
        speech_pad_ms: padding added on both sides of each segment.
        max_segment_s: segments are split to at most this length, padding included (the teacher's window).
        min_silence_at_max_speech_ms: silences at least this long are candidate split points for long speech.
        merge_gap_s: neighbouring segments separated by at most this much silence are merged while the result stays
            within ``max_segment_s``: the teacher transcribes better with context (0 disables merging).
    """

    threshold: float = 0.5
    neg_threshold: float | None = None
    min_speech_ms: int = 250
    min_silence_ms: int = 500
    speech_pad_ms: int = 100
    max_segment_s: float = 30.0
    min_silence_at_max_speech_ms: int = 98
    merge_gap_s: float = 0.0

    def to_json(self) -> str:
        """Canonical JSON, recorded with every segment table."""
        return json.dumps(asdict(self), sort_keys=True)


def silero_model_path() -> Path:
    """The sequence ONNX export inside the installed silero-vad wheel, found without importing the package (which
    imports torch).

    Raises:
        FileNotFoundError: silero-vad is not installed; the message says how to install it.
    """
    return package_file(
        "silero_vad",
        "data/silero_vad_16k_sequence.onnx",
        "silero-vad",
        "run `make install` (it installs the wheel with --no-deps, without torch)",
    )


@functools.cache
def model_sha256(path: Path) -> str:
    """SHA-256 of the model file, recorded as lineage."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class SileroVad:
    """Silero's "sequence" ONNX export in one onnxruntime session with one intra-op thread (parallelism comes from
    worker processes).

    The streaming model takes one 32 ms window per call and carries its LSTM state between calls in Python; the
    sequence export takes a block of windows per call and carries the state inside, so a minute of audio is one call
    instead of ~1900. Its per-window probabilities are bit-identical to the streaming model's (bench/vad.py checks
    against silero-vad's own ``get_speech_timestamps``).
    """

    def __init__(self, model_path: Path, block_windows: int = 2048) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._block = block_windows

    @property
    def block_samples(self) -> int:
        """Samples per model call: read a file in chunks of this size (the last may be shorter)."""
        return self._block * WINDOW

    def speech_probs(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability of each 512-sample window of 16 kHz mono float32 audio (the last window zero-padded)."""
        step = self.block_samples
        return self.stream_probs(audio[i : i + step] for i in range(0, audio.shape[0], step))

    def stream_probs(self, chunks: Iterable[np.ndarray]) -> np.ndarray:
        """``speech_probs`` of the audio that ``chunks`` make up, holding one chunk at a time: every chunk but the
        last must be ``block_samples`` long. The LSTM state and the 64 samples of context carry from chunk to chunk,
        so the result is the one the whole audio gives in one array."""
        probs: list[np.ndarray] = []
        h = np.zeros((1, 1, 128), dtype=np.float32)
        c = np.zeros((1, 1, 128), dtype=np.float32)
        context = np.zeros(CONTEXT, dtype=np.float32)  # zeros before the start
        short = False
        for chunk in chunks:
            if short:
                raise ValueError(f"only the last chunk may be shorter than {self.block_samples} samples")
            short = chunk.shape[0] < self.block_samples
            if not chunk.shape[0]:
                continue
            block = _window_block(context, chunk)
            out, h, c = self._session.run(None, {"input": block, "h": h, "c": c})
            probs.append(out)
            context = block[-1, -CONTEXT:].copy()
        return np.concatenate(probs) if probs else np.empty(0, dtype=np.float32)


def _window_block(context: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """Model input for the windows of ``chunk``: each row is the 64 samples before the window (``context`` for the
    first) and its 512 samples (the last window zero-padded). Only this chunk is copied."""
    count = -(-chunk.shape[0] // WINDOW)
    buf = np.zeros(CONTEXT + count * WINDOW, dtype=np.float32)
    buf[:CONTEXT] = context
    buf[CONTEXT : CONTEXT + chunk.shape[0]] = chunk
    return np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(buf, CONTEXT + WINDOW)[::WINDOW])


def speech_timestamps(probs: np.ndarray, num_samples: int, params: VadParams) -> list[tuple[int, int]]:
    """Turns window probabilities into padded speech spans ``(start, end)`` in samples.

    Same rules as silero-vad's ``get_speech_timestamps``: hysteresis between ``threshold`` and ``neg_threshold``,
    silences shorter than ``min_silence_ms`` bridged, runs shorter than ``min_speech_ms`` dropped, speech longer than
    ``max_segment_s`` split at its longest inner silence (or cut hard when it has none), then padding that never
    overlaps the neighbour (a gap under twice the pad is shared half and half).
    """
    sr = SAMPLE_RATE
    min_speech = sr * params.min_speech_ms / 1000
    pad = sr * params.speech_pad_ms / 1000
    max_speech = sr * params.max_segment_s - WINDOW - 2 * pad
    min_silence = sr * params.min_silence_ms / 1000
    split_silence = sr * params.min_silence_at_max_speech_ms / 1000
    neg = params.neg_threshold if params.neg_threshold is not None else max(params.threshold - 0.15, 0.01)

    spans: list[list[int]] = []
    in_speech = False
    start = 0
    silence_from = 0  # where the current silence inside speech began (0: none)
    silences: list[tuple[int, int]] = []  # (where, how long) silences inside the current speech

    for i, prob in enumerate(probs):
        here = WINDOW * i
        speech = prob >= params.threshold
        if speech and silence_from:
            if here - silence_from > split_silence:
                silences.append((silence_from, here - silence_from))
            silence_from = 0
        if speech and not in_speech:
            in_speech, start = True, here
            continue
        if in_speech and here - start > max_speech:
            if silences:
                cut, length = max(silences, key=lambda s: s[1])
                spans.append([start, cut])
                # Speech resumes after that silence unless we are still inside it.
                in_speech = cut + length < cut + here
                start = cut + length
            else:
                spans.append([start, here])
                in_speech = False
            silence_from = 0
            silences = []
            if not in_speech:
                continue
        if prob < neg and in_speech:
            if not silence_from:
                silence_from = here
            if here - silence_from < min_silence:
                continue
            if silence_from - start > min_speech:
                spans.append([start, silence_from])
            in_speech = False
            silence_from = 0
            silences = []
            continue

    if in_speech and num_samples - start > min_speech:
        spans.append([start, num_samples])

    for k, span in enumerate(spans):
        if k == 0:
            span[0] = int(max(0, span[0] - pad))
        if k + 1 < len(spans):
            gap = spans[k + 1][0] - span[1]
            if gap < 2 * pad:
                span[1] += int(gap // 2)
                spans[k + 1][0] = int(max(0, spans[k + 1][0] - gap // 2))
            else:
                span[1] = int(min(num_samples, span[1] + pad))
                spans[k + 1][0] = int(max(0, spans[k + 1][0] - pad))
        else:
            span[1] = int(min(num_samples, span[1] + pad))
    return [(int(s), int(e)) for s, e in spans]


def merge_spans(spans: list[tuple[int, int]], params: VadParams) -> list[tuple[int, int]]:
    """Merges neighbouring spans separated by at most ``merge_gap_s`` into as few segments of at most
    ``max_segment_s`` as possible, cutting at the longest pauses.

    A run of spans whose pauses are all short enough is split into the fewest pieces that fit; among the splits with
    that many pieces, the one whose shortest cut pause is longest wins (a cut between sentences rather than inside
    one). Each run is solved exactly by dynamic programming over its spans, so merging never depends on where a
    greedy pass happened to start.
    """
    if params.merge_gap_s <= 0 or not spans:
        return list(spans)
    max_gap = params.merge_gap_s * SAMPLE_RATE
    runs: list[list[tuple[int, int]]] = [[spans[0]]]
    for span in spans[1:]:
        if span[0] - runs[-1][-1][1] <= max_gap:
            runs[-1].append(span)
        else:
            runs.append([span])
    return [piece for run in runs for piece in _split_run(run, params.max_segment_s * SAMPLE_RATE)]


def _split_run(run: list[tuple[int, int]], max_len: float) -> list[tuple[int, int]]:
    """The fewest pieces of at most ``max_len`` samples (spans that are longer alone stay alone), the shortest cut
    pause as long as possible. ``best[i]`` is the best split of ``run[:i]``: (pieces, -shortest cut pause, cuts)."""
    inf = float("inf")
    best: list[tuple[float, float, tuple[int, ...]]] = [(0, -inf, ())]
    for i in range(1, len(run) + 1):
        options = []
        for j in range(i - 1, -1, -1):  # the last piece is run[j:i]
            if j < i - 1 and run[i - 1][1] - run[j][0] > max_len:
                break
            pieces, neg_gap, cuts = best[j]
            gap = run[j][0] - run[j - 1][1] if j else inf
            options.append((pieces + 1, max(neg_gap, -gap), (*cuts, j)))
        best.append(min(options))
    starts = [*best[-1][2], len(run)]
    return [(run[a][0], run[b - 1][1]) for a, b in zip(starts, starts[1:], strict=False) if b > a]


def segment_rows(
    media_id: str, probs: np.ndarray, spans: list[tuple[int, int]], model_sha: str, params: VadParams
) -> list[SegmentRow]:
    """Segment records with the probability statistics of the windows each span covers, and their lineage."""
    params_json = params.to_json()
    rows = []
    for index, (start, end) in enumerate(spans):
        window_probs = probs[start // WINDOW : max(start // WINDOW + 1, -(-end // WINDOW))]
        rows.append(
            SegmentRow(
                segment_id=f"{media_id}-{index:05d}",
                media_id=media_id,
                index=index,
                start_s=start / SAMPLE_RATE,
                end_s=end / SAMPLE_RATE,
                prob_mean=float(window_probs.mean()),
                prob_min=float(window_probs.min()),
                prob_max=float(window_probs.max()),
                vad_model_sha256=model_sha,
                vad_params=params_json,
                speech_s=float(np.count_nonzero(window_probs >= params.threshold)) * WINDOW / SAMPLE_RATE,
            )
        )
    return rows


@dataclass(frozen=True)
class VadItem:
    """One decoded media object: its id and 16 kHz FLAC."""

    media_id: str
    audio_path: Path


@dataclass(frozen=True)
class VadJob:
    """A group of decoded media objects segmented together in one worker (their windows batched per model call)."""

    items: tuple[VadItem, ...]
    params: VadParams
    model_path: Path


@dataclass(frozen=True)
class VadResult:
    """Segments of one media object (empty when it has no speech) and its duration in seconds, or why it failed."""

    media_id: str
    duration_s: float
    segments: list[SegmentRow]
    error_class: str | None = None
    error: str | None = None


@functools.cache
def _session(model_path: Path) -> SileroVad:
    return SileroVad(model_path)  # one per worker process, reused for every job


class _Unreadable(Exception):
    """The decoded FLAC cannot be read (or is not 16 kHz mono). ``kind``: ``UnreadableAudio`` for an I/O error (the
    disk, the network mount or the cache may be failing: transient) or ``CorruptAudio`` for a file that reads but does
    not decode as what ``audio_wav`` writes (waiting cannot fix it: dead-lettered, naming the file)."""

    def __init__(self, message: str, kind: str = "CorruptAudio") -> None:
        super().__init__(message)
        self.kind = kind


class _FileChunks:
    """A FLAC's float32 samples in chunks of ``size`` (the last shorter), read as they are consumed; ``samples``
    counts what was read. Read errors come out as _Unreadable."""

    def __init__(self, path: Path, size: int) -> None:
        self._path, self._size = path, size
        self.samples = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        import soundfile as sf

        try:
            with sf.SoundFile(self._path) as f:
                if f.samplerate != SAMPLE_RATE or f.channels != 1:
                    raise _Unreadable(f"expected 16 kHz mono audio, got {f.samplerate} Hz x {f.channels} channels")
                while True:
                    chunk = f.read(self._size, dtype="float32")
                    self.samples += chunk.shape[0]
                    if chunk.shape[0]:
                        yield chunk
                    if chunk.shape[0] < self._size:
                        return
        except OSError as exc:
            raise _Unreadable(str(exc), "UnreadableAudio") from None
        except (sf.LibsndfileError, ValueError) as exc:
            # libsndfile reports a missing or unreadable file as "System error": an I/O failure, not bad content.
            io_error = not self._path.is_file() or "System error" in str(exc)
            raise _Unreadable(f"{self._path.name}: {exc}", "UnreadableAudio" if io_error else "CorruptAudio") from None


def detect_speech(job: VadJob) -> list[VadResult]:
    """Worker entry point: streams each item's FLAC through the model a block at a time (a 10-hour file needs no more
    memory than a short one, bar its window probabilities: 4 bytes per 32 ms) and cuts segments. Small files come in
    groups so the per-job overhead is shared.

    An unreadable item fails alone (its result carries the error); the others go on.
    """
    session = _session(job.model_path)
    sha = model_sha256(job.model_path)
    results = []
    for item in job.items:
        chunks = _FileChunks(item.audio_path, session.block_samples)
        try:
            probs = session.stream_probs(chunks)
        except _Unreadable as exc:
            message = f"vad_segments: media {item.media_id}: {exc}"
            results.append(VadResult(item.media_id, 0.0, [], exc.kind, message))
            continue
        spans = merge_spans(speech_timestamps(probs, chunks.samples, job.params), job.params)
        rows = segment_rows(item.media_id, probs, spans, sha, job.params)
        results.append(VadResult(item.media_id, chunks.samples / SAMPLE_RATE, rows))
    return results
