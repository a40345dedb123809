"""The second opinion: disagreement scores, deterministic sampling, the shipped multilingual Whisper base, and the
second-opinion columns written by ``transcribe_shard`` (real models on espeak-ng speech; fakes where the engine only
has to answer)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
import pytest
import soundfile as sf

from asr_assets import deployment, layout
from asr_assets.media import DecodeJob, decode_media
from asr_assets.records import FEATURE_SCHEMA
from asr_assets.sample_corpus import Corpus
from asr_assets.second_opinion import SecondOpinion, disagreement, is_sampled
from asr_assets.stages import TranscribeSettings, read_transcripts, transcribe_shard
from resources.storage import LocalStore, read_table
from resources.teachers import TeacherResource
from resources.teachers.base import (
    TeacherEngine,
    TeacherError,
    TeacherInput,
    TeacherOutput,
    TeacherSettings,
    create_engine,
)
from resources.teachers.whisper import assemble_model


@pytest.mark.parametrize(
    ("teacher", "second", "language", "expected"),
    [
        ("", "", "en", 0.0),
        ("...", "", "en", 0.0),  # nothing left after normalization on either side
        ("", "hello there", "en", 1.0),
        ("hello there", "", "en", 1.0),
        ("Hello, World!", "hello world", "en", 0.0),  # case and punctuation ignored
        ("Fine, THANKS.", "fine thanks", "en", 0.0),
        ("It's fine, press one.", "it is fine press 1", "en", 0.0),  # canonical: contractions, number words
        ("the cat sat on the mat", "the cat sat on a mat", "en", 1 / 6),
        ("hi", "hi there my good friend", "en", 1.0),  # four insertions on one word: capped
        ("今天天气很好", "今天天气不好", "zh", 1 / 6),  # characters, not the one "word"
        ("今天 天气。", "今天天气", "zh", 0.0),  # spaces and punctuation are not characters to score
        ("こんにちは", "こんばんは", "ja", 2 / 5),
        ("안녕하세요", "안녕하세요!", "ko", 0.0),
        ("เธอชอบนก", "เธอชอบนม", "th", 1 / 8),
        ("今天天气很好", "今天天气不好", "zh-CN", 1 / 6),
    ],
)
def test_disagreement(teacher: str, second: str, language: str, expected: float) -> None:
    assert disagreement(teacher, second, language) == pytest.approx(expected)


def test_sampling_is_deterministic_and_nested() -> None:
    ids = [f"media{m:03d}-{i:05d}" for m in range(20) for i in range(100)]
    tenth = {s for s in ids if is_sampled(s, 0.1)}
    assert tenth == {s for s in ids if is_sampled(s, 0.1)}  # a re-run picks the same ones
    assert tenth <= {s for s in ids if is_sampled(s, 0.3)}  # raising the fraction only adds segments
    assert 0.08 < len(tenth) / len(ids) < 0.12
    assert not any(is_sampled(s, 0.0) for s in ids)
    assert all(is_sampled(s, 1.0) for s in ids)


# ---------------------------------------------------------------------------------------------- the shipped model


def test_joined_model_with_the_wrong_hash_is_refused(tmp_path: Path) -> None:
    parts = [tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"]
    parts[0].write_bytes(b"first half ")
    parts[1].write_bytes(b"second half")
    (tmp_path / "config.json").write_text("{}")
    dest = tmp_path / "cache" / "whisper-x"
    with pytest.raises(ValueError, match="gave SHA-256 [0-9a-f]{64}, expected 0{64}"):
        assemble_model(parts, [tmp_path / "config.json"], dest, sha256="0" * 64)
    assert not (dest / "model.bin").exists()  # a damaged model is never left where the engine would load it
    assert [p.name for p in dest.iterdir()] == ["config.json"]  # and no temporary file either

    good = hashlib.sha256(b"first half second half").hexdigest()
    assert assemble_model(parts, [tmp_path / "config.json"], dest, sha256=good) == dest
    assert (dest / "model.bin").read_bytes() == b"first half second half"
    for part in parts:
        part.unlink()
    assert assemble_model(parts, [], dest, sha256=good) == dest  # assembled once, then reused
    with pytest.raises(ValueError, match="config.json has SHA-256"):
        assemble_model(parts, [tmp_path / "config.json"], tmp_path / "other", good, {"config.json": "0" * 64})


def test_whisper_base_is_multilingual() -> None:
    engine = create_engine("faster-whisper", TeacherSettings(model="whisper-base", language="de", threads=1))
    try:
        assert engine.model_id.startswith("whisper-base-")
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------ real speech, both models


@pytest.fixture(scope="module")
def engines():
    teacher = create_engine("faster-whisper", TeacherSettings(threads=1))
    second = create_engine("faster-whisper", TeacherSettings(model="whisper-base", beam_size=1, threads=1))
    yield teacher, second
    teacher.close()
    second.close()


@pytest.fixture(scope="module")
def clips(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> list[TeacherInput]:
    """The espeak-ng utterances (two or three) of one sample file, cut at their known speech spans."""
    item = next(i for i in corpus.items if i.path.endswith(".flac") and not i.broken)
    dst = tmp_path_factory.mktemp("clips") / "a.flac"
    decode_media(DecodeJob("m", item.path, corpus.media_dir / item.path, dst, 1 << 30, 3600.0))
    audio = sf.read(dst, dtype="float32")[0]
    spans = item.speech[:3]
    assert len(spans) >= 2, item  # the planted mismatch pairs two different utterances
    return [
        TeacherInput(f"c{i}", audio[int(s * 16000) - 1600 : int(e * 16000) + 1600], "en")
        for i, (s, e) in enumerate(spans)
    ]


def test_models_agree_on_clear_speech(engines, clips: list[TeacherInput]) -> None:
    teacher, second = engines
    labels, opinions = teacher.transcribe(clips), second.transcribe(clips)
    scores = [disagreement(a.text, b.text, "en") for a, b in zip(labels, opinions, strict=True)]
    pairs = [(a.text, b.text) for a, b in zip(labels, opinions, strict=True)]
    assert all(a and b for a, b in pairs), pairs  # real text on both sides, not two empty strings agreeing
    assert max(scores) <= 0.5 and sum(scores) / len(scores) <= 0.25, (scores, pairs)


def test_a_planted_mismatch_disagrees(engines, clips: list[TeacherInput]) -> None:
    teacher, second = engines
    label = teacher.transcribe(clips[:1])[0]
    other = second.transcribe(clips[1:2])[0]  # the second model hears a different utterance
    assert disagreement(label.text, other.text, "en") >= 0.7, (label.text, other.text)


# ------------------------------------------------------------------------------------------ in transcribe_shard


class _Fixed(TeacherEngine):
    """Answers a fixed text for every segment, failing on the ids in ``fail``."""

    name = "fixed"
    prompt_version = "v0"

    def __init__(self, text: str, model: str, fail: Sequence[str] = ()) -> None:
        super().__init__(TeacherSettings(model=model))
        self.text, self.fail, self.seen = text, set(fail), []

    @property
    def model_id(self) -> str:
        return self.settings.model

    def transcribe(self, batch: Sequence[TeacherInput]) -> list[TeacherOutput | TeacherError]:
        self.seen.extend(item.segment_id for item in batch)
        return [
            TeacherError(f"fixed failed on {item.segment_id}")
            if item.segment_id in self.fail
            else TeacherOutput(self.text, item.language, 3, -0.1, 0.0, 1.0, "stop")
            for item in batch
        ]


def _unlabelled(pipeline_run, tmp_path: Path) -> tuple[LocalStore, str]:
    """A copy of the pipeline's output with its transcripts removed."""
    _, out, shard = pipeline_run
    shutil.copytree(out, tmp_path / "out")
    store = LocalStore(tmp_path / "out")
    for info in list(store.list(layout.transcripts_prefix(shard))):
        store.delete(info.key)
    if store.exists(layout.dead_letter_key("transcripts", shard)):
        store.delete(layout.dead_letter_key("transcripts", shard))
    return store, shard


