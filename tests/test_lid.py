"""Spoken language ID per segment and the multilingual teacher, on espeak-ng speech in six languages and a file whose
speakers switch language at every turn (the whole asset graph with ``ASR_LANGUAGE=auto``)."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from asr_assets import layout
from asr_assets.definitions import all_assets, all_checks
from asr_assets.languages import script_share
from asr_assets.media import DecodeJob, decode_media
from asr_assets.multilingual_corpus import generate_multilingual_corpus
from asr_assets.stages.transcribe import read_transcripts
from partitions import NUM_SHARDS, shard_of
from resources.storage import LocalStore, StorageResource
from resources.teachers import TeacherResource
from resources.teachers.base import TeacherInput, TeacherSettings, create_engine


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("multilingual")
    generate_multilingual_corpus(out, files_per_language=1)
    return out


@pytest.fixture(scope="module")
def auto_run(multilingual: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every shard holding a corpus file materialized with ASR_LANGUAGE=auto; returns the output root."""
    out = tmp_path_factory.mktemp("auto-out")
    media = multilingual / "media"
    store = LocalStore(media)
    shards = sorted({shard_of(store.uri_of(p.name), NUM_SHARDS) for p in media.iterdir()})
    resources = {
        "storage": StorageResource(source_uri=str(media), output_root=str(out)),
        "teacher": TeacherResource(language="auto", second_opinion="off"),
    }
    per_shard = [a for a in all_assets if a.partitions_def is not None]
    for shard in shards:
        dg.materialize([*per_shard, *all_checks], resources=resources, partition_key=shard, raise_on_error=True)
    return out


def _files(out: Path) -> dict[str, dict]:
    store, files = LocalStore(out), {}
    for shard in [f"shard-{k:05d}" for k in range(NUM_SHARDS)]:
        build = layout.current_build(store, shard)
        for line in (out / layout.files_key(shard, build)).read_text().splitlines() if build else []:
            rec = json.loads(line)
            files[Path(rec["uri"]).name] = rec
    return files


def _overlap(turn: dict, seg: dict) -> float:
    return min(turn["end_s"], seg["end"]) - max(turn["start_s"], seg["start"])


def test_each_turn_of_a_mixed_language_file_carries_its_language(auto_run: Path, multilingual: Path) -> None:
    turns = [json.loads(line) for line in (multilingual / "turns.jsonl").read_text().splitlines()]
    assert len({t["language"] for t in turns}) >= 5
    (mixed,) = {t["path"] for t in turns}
    segments = _files(auto_run)[Path(mixed).name]["segments"]
    assert len(segments) >= len(turns) - 2  # a segment per turn, give or take a merged pair
    right = 0
    for turn in turns:
        mine = [s for s in segments if _overlap(turn, s) > 0.5 * (s["end"] - s["start"])]
        right += bool(mine) and all(s["language"] == turn["language"] for s in mine)
    # The goal for turns of mixed-language audio is 0.9; espeak's voices are clean.
    assert right / len(turns) >= 0.9, [(t["language"], t["text"][:20]) for t in turns]


def test_single_language_files_get_their_language_and_its_script(auto_run: Path, multilingual: Path) -> None:
    refs = [json.loads(line) for line in (multilingual / "references.jsonl").read_text().splitlines()]
    files = _files(auto_run)
    single = [r for r in refs if r["language"]]
    assert {r["language"] for r in single} >= {"es", "fr", "de", "ru", "zh"}
    for ref in single:
        rec = files[Path(ref["path"]).name]
        assert rec["language"] == ref["language"], (ref["path"], rec["language"])
        text = " ".join(s["text"] for s in rec["segments"] if s["text"])
        # Transcribed in the language's own script, not translated or romanized (Han for zh, Cyrillic for ru).
        assert script_share(text, ref["language"]) >= 0.9, (ref["language"], text)
    rows = [
        r
        for shard in range(NUM_SHARDS)
        for r in read_transcripts(LocalStore(auto_run), f"shard-{shard:05d}").to_pylist()
    ]
    assert rows and all(r["lid_model"].startswith("whisper-base@") for r in rows)
    assert all(0.0 < r["language_prob"] <= 1.0 for r in rows)
    models = {r["language"]: r["model_id"] for r in rows}
    assert models["es"].startswith("whisper-base") and models["zh"].startswith("whisper-base")


def test_the_manifest_and_sample_json_carry_the_detected_language(auto_run: Path) -> None:
    manifests = [pq.read_table(auto_run / layout.distilled_manifest_key(f"shard-{k:05d}")) for k in range(NUM_SHARDS)]
    rows = [r for m in manifests if m.num_rows for r in m.to_pylist()]
    assert rows and {r["language"] for r in rows} >= {"es", "zh"}
    assert all(r["lid_model"] and r["language_prob"] > 0 for r in rows)


def test_language_id_names_each_language(multilingual: Path, tmp_path: Path) -> None:
    from asr_assets.lid import SpokenLanguageId

    refs = [json.loads(line) for line in (multilingual / "references.jsonl").read_text().splitlines()]
    lid = SpokenLanguageId(workers=1)
    clips, truth = [], []
    for ref in (r for r in refs if r["language"]):
        dst = tmp_path / f"{ref['path']}.flac"
        decode_media(DecodeJob("m", ref["path"], multilingual / "media" / ref["path"], dst, 1 << 30, 3600.0))
        audio = sf.read(dst, dtype="float32")[0]
        for start, end in ref["speech"]:
            clips.append(audio[int(start * 16000) : int(end * 16000)])
            truth.append(ref["language"])
    found = lid.detect(clips)
    assert [d.language for d in found] == truth
    assert all(d.probs[d.language] == d.prob and abs(sum(d.probs.values()) - 1) < 0.2 for d in found)
    # Told the collection holds only Mandarin and English, it never names another language.
    narrow = SpokenLanguageId(("zh", "en"), workers=1).detect(clips)
    assert {d.language for d in narrow} <= {"zh", "en"}
    assert [d.language for d, t in zip(narrow, truth, strict=True) if t == "zh"] == ["zh"] * truth.count("zh")
    with pytest.raises(ValueError, match="not languages Whisper knows"):
        SpokenLanguageId(("xx",), workers=1)


def test_auto_with_an_english_only_model_fails_before_labelling(tmp_path: Path) -> None:
    from resources.teachers.whisper import shipped_model_path

    with pytest.raises(ValueError, match="English-only.*ASR_LANGUAGE=en"):
        create_engine("faster-whisper", TeacherSettings(model=str(shipped_model_path()), language="auto"))


def test_auto_teacher_uses_tiny_en_for_english_and_whisper_base_otherwise() -> None:
    engine = create_engine("faster-whisper", TeacherSettings(language="auto", threads=1))
    try:
        assert engine.model_id.startswith("model@") and "+whisper-base-" in engine.model_id
        silence = np.zeros(16000, np.float32)
        (en,) = engine.transcribe([TeacherInput("a", silence, "en")])
        (unsure,) = engine.transcribe([TeacherInput("b", silence, "")])
        assert en.model_id.startswith("model@") and unsure.model_id.startswith("whisper-base-")
        assert unsure.language  # Whisper named the language it transcribed in
    finally:
        engine.close()


@pytest.mark.parametrize("value", ["english", "e", "en_US", ""])
def test_asr_language_must_be_auto_or_a_code(value: str) -> None:
    with pytest.raises(ValueError, match="ASR_LANGUAGE"):
        TeacherResource(language=value).setup_for_execution(dg.build_init_resource_context())
