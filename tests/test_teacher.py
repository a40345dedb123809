"""The teacher interface and the embedded faster-whisper engine on real espeak-ng speech."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from asr_assets.distill import normalize_text
from asr_assets.media import DecodeJob, decode_media
from asr_assets.sample_corpus import Corpus
from resources.teachers import TeacherResource
from resources.teachers.base import (
    TEACHERS,
    TeacherBroken,
    TeacherEngine,
    TeacherError,
    TeacherInput,
    TeacherOutput,
    TeacherSettings,
    create_engine,
)


@pytest.fixture(scope="module")
def engine():
    teacher = create_engine("faster-whisper", TeacherSettings(threads=1))
    yield teacher
    teacher.close()


def test_registry_names_the_known_engines() -> None:
    assert "faster-whisper" in TEACHERS
    with pytest.raises(ValueError, match="unknown teacher engine 'nope'; registered: faster-whisper"):
        create_engine("nope", TeacherSettings())


def test_missing_model_fails_fast_without_a_download(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="has no model.bin"):
        create_engine("faster-whisper", TeacherSettings(model=str(tmp_path / "typo")))


def test_english_only_model_refuses_other_languages() -> None:
    with pytest.raises(ValueError, match="English-only"):
        create_engine("faster-whisper", TeacherSettings(language="de"))


def test_transcribes_speech_and_keeps_batch_order(engine, corpus: Corpus, tmp_path) -> None:
    item = next(i for i in corpus.items if i.path.endswith(".flac") and not i.broken)
    dst = tmp_path / "a.flac"
    decode_media(DecodeJob("m", item.path, corpus.media_dir / item.path, dst, 1 << 30, 3600.0))
    audio = sf.read(dst, dtype="float32")[0]
    clips = [audio[int(s * 16000) - 1600 : int(e * 16000) + 1600] for s, e in item.speech]
    batch = [TeacherInput(f"seg-{i}", clip, "en") for i, clip in enumerate(clips)]
    batch.append(TeacherInput("silence", np.zeros(16000 * 2, np.float32), "en"))
    results = engine.transcribe(batch)
    assert len(results) == len(batch)
    for sentence, result in zip(item.sentences, results, strict=False):
        words = set(normalize_text(sentence).split())
        got = set(normalize_text(result.text).split())
        assert len(words & got) >= len(words) // 2, (sentence, result.text)
        assert result.num_tokens > 0 and result.avg_logprob is not None and result.avg_logprob < 0
        assert result.no_speech_prob is not None and result.finish_reason == "stop"
    assert len(engine.settings_hash) == 16 and engine.model_id.startswith("model@")


def test_same_input_same_output(engine, corpus: Corpus, tmp_path) -> None:
    item = next(i for i in corpus.items if i.path.endswith(".ogg") and not i.broken)
    dst = tmp_path / "a.flac"
    decode_media(DecodeJob("m", item.path, corpus.media_dir / item.path, dst, 1 << 30, 3600.0))
    start, end = item.speech[0]
    clip = sf.read(dst, dtype="float32")[0][int(start * 16000) : int(end * 16000)]
    first = engine.transcribe([TeacherInput("a", clip, "en")])
    second = engine.transcribe([TeacherInput("a", clip, "en")])
    assert first[0].text.strip() and first[0].num_tokens > 0  # real output, not two empty results
    assert first == second


def test_resource_rejects_unknown_engine_at_setup() -> None:
    import dagster as dg

    with (
        pytest.raises(dg.DagsterResourceFunctionError) as caught,
        dg.build_resources({"teacher": TeacherResource(engine="gpt-teacher")}),
    ):
        pass
    assert "ASR_TEACHER='gpt-teacher' is not a registered engine; known: faster-whisper" in str(caught.value.__cause__)


class _BatchFailsOnBad(TeacherEngine):
    """An engine that raises for any batch holding a segment named bad-*, as an engine crashing on one input would."""

    name = "batch-fails-on-bad"
    prompt_version = "test"
    model_id = "none"

    calls = 0

    def transcribe(self, batch):
        self.calls += 1
        if any(item.segment_id.startswith("bad") for item in batch):
            raise RuntimeError("engine crashed")
        return [TeacherOutput(item.segment_id, "en", 1, -0.1, None, None, "stop") for item in batch]


def test_a_failing_batch_is_bisected_down_to_the_bad_segment() -> None:
    from asr_assets.stages import _transcribe

    engine = _BatchFailsOnBad(TeacherSettings())
    names = [f"seg-{i:02d}" for i in range(64)]
    names[37] = "bad-1"
    batch = [TeacherInput(name, np.zeros(160, np.float32), "en") for name in names]
    results = _transcribe(engine, batch)
    assert [r.text for r in results if isinstance(r, TeacherOutput)] == [n for n in names if n != "bad-1"]
    assert (
        isinstance(results[37], TeacherError) and "bad-1" in str(results[37]) and "engine crashed" in str(results[37])
    )
    # Halving: one failed call per level (log2 64 = 6) plus its good sibling, not one call per segment.
    assert engine.calls == 1 + 2 * 6


class _DeadModel:
    """The CTranslate2 model inside faster-whisper, its generate call failing as on a lost device."""

    def __init__(self, model) -> None:
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def generate(self, *args, **kwargs):
        raise RuntimeError("CUDA error: device lost")


def test_an_engine_that_fails_on_every_segment_fails_the_step_instead_of_dead_lettering_them(monkeypatch) -> None:
    from asr_assets.stages import _transcribe_checked

    engine = create_engine("faster-whisper", TeacherSettings(threads=1))  # its own: the model gets broken below
    monkeypatch.setattr(engine._model, "model", _DeadModel(engine._model.model))
    batch = [TeacherInput(f"seg-{i}", np.zeros(16000, np.float32), "en") for i in range(8)]
    with pytest.raises(TeacherBroken, match="every one of 8 segments.*device lost"):
        _transcribe_checked(engine, batch)
    # One bad segment among good ones is still that segment's outcome alone.
    mixed = _BatchFailsOnBad(TeacherSettings())
    results = _transcribe_checked(mixed, [*batch[:3], TeacherInput("bad-x", np.zeros(160, np.float32), "en")])
    assert [type(r).__name__ for r in results] == ["TeacherOutput"] * 3 + ["EngineCallFailed"]


def test_the_vllm_teacher_without_vllm_installed_says_where_to_get_it(tmp_path) -> None:
    # The default install has no vLLM (it pulls torch): selecting it must explain, not fail on a bare import.
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ImportError, match=r"needs vLLM.*Dockerfile\.gpu.*make test-vllm"):
        create_engine("vllm", TeacherSettings(model=str(tmp_path)))
