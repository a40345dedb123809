"""Teacher engines and the resource that loads the configured one once per step."""

from __future__ import annotations

import dagster as dg
from pydantic import Field, PrivateAttr

# Importing an engine module registers it; add new engines here.
from resources.teachers import whisper  # noqa: F401
from resources.teachers.base import TEACHERS, TeacherEngine, TeacherSettings, create_engine


class TeacherResource(dg.ConfigurableResource):
    """The teacher model: the engine name is checked when the step starts; the model is loaded on first use (a step
    with nothing to label never loads it), once per step, and released when the step ends."""

    engine: str = Field(default="faster-whisper", description="Registered engine name. Env: ASR_TEACHER.")
    model: str = Field(default="", description="Local model path; empty for the engine's shipped default.")
    language: str = Field(default="en", description="Language to transcribe in (ISO 639-1).")
    beam_size: int = Field(default=5, description="Beam size; 1 is greedy.")
    threads: int = Field(default=0, description="CPU threads for the engine; 0 uses every usable core.")

    _engine: TeacherEngine | None = PrivateAttr(default=None)

    def settings(self) -> TeacherSettings:
        return TeacherSettings(model=self.model, language=self.language, beam_size=self.beam_size, threads=self.threads)

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

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
