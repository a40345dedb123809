"""Teacher engines and the resource that loads the configured one once per step."""

from __future__ import annotations

import re
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

# Importing an engine module registers it; add new engines here.
from resources.teachers import vllm_engine, whisper  # noqa: F401
from resources.teachers.base import TEACHERS, TeacherEngine, TeacherSettings, create_engine
from resources.teachers.vllm_engine import VllmEngineSettings, VllmOptions, VllmSamplingSettings, VllmTeacher

DEFAULT_SECOND_OPINION = "faster-whisper:whisper-base"
"""Whisper base (multilingual) on faster-whisper: independent of both the CPU teacher (tiny.en) and Qwen3-Omni."""


class TeacherResource(dg.ConfigurableResource):
    """The teacher model: the engine name is checked when the step starts; the model is loaded on first use (a step
    with nothing to label never loads it), once per step, and released when the step ends."""

    engine: str = Field(
        default="faster-whisper", description="Registered engine name: faster-whisper or vllm. Env: ASR_TEACHER."
    )
    model: str = Field(
        default="", description="Local model directory; empty for the engine's default. Env: ASR_TEACHER_MODEL."
    )
    language: str = Field(
        default="auto",
        description="'auto': every segment's language is detected (spoken language ID, before the teacher) and "
        "the teacher transcribes it in that language; or one ISO 639-1 code for every segment (no detection). "
        "Env: ASR_LANGUAGE.",
    )
    languages: str = Field(
        default="",
        description="With auto: the languages the collection holds, comma-separated (e.g. 'zh,en'); detection "
        "chooses among them. Empty: any language Whisper knows. Env: ASR_LANGUAGES.",
    )
    min_language_prob: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="With auto: a segment whose detected language is less probable than this is transcribed "
        "without a language (Whisper detects it over its window; Qwen3-Omni gets a language-neutral instruction).",
    )
    beam_size: int = Field(default=5, description="Beam size (faster-whisper); 1 is greedy.")
    threads: int = Field(default=0, description="CPU threads for the engine; 0 uses every usable core.")
    pack_window_s: float = Field(
        default=30.0,
        ge=0.0,
        le=30.0,
        description="faster-whisper: short segments share Whisper windows of up to this many seconds, each "
        "segment's words assigned back by their timestamps (Whisper encodes 30 s whatever the length); 0: one "
        "segment per window.",
    )
    vllm_engine: VllmEngineSettings = Field(
        default_factory=VllmEngineSettings, description="vLLM engine arguments (engine=vllm)."
    )
    vllm_sampling: VllmSamplingSettings = Field(
        default_factory=VllmSamplingSettings, description="vLLM sampling settings (engine=vllm)."
    )
    second_opinion: str = Field(
        default=DEFAULT_SECOND_OPINION,
        description="An independent ENGINE:MODEL that labels a sample of the same segments, for the per-segment "
        "disagreement signal; '' or 'off' turns it off. faster-whisper runs on the CPU, in the GPU pod too. "
        "Env: ASR_SECOND_OPINION.",
    )
    second_opinion_fraction: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of segments given a second opinion, picked by a hash of the segment id (re-runs pick the "
        "same ones); 1.0: all. Env: ASR_SECOND_OPINION_FRACTION.",
    )
    second_opinion_beam_size: int = Field(default=1, description="Beam size of the second opinion; 1 is greedy.")

    _engine: TeacherEngine | None = PrivateAttr(default=None)
    _second: TeacherEngine | None = PrivateAttr(default=None)
    _lid: Any = PrivateAttr(default=None)

    @property
    def detects_language(self) -> bool:
        return self.language == "auto"

    def allowed_languages(self) -> tuple[str, ...]:
        return tuple(sorted({code.strip() for code in self.languages.split(",") if code.strip()}))

    def load_lid(self) -> Any:
        """The spoken language ID (``asr_assets.lid.SpokenLanguageId``), loaded on first use."""
        if self._lid is None:
            from asr_assets.lid import SpokenLanguageId

            self._lid = SpokenLanguageId(self.allowed_languages(), self.threads)
        return self._lid

    def settings(self) -> TeacherSettings:
        uses_vllm = issubclass(TEACHERS.get(self.engine, TeacherEngine), VllmTeacher)
        options = (
            VllmOptions(self.vllm_engine, self.vllm_sampling).as_options()
            if uses_vllm
            else {"pack_window_s": self.pack_window_s}
        )
        return TeacherSettings(
            model=self.model, language=self.language, beam_size=self.beam_size, threads=self.threads, options=options
        )

    def engine_class(self) -> type[TeacherEngine]:
        return TEACHERS[self.engine]

    def second_opinion_spec(self) -> tuple[str, str] | None:
        """The second opinion's (engine, model), or None when it is off or samples nothing."""
        spec = self.second_opinion.strip()
        if spec.lower() in ("", "off") or self.second_opinion_fraction <= 0:
            return None
        engine, _, model = spec.partition(":")
        return engine, model

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.engine not in TEACHERS:
            raise ValueError(
                f"ASR_TEACHER={self.engine!r} is not a registered engine; known: {', '.join(sorted(TEACHERS))}"
            )
        spec = self.second_opinion_spec()
        if spec is not None and spec[0] not in TEACHERS:
            raise ValueError(
                f"ASR_SECOND_OPINION={self.second_opinion!r}: {spec[0]!r} is not a registered engine (expected "
                f"ENGINE:MODEL, '' or 'off'); known: {', '.join(sorted(TEACHERS))}"
            )
        if self.language != "auto" and not re.fullmatch(r"[a-z]{2,3}", self.language):
            raise ValueError(f"ASR_LANGUAGE={self.language!r}: expected 'auto' or an ISO 639-1 code such as en or zh")
        bad = [code for code in self.allowed_languages() if not re.fullmatch(r"[a-z]{2,3}", code)]
        if bad:
            raise ValueError(f"ASR_LANGUAGES={self.languages!r}: {bad} are not ISO 639-1 codes such as en or zh")

    def load(self) -> TeacherEngine:
        """The loaded engine; loaded on first use so steps that do not need the teacher never pay for it."""
        if self._engine is None:
            self._engine = create_engine(self.engine, self.settings())
        return self._engine

    def loaded(self) -> TeacherEngine | None:
        """The engine if it has been loaded in this step, else None (reading metrics must not load it)."""
        return self._engine

    def load_second_opinion(self) -> TeacherEngine:
        """The second opinion's engine, loaded on first use (a step whose sample is empty never loads it)."""
        if self._second is None:
            spec = self.second_opinion_spec()
            if spec is None:
                raise ValueError("the second opinion is off: nothing to load")
            engine, model = spec
            settings = TeacherSettings(
                model=model,
                language=self.language,
                beam_size=self.second_opinion_beam_size,
                threads=self.threads,
                options={} if issubclass(TEACHERS[engine], VllmTeacher) else {"pack_window_s": self.pack_window_s},
            )
            self._second = create_engine(engine, settings)
        return self._second

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        for engine in (self._engine, self._second, self._lid):
            if engine is not None:
                engine.close()
        self._engine = self._second = self._lid = None