def test_pipeline_run_has_second_opinions(pipeline_run) -> None:
    result, out, shard = pipeline_run
    rows = read_transcripts(LocalStore(out), shard).to_pylist()
    assert rows and all(r["second_model_id"].startswith("whisper-base-") for r in rows)
    assert all(0.0 <= r["disagreement"] <= 1.0 for r in rows)
    meta = result.asset_materializations_for_node("transcripts")[0].metadata
    assert meta["second_opinion_segments"].value == len(rows)
    assert meta["second_opinion_x_realtime"].value > 0
    assert meta["mean_disagreement"].value == pytest.approx(sum(r["disagreement"] for r in rows) / len(rows), abs=1e-3)


def test_second_opinion_columns_and_failures(pipeline_run, tmp_path: Path) -> None:
    store, shard = _unlabelled(pipeline_run, tmp_path)
    ids = sorted(read_table(store, layout.features_key(shard), FEATURE_SCHEMA)["segment_id"].to_pylist())
    teacher = _Fixed("The cat sat on the mat.", "teacher")
    second = _Fixed("the cat sat on a mat", "second", fail=ids[:1])
    loads = []
    opinion = SecondOpinion(lambda: loads.append(1) or second, 1.0)
    report = transcribe_shard(
        store, shard, lambda: teacher, TranscribeSettings(wave_size=2, batch_size=2), second=opinion
    )
    rows = {r["segment_id"]: r for r in read_transcripts(store, shard).to_pylist()}
    assert sorted(rows) == ids and len(loads) == 1  # loaded once, for all the waves
    # The second model's failure keeps the teacher's label, with nothing from the second opinion and no dead letter.
    assert rows[ids[0]]["text"] == "The cat sat on the mat."
    assert rows[ids[0]]["second_text"] is rows[ids[0]]["second_model_id"] is rows[ids[0]]["disagreement"] is None
    assert layout.read_dead_letters(store, "transcripts", shard).num_rows == 0
    for sid in ids[1:]:
        assert (rows[sid]["second_text"], rows[sid]["second_model_id"]) == ("the cat sat on a mat", "second")
        assert rows[sid]["disagreement"] == pytest.approx(1 / 6)
    assert report.totals["second_opinion_segments"] == len(ids) - 1
    assert report.totals["second_opinion_failed"] == 1
    assert report.totals["second_opinions"] == len(ids) - 1
    assert report.totals["mean_disagreement"] == pytest.approx(1 / 6)


