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
        create_engine("faster-whisper", TeacherSettings(model="tiny.en", language="de"))
    # The default model with another fixed language is multilingual Whisper base; a code it does not know is refused.
    german = create_engine("faster-whisper", TeacherSettings(language="de", threads=1))
    assert german.model_id.startswith("whisper-base-")
    german.close()
    with pytest.raises(ValueError, match="'xx' is not one it knows"):
        create_engine("faster-whisper", TeacherSettings(language="xx", threads=1))


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
    model, _ = engine._model_for("en")
    monkeypatch.setattr(model, "model", _DeadModel(model.model))
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


def _clips(corpus: Corpus, tmp_path) -> list[tuple[str, np.ndarray]]:
    """Every sentence of the corpus's good files as (text, 16 kHz samples), cut by its known speech span."""
    clips = []
    for n, item in enumerate(i for i in corpus.items if not i.broken and i.sentences):
        dst = tmp_path / f"{n}.flac"
        decode_media(DecodeJob("m", item.path, corpus.media_dir / item.path, dst, 1 << 30, 3600.0))
        audio = sf.read(dst, dtype="float32")[0]
        for sentence, (start, end) in zip(item.sentences, item.speech, strict=True):
            clips.append((sentence, audio[max(0, int(start * 16000) - 1600) : int(end * 16000) + 1600]))
    return clips


def test_packed_windows_give_each_segment_its_own_words(engine, corpus: Corpus, tmp_path) -> None:
    """Short segments share 30-s windows; every label must stay with its own audio: each segment's text matches its
    own sentence far better than any other segment's sentence, silence packed among them gets no words, and the
    labels are as good as one call per segment."""
    from jiwer import wer

    from asr_assets.distill import canonical_text
    from resources.teachers.base import pack_windows

    clips = _clips(corpus, tmp_path)
    assert len(clips) >= 8
    audio = [a for _, a in clips]
    audio.insert(3, np.zeros(16000 * 2, np.float32))
    windows = pack_windows([a.shape[0] / 16000 for a in audio], engine.window_s)
    assert engine.window_s == 30.0 and len(windows) < len(audio) / 2  # packing really happens
    window_of = {k: f"w{n}" for n, w in enumerate(windows) for k in w}
    batch = [TeacherInput(f"seg-{k}", a, "en", window_of[k]) for k, a in enumerate(audio)]
    results = engine.transcribe(batch)
    assert results[3].text == "" and results[3].num_tokens == 0
    labels = [r for k, r in enumerate(results) if k != 3]
    truth = [canonical_text(t) for t, _ in clips]
    for k, label in enumerate(labels):
        own = wer(truth[k], canonical_text(label.text) or "-")
        others = min(wer(t, canonical_text(label.text) or "-") for j, t in enumerate(truth) if j != k and t != truth[k])
        assert own <= 0.35 and own < others - 0.3, (truth[k], label.text)
        assert label.num_tokens > 0 and label.avg_logprob is not None and label.avg_logprob < 0
    solo = create_engine("faster-whisper", TeacherSettings(threads=1, options={"pack_window_s": 0}))
    try:
        alone = solo.transcribe([b for k, b in enumerate(batch) if k != 3])
    finally:
        solo.close()
    packed_wer = wer(truth, [canonical_text(r.text) or "-" for r in labels])
    alone_wer = wer(truth, [canonical_text(r.text) or "-" for r in alone])
    assert packed_wer <= alone_wer + 0.02, (packed_wer, alone_wer)


@pytest.mark.parametrize(
    ("durations", "window", "expected"),
    [
        ([3.0, 3.0, 3.0], 30.0, [[0, 1, 2]]),
        ([14.0, 14.0, 14.0], 30.0, [[0, 1], [2]]),  # 14 + 1 s gap + 14 = 29
        ([29.0, 2.0], 30.0, [[0], [1]]),
        ([40.0, 2.0, 2.0], 30.0, [[0], [1, 2]]),  # too long to share: alone
        ([], 30.0, []),
    ],
)
def test_pack_windows(durations, window, expected) -> None:
    from resources.teachers.base import pack_windows

    assert pack_windows(durations, window) == expected
