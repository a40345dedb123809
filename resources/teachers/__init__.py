"""Teacher engines and the resource that loads the configured one once per step."""

from __future__ import annotations

import dagster as dg
from pydantic import Field, PrivateAttr

# Importing an engine module registers it; add new engines here.
from resources.teachers import vllm_engine, whisper  # noqa: F401
from resources.teachers.base import TEACHERS, TeacherEngine, TeacherSettings, create_engine
from resources.teachers.vllm_engine import VllmEngineSettings, VllmOptions, VllmSamplingSettings, VllmTeacher


class TeacherResource(dg.ConfigurableResource):
    """The teacher model: the engine name is checked when the step starts; the model is loaded on first use (a step
    with nothing to label never loads it), once per step, and released when the step ends."""

    engine: str = Field(
        default="faster-whisper", description="Registered engine name: faster-whisper or vllm. Env: ASR_TEACHER."
    )
    model: str = Field(
        default="", description="Local model directory; empty for the engine's default. Env: ASR_TEACHER_MODEL."
    )
    language: str = Field(default="en", description="Language to transcribe in (ISO 639-1).")
    beam_size: int = Field(default=5, description="Beam size (faster-whisper); 1 is greedy.")
    threads: int = Field(default=0, description="CPU threads for the engine; 0 uses every usable core.")
    vllm_engine: VllmEngineSettings = Field(
        default_factory=VllmEngineSettings, description="vLLM engine arguments (engine=vllm)."
    )
    vllm_sampling: VllmSamplingSettings = Field(
        default_factory=VllmSamplingSettings, description="vLLM sampling settings (engine=vllm)."
    )

    _engine: TeacherEngine | None = PrivateAttr(default=None)

    def settings(self) -> TeacherSettings:
        uses_vllm = issubclass(TEACHERS.get(self.engine, TeacherEngine), VllmTeacher)
        options = VllmOptions(self.vllm_engine, self.vllm_sampling).as_options() if uses_vllm else {}
        return TeacherSettings(
            model=self.model, language=self.language, beam_size=self.beam_size, threads=self.threads, options=options
        )

    def engine_class(self) -> type[TeacherEngine]:
        return TEACHERS[self.engine]

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.engine not in TEACHERS:
            raise ValueError(
                f"ASR_TEACHER={self.engine!r} is not a registered engine; known: {', '.join(sorted(TEACHERS))}"
            )

    def load(self) -> TeacherEngine:
        """The loaded engine; loaded on first use so steps that do not need the teacher never pay for it."""
        if self._engine is None:
            self._engine = create_engine(self.engine, self.settings())
        return self._engine

    def loaded(self) -> TeacherEngine | None:
        """The engine if it has been loaded in this step, else None (reading metrics must not load it)."""
        return self._engine

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