def test_a_resumed_step_keeps_its_second_opinions(pipeline_run, tmp_path: Path) -> None:
    store, shard = _unlabelled(pipeline_run, tmp_path)
    teacher, second = _Fixed("one two three", "teacher"), _Fixed("one two", "second")
    settings = TranscribeSettings(wave_size=2, batch_size=2)

    def killed(report) -> None:
        raise KeyboardInterrupt  # the step dies right after its first wave's part is written

    with pytest.raises(KeyboardInterrupt):
        transcribe_shard(
            store, shard, lambda: teacher, settings, on_wave=killed, second=SecondOpinion(lambda: second, 1.0)
        )
    transcribe_shard(store, shard, lambda: teacher, settings, second=SecondOpinion(lambda: second, 1.0))
    rows = read_transcripts(store, shard).to_pylist()
    assert len(rows) == len({r["segment_id"] for r in rows}) == len(second.seen)  # nothing labelled twice
    assert all(r["disagreement"] == pytest.approx(1 / 3) for r in rows)


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_only_sampled_segments_get_a_second_opinion(pipeline_run, tmp_path: Path, fraction: float) -> None:
    store, shard = _unlabelled(pipeline_run, tmp_path)
    second = _Fixed("words", "second")

    def load_second() -> TeacherEngine:
        assert fraction > 0, "fraction 0 must never load the second model"
        return second

    opinion = SecondOpinion(load_second, fraction)
    transcribe_shard(store, shard, lambda: _Fixed("words", "teacher"), TranscribeSettings(), second=opinion)
    rows = read_transcripts(store, shard).to_pylist()
    judged = {r["segment_id"] for r in rows if r["disagreement"] is not None}
    assert judged == {r["segment_id"] for r in rows if is_sampled(r["segment_id"], fraction)}
    assert sorted(second.seen) == sorted(judged)
    assert all(r["second_text"] is None for r in rows if r["segment_id"] not in judged)


# ------------------------------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("spec", "fraction", "expected"),
    [
        ("faster-whisper:whisper-base", 1.0, ("faster-whisper", "whisper-base")),
        ("faster-whisper:/models/whisper-small", 0.05, ("faster-whisper", "/models/whisper-small")),
        ("off", 1.0, None),
        ("", 1.0, None),
        ("faster-whisper:whisper-base", 0.0, None),
    ],
)
def test_second_opinion_setting(spec: str, fraction: float, expected) -> None:
    resource = TeacherResource(second_opinion=spec, second_opinion_fraction=fraction)
    assert resource.second_opinion_spec() == expected


def test_an_unknown_second_engine_fails_at_setup() -> None:
    with (
        pytest.raises(dg.DagsterResourceFunctionError) as caught,
        dg.build_resources({"teacher": TeacherResource(second_opinion="gpt:big")}),
    ):
        pass
    assert "ASR_SECOND_OPINION='gpt:big': 'gpt' is not a registered engine" in str(caught.value.__cause__)


@pytest.mark.parametrize(
    ("env", "engine", "expected"),
    [(None, "faster-whisper", 1.0), (None, "vllm", 0.01), ("0.2", "vllm", 0.2), ("0", "faster-whisper", 0.0)],
)
def test_fraction_defaults_follow_the_teacher(monkeypatch, env: str | None, engine: str, expected: float) -> None:
    if env is None:
        monkeypatch.delenv("ASR_SECOND_OPINION_FRACTION", raising=False)
    else:
        monkeypatch.setenv("ASR_SECOND_OPINION_FRACTION", env)
    assert deployment.second_opinion_fraction(engine) == expected


def test_second_opinion_env_vars(monkeypatch) -> None:
    monkeypatch.setenv("ASR_SECOND_OPINION", "off")
    monkeypatch.setenv("ASR_SECOND_OPINION_FRACTION", "1.5")
    with pytest.raises(ValueError, match="ASR_SECOND_OPINION_FRACTION=1.5"):
        deployment.teacher("local")
    monkeypatch.setenv("ASR_SECOND_OPINION_FRACTION", "0.3")
    with dg.build_resources({"teacher": deployment.teacher("local")}) as built:
        assert built.teacher.second_opinion_spec() is None
        assert built.teacher.second_opinion_fraction == 0.3
