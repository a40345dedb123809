"""The teacher interface and its registry.

A teacher engine turns 16 kHz mono segments into text with confidence signals. Adding a teacher model is one
subclass of :class:`TeacherEngine` in one module, decorated with :func:`register`; the ``TeacherResource`` selects it
by name. Engines are loaded once per step and fed batches of segments; one failed segment comes back as an exception in
its slot and never fails the batch.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

SAMPLE_RATE = 16_000
"""Every engine takes 16 kHz mono float32 audio."""


@dataclass(frozen=True)
class TeacherSettings:
    """Engine-independent teacher settings, plus engine-specific ones in ``options``.

    Attributes:
        model: local path of the model (weights are never downloaded at run time); "" for the engine's default.
        language: ISO 639-1 code the teacher is asked to transcribe in, or ``auto``: each segment comes with its
            detected language (``TeacherInput.language``; "" where detection was unsure).
        beam_size: beams for decoding (1 = greedy).
        threads: CPU threads for the engine (0 = all usable cores).
        options: engine-specific settings, recorded in the settings hash.
    """

    model: str = ""
    language: str = "en"
    beam_size: int = 5
    threads: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TeacherInput:
    """One segment for the teacher: id, 16 kHz mono float32 samples, the language to transcribe in, and the shared
    window it goes into for an engine that packs several segments per window (``window_s``): the segments of a batch
    with the same non-empty ``window`` are transcribed together; "" alone."""

    segment_id: str
    audio: np.ndarray
    language: str
    window: str = ""


@dataclass(frozen=True)
class TeacherOutput:
    """The teacher's label for one segment.

    Attributes:
        text: transcript, stripped.
        language: language of the transcript.
        num_tokens: generated tokens.
        avg_logprob: mean log probability per token (None when no tokens were generated).
        no_speech_prob: engine's no-speech probability, when it has one.
        compression_ratio: zlib ratio of the text (high means repetition), None for empty text.
        finish_reason: ``stop`` or ``length``.
        model_id: the model that wrote it, for an engine that picks a model per language (None: ``model_id``).
    """

    text: str
    language: str
    num_tokens: int
    avg_logprob: float | None
    no_speech_prob: float | None
    compression_ratio: float | None
    finish_reason: str
    model_id: str | None = None


class TeacherError(Exception):
    """A segment the engine could not transcribe."""

    kind = "TeacherError"


class EngineCallFailed(TeacherError):
    """The engine raised (or answered wrongly) even when given this segment alone."""

    kind = "EngineCallFailed"


class TeacherBroken(RuntimeError):
    """Every segment of a batch failed on its own: the engine is broken, not the segments. Fails the step (nothing is
    dead-lettered), so a re-run retries them once the engine is fixed."""


def compression_ratio(text: str) -> float | None:
    """Length of the UTF-8 text over its zlib-compressed length (Whisper's repetition signal)."""
    if not text:
        return None
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw))


class TeacherEngine(ABC):
    """A loaded teacher model. Subclasses set ``name`` and ``prompt_version`` and implement load and transcribe."""

    name: ClassVar[str]
    prompt_version: ClassVar[str]
    # Feeding defaults (the transcripts asset's config overrides them): segments per `transcribe` call, and segments
    # per wave (read together, one checkpoint part). A CPU engine wants small calls; vLLM wants the whole wave at once.
    batch_size: ClassVar[int] = 16
    wave_size: ClassVar[int] = 256
    # The vad_segments default for merging neighbouring segments across pauses (VadConfig.merge_gap_s): an engine
    # that transcribes one segment per call wants training-length segments; one that packs windows itself does not.
    merge_gap_s: ClassVar[float] = 0.0

    def __init__(self, settings: TeacherSettings) -> None:
        self.settings = settings

    @property
    def window_s(self) -> float:
        """Seconds of audio the engine transcribes together in one shared window (the stage cuts the windows with
        ``pack_windows`` and sets ``TeacherInput.window``); 0: one segment per call, no packing."""
        return 0.0

    @property
    @abstractmethod
    def model_id(self) -> str:
        """Identifies the weights (name and, where known, a revision or file hash)."""

    def hashed_settings(self) -> dict[str, Any]:
        """The settings that can change the output. Threads change speed only, and the model path is covered by
        ``model_id`` (which identifies the weights wherever they are mounted)."""
        settings = asdict(self.settings)  # a deep copy already
        settings.pop("threads")
        settings.pop("model")
        return settings

    @property
    def settings_hash(self) -> str:
        """Hash of everything that can change the output: engine, weights, settings, prompt version."""
        blob = json.dumps(
            {"engine": self.name, "model": self.model_id, "prompt": self.prompt_version, **self.hashed_settings()},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @abstractmethod
    def transcribe(self, batch: Sequence[TeacherInput]) -> list[TeacherOutput | TeacherError]:
        """Transcribes a batch; the result list matches ``batch`` position by position."""

    def metrics(self) -> dict[str, float]:
        """Engine throughput and state for logs and Prometheus (``segments_per_s``, ``output_tokens``, ...); engines
        without such numbers return nothing."""
        return {}

    def close(self) -> None:  # noqa: B027 - engines without handles need nothing
        """Releases the model."""


PACK_GAP_S = 1.0
"""Silence between two segments packed into one window: Whisper ends a text segment there, and a word's timestamps
fall clearly on one side of it."""


def pack_windows(durations: Sequence[float], window_s: float, gap_s: float = PACK_GAP_S) -> list[list[int]]:
    """Groups segment positions into windows whose audio plus the gaps between segments fits ``window_s`` seconds,
    in the given order; a segment too long to share a window gets one alone."""
    windows: list[list[int]] = []
    used = window_s  # forces a new window for the first segment
    for k, seconds in enumerate(durations):
        if windows and used + gap_s + seconds <= window_s:
            windows[-1].append(k)
            used += gap_s + seconds
        else:
            windows.append([k])
            used = seconds
    return windows


TEACHERS: dict[str, type[TeacherEngine]] = {}


def register(cls: type[TeacherEngine]) -> type[TeacherEngine]:
    """Class decorator: makes an engine selectable by its ``name``."""
    if cls.name in TEACHERS:
        raise ValueError(f"teacher engine {cls.name!r} is registered twice")
    TEACHERS[cls.name] = cls
    return cls


def create_engine(name: str, settings: TeacherSettings) -> TeacherEngine:
    """Loads the engine registered as ``name``; an unknown name fails with the list of known ones."""
    factory: Callable[[TeacherSettings], TeacherEngine] | None = TEACHERS.get(name)
    if factory is None:
        raise ValueError(f"unknown teacher engine {name!r}; registered: {', '.join(sorted(TEACHERS))}")
    return factory(settings)
