"""Every language the teacher speaks, on the text side: language_mismatch, speaking rate in characters for zh/ja/ko,
character loops, CER, unicode normalization, the LID fields through a dataset build and the per-language report, and
the multilingual espeak-ng corpus."""

from __future__ import annotations

import json
import subprocess
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from asr_assets import layout
from asr_assets.calibrate import label_error_rate
from asr_assets.distill import (
    Candidate,
    LanguageMismatch,
    PackSettings,
    RepetitionLoop,
    SpeakingRate,
    SpeakingRateOutlier,
    build_rules,
    canonical_text,
    distill_shard,
    fit_rules,
    normalize_text,
)
from asr_assets.languages import majority_language, script_units, text_language, unspaced_units
from asr_assets.multilingual_corpus import LANGUAGES, generate_multilingual_corpus
from asr_assets.records import (
    AUDIO_SCHEMA,
    FEATURE_SCHEMA,
    MEDIA_SCHEMA,
    SAMPLE_RATE,
    SEGMENT_SCHEMA,
    TRANSCRIPT_SCHEMA,
    VAD_MEDIA_SCHEMA,
)
from asr_assets.report import build_report, render_plots
from resources.storage import LocalStore, write_table
from resources.teachers.base import compression_ratio


def cand(
    text: str,
    language: str = "en",
    duration_s: float = 4.0,
    language_prob: float | None = None,
    finish_reason: str = "stop",
) -> Candidate:
    return Candidate(
        "s-00000",
        text,
        duration_s,
        -20.0,
        -0.3,
        0.01,
        compression_ratio(text),
        finish_reason,
        language,
        speech_s=duration_s,
        language_prob=language_prob,
    )


SPANISH = "Por favor, cierra la ventana antes de salir de casa."
ENGLISH = "Please remember to close the window before you leave."
MANDARIN = "今天的天气非常好，我们去公园散步吧。"


@pytest.mark.parametrize(
    ("candidate", "drops"),
    [
        (cand(SPANISH, "es"), False),
        (cand(ENGLISH, "es"), True),  # a teacher that translates
        (cand(ENGLISH, "es", language_prob=0.97), True),
        (cand(ENGLISH, "es", language_prob=0.3), False),  # audio LID unsure: the teacher was not told a language
        (cand("Le train pour la ville part très tôt le matin.", "es"), True),  # answered in another language
        (cand("Para bloquear ó desbloquear la conferencia.", "es"), False),  # reads as Catalan: a relative
        (cand(MANDARIN, "zh"), False),
        (cand("我今天用 iPhone 拍了很多照片", "zh"), False),  # an English word in Mandarin speech
        (cand("jin tian de tian qi fei chang hao", "zh"), True),  # pinyin
        (cand("The weather is very nice today.", "zh"), True),  # translated
        (cand(MANDARIN, "en"), True),
        (cand("Поезд в город уходит рано утром.", "en"), True),  # Cyrillic on English audio
        (cand("Поезд в город уходит рано утром.", "ru"), False),
        (cand("Зарегистрирован входящий звонок", "ru"), False),  # reads as Ukrainian: a relative
        (cand("OK", "zh"), False),  # short: never judged
        (cand("OK, gracias", "en"), False),
        (cand("Hola amigo", "en"), False),  # ambiguous short text
        (cand("Information about your last call.", "en"), False),  # read as French with p 0.91: not sure enough
        (cand("alpha bravo charlie delta echo foxtrot golf hotel", "en"), False),  # p 0.9999 "it", on little evidence
        (cand("12 34 56", "ja"), False),  # no letters
        (cand("Habari ya asubuhi rafiki yangu mpendwa sana", "sw"), False),  # a language outside the LID set
    ],
)
def test_language_mismatch(candidate: Candidate, drops: bool) -> None:
    assert LanguageMismatch().drops(candidate) is drops


def test_text_language_reads_the_languages_it_is_given() -> None:
    assert text_language(SPANISH, "es")[0] == "es"
    found, prob, margin = text_language(ENGLISH, "es")
    assert found == "en" and prob > 0.99 and margin > 0.4
    assert text_language(MANDARIN)[0] == "zh"
    assert script_units("我用 iPhone 拍照") == {"Han": 4, "Latin": 1}


@pytest.mark.parametrize(
    ("candidate", "drops"),
    [
        (cand(MANDARIN, "zh", duration_s=3.2), False),  # 16 characters in 3.2 s: 5 characters a second
        (cand("今天的天气", "zh", duration_s=6.0), True),  # truncated: 0.8 a second
        (cand(MANDARIN * 4, "zh", duration_s=3.2), True),  # 20 a second: invented or looping
        (cand("こんにちは、今日はいい天気ですね。", "ja", duration_s=3.0), False),
        (cand("안녕하세요 만나서 반갑습니다", "ko", duration_s=2.5), False),
        (cand(ENGLISH, "en", duration_s=3.2), False),
    ],
)
def test_speaking_rate_in_characters_for_unspaced_scripts(candidate: Candidate, drops: bool) -> None:
    assert SpeakingRate().drops(candidate) is drops


def test_letter_bounds_would_keep_a_looping_mandarin_label() -> None:
    looping = cand(MANDARIN * 3, "zh", duration_s=3.2)  # 15 characters a second
    assert looping.chars_per_s == pytest.approx(15.0)
    assert 2.0 <= looping.chars_per_s <= 30.0  # within the English letter bounds
    assert SpeakingRate().drops(looping)


def test_speaking_rate_fence_fits_mandarin_on_its_own() -> None:
    # English at 12-16 letters a second and Mandarin at 4-6 characters a second in one shard.
    shard = [cand("x" * (48 + i % 16), duration_s=4.0) for i in range(30)]
    shard += [cand("好" * (16 + i % 8), "zh", duration_s=4.0) for i in range(30)]
    (fitted,) = fit_rules([SpeakingRateOutlier()], shard)
    assert not fitted.drops(cand("好" * 20, "zh", duration_s=4.0))  # 5 a second: normal Mandarin
    assert fitted.drops(cand("好" * 8, "zh", duration_s=4.0))  # half the characters missing
    assert not fitted.drops(cand("x" * 56, duration_s=4.0))


@pytest.mark.parametrize(
    ("text", "drops"),
    [
        ("我爱你我爱你我爱你我爱你", True),  # a 3-character n-gram four times
        ("我爱你，我爱你，我爱你，我爱你。", True),
        ("谢谢你们的帮助谢谢你们的帮助谢谢你们的帮助", True),  # a phrase three times
        ("好的好的好的", False),  # a word three times is speech
        ("哈哈哈哈哈哈", False),  # laughter
        ("哈哈哈哈哈哈哈哈哈哈哈哈", True),
        ("对对对，就是这个。", False),
        (MANDARIN, False),
        ("ありがとうありがとうありがとうありがとう", True),
    ],
)
def test_character_ngram_repetition(text: str, drops: bool) -> None:
    assert RepetitionLoop(max_compression_ratio=99).drops(cand(text, "zh")) is drops


@pytest.mark.parametrize(
    ("reference", "hypothesis", "language", "expected"),
    [
        ("今天天气很好", "今天天汽很好", "zh", ("cer", 1 / 6)),
        ("今天 天气 很好。", "今天天气很好", "zh", ("cer", 0.0)),  # spaces and punctuation are not characters
        ("東京に行きます", "東京に行きました", "ja", ("cer", 2 / 7)),
        ("the cat sat", "the cat sat down", "en", ("wer", 1 / 3)),
        ("Está muy bien", "esta muy bien", "es", ("wer", 0.0)),  # an accent is not a word error
        ("", "noise", "en", ("wer", None)),
    ],
)
def test_label_error_rate(reference: str, hypothesis: str, language: str, expected: tuple) -> None:
    metric, value = label_error_rate(reference, hypothesis, language)
    assert metric == expected[0]
    assert value == (None if expected[1] is None else pytest.approx(expected[1]))


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        ("ＨＥＬＬＯ　ｗｏｒｌｄ１２３！", "en", "hello world123"),  # full-width forms
        ("Ｐｒｅｓｓ ２.", "en", "press 2"),
        ("Café au lait, s'il vous plaît", "fr", "cafe au lait sil vous plait"),
        ("Cafe\u0301", "fr", "cafe"),  # decomposed accent
        ("Всё хорошо, я и ты", "ru", "все хорошо я и ты"),  # Cyrillic kept, ё as е, one-letter words apart
        ("Йогурт", "ru", "йогурт"),  # й is a letter of its own
        ("今天，天气很好！", "zh", "今天 天气很好"),
        ("がっこう", "ja", "がっこう"),  # kana voicing marks stay
        ("Tiếng Việt", "vi", "tiếng việt"),  # Vietnamese tone marks tell words apart
    ],
)
def test_canonical_text_is_unicode_aware(text: str, language: str, expected: str) -> None:
    assert canonical_text(text, language) == expected


def test_normalize_text_folds_full_width_forms() -> None:
    assert normalize_text("ＡＢＣ，ｄｅｆ。") == "abc def"


def test_units_and_majority() -> None:
    assert unspaced_units("我用iPhone拍照") == 6  # 4 Han, "iPhone" about 2 syllables
    assert unspaced_units("2024年") == 5
    assert majority_language([("es", 1.0), ("en", 4.0), ("es", 1.0)]) == "en"  # by speech, not by count
    assert majority_language([(None, 3.0)]) is None


# A shard built by hand: the LID fields as the transcripts stage writes them with ASR_LANGUAGE=auto.
SHARD = "shard-00000"
LID_MODEL = "whisper-base-lid"
# (media, [(seconds, language, language_prob, text)])
MEDIA = [
    (
        "mixed.wav",
        [
            (1.5, "es", 0.98, "Mi hermana trabaja en una pequeña librería."),
            (4.0, "en", 0.99, "The children played in the park until it started to rain today."),
            (1.5, "es", 0.91, "Mañana va a hacer frío y viento."),
        ],
    ),
    ("mandarin.wav", [(3.2, "zh", 0.99, MANDARIN), (3.0, "zh", 0.97, "请在离开房间的时候关掉电灯。")]),
    ("translated.wav", [(3.5, "es", 0.95, ENGLISH)]),
]


def _write_shard(store: LocalStore) -> None:
    rows: dict[str, list] = {name: [] for name in ("index", "audio", "vad", "segments", "features", "transcripts")}
    rng = np.random.default_rng(0)
    for n, (name, segs) in enumerate(MEDIA):
        media_id = f"{n:016x}"
        audio_key = layout.audio_key(SHARD, media_id)
        total = sum(s for s, *_ in segs)
        pcm = 0.1 * rng.standard_normal(round(total * SAMPLE_RATE)).astype(np.float32)
        store.local_path(audio_key).parent.mkdir(parents=True, exist_ok=True)
        sf.write(store.local_path(audio_key), pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        uri = f"file:///media/{name}"
        rows["index"].append(
            {"media_id": media_id, "uri": uri, "key": name, "size": 1, "mtime": 0.0, "extension": "wav"}
            | {"discovered_at": datetime(2026, 1, 1, tzinfo=UTC)}
        )
        rows["audio"].append(
            {"media_id": media_id, "uri": uri, "status": "decoded", "audio_key": audio_key, "duration_s": total}
            | {"detected_format": "wav", "seconds": 0.0}
        )
        rows["vad"].append({"media_id": media_id, "duration_s": total, "speech_s": total, "num_segments": len(segs)})
        start = 0.0
        for k, (seconds, language, prob, text) in enumerate(segs):
            segment_id = f"{media_id}-{k:05d}"
            end = start + seconds
            rows["segments"].append(
                {"segment_id": segment_id, "media_id": media_id, "index": k, "start_s": start, "end_s": end}
                | {"vad_model_sha256": "0" * 64, "vad_params": "{}", "speech_s": seconds}
            )
            rows["features"].append(
                {"segment_id": segment_id, "media_id": media_id, "start_s": start, "end_s": end}
                | {"duration_s": seconds, "rms_dbfs": -20.0, "clip_ratio": 0.0, "audio_key": audio_key}
                | {"audio_offset": round(start * SAMPLE_RATE), "audio_frames": round(seconds * SAMPLE_RATE)}
            )
            rows["transcripts"].append(
                {"segment_id": segment_id, "media_id": media_id, "text": text, "language": language}
                | {"num_tokens": 10, "avg_logprob": -0.2, "no_speech_prob": 0.01, "compression_ratio": 1.1}
                | {"finish_reason": "stop", "model_id": "teacher", "engine": "fake", "settings_hash": "s"}
                | {"prompt_version": "p", "language_prob": prob, "lid_model": LID_MODEL}
            )
            start = end
    write_table(store, layout.index_part_key(SHARD, 0), pa.Table.from_pylist(rows["index"], MEDIA_SCHEMA))
    for key, schema, name in (
        (layout.audio_manifest_key(SHARD), AUDIO_SCHEMA, "audio"),
        (layout.vad_media_key(SHARD), VAD_MEDIA_SCHEMA, "vad"),
        (layout.segments_key(SHARD), SEGMENT_SCHEMA, "segments"),
        (layout.features_key(SHARD), FEATURE_SCHEMA, "features"),
    ):
        write_table(store, key, pa.Table.from_pylist(rows[name], schema))
    transcripts = pa.Table.from_pylist(rows["transcripts"], TRANSCRIPT_SCHEMA)
    write_table(store, layout.transcript_part_key(SHARD, 0), transcripts)


@pytest.fixture
def built(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "out")
    _write_shard(store)
    distill_shard(store, SHARD, build_rules(), PackSettings())
    return store


def test_a_build_carries_the_language_fields(built: LocalStore) -> None:
    build = layout.current_build(built, SHARD)
    manifest = pq.read_table(built.local_path(layout.distilled_manifest_key(SHARD))).to_pylist()
    by_key = {r["key"]: r for r in manifest}
    assert len(manifest) == 5  # every segment but the translated one
    assert {r["language"] for r in manifest} == {"es", "en", "zh"}
    assert all(r["lid_model"] == LID_MODEL and 0.9 < r["language_prob"] <= 1.0 for r in manifest)
    with tarfile.open(built.local_path(manifest[0]["tar_key"])) as tar:
        sample = json.loads(tar.extractfile(f"{manifest[0]['key']}.json").read())
    assert sample["lid_model"] == LID_MODEL
    assert sample["language_prob"] == pytest.approx(by_key[sample["key"]]["language_prob"], abs=1e-6)
    decisions = pq.read_table(built.local_path(layout.decisions_key(SHARD, build))).to_pylist()
    assert [d["drop_reason"] for d in decisions if not d["kept"]] == ["language_mismatch"]
    files = {
        f["uri"].rsplit("/", 1)[1]: f
        for f in map(json.loads, built.read_bytes(layout.files_key(SHARD, build)).decode().splitlines())
    }
    # Most of mixed.wav's speech is English (4 s of 7), though most of its segments are Spanish.
    assert {name: f["language"] for name, f in files.items()} == {
        "mixed.wav": "en",
        "mandarin.wav": "zh",
        "translated.wav": "es",
    }
    segments = files["mixed.wav"]["segments"]
    assert [s["language"] for s in segments] == ["es", "en", "es"]
    assert [s["language_prob"] for s in segments] == pytest.approx([0.98, 0.99, 0.91], abs=1e-6)
    assert {s["lid_model"] for s in segments} == {LID_MODEL}
    assert files["translated.wav"]["segments"][0]["status"] == "dropped:language_mismatch"


def test_the_report_accounts_per_language(built: LocalStore) -> None:
    references = {
        "file:///media/mandarin.wav": "今天的天气非常好，我们去公园散步吧。请在离开房间的时候关掉电灯。",
        "file:///media/mixed.wav": "Mi hermana trabaja en una pequeña librería. The children played in the park until "
        "it started to rain today. Mañana va a hacer frío y viento.",
    }
    report, dist = build_report(built, [SHARD], references)
    assert set(report.languages) == {"es", "en", "zh"}
    assert sum(v["kept"] for v in report.languages.values()) == report.kept == 5
    assert sum(v["transcribed"] for v in report.languages.values()) == report.transcribed == 6
    assert report.languages["es"]["dropped_by_reason"] == {"language_mismatch": 1}
    assert report.languages["zh"]["kept_hours"] == pytest.approx(6.2 / 3600, abs=1e-5)
    assert sum(v["hours_in"] for v in report.languages.values()) == pytest.approx(report.hours_in, abs=1e-4)
    assert report.error_rate_by_language["zh"]["metric"] == "cer"
    assert report.error_rate_by_language["en"]["metric"] == "wer"  # mixed.wav: mostly English speech
    # Every label is the reference: 0 errors, in characters for Mandarin and in words for the other file.
    assert report.cer_all == report.cer_kept == 0.0 and report.wer_all == report.wer_kept == 0.0
    png = render_plots(dist)["languages"]
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


@pytest.fixture(scope="module")
def multilingual(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("multilingual")
    generate_multilingual_corpus(out, seed=0, files_per_language=1)
    return out


def _decode(path: Path) -> np.ndarray:
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-ac", "1", "-ar", "16000", "-f", "f32le", "-"]
    done = subprocess.run(cmd, capture_output=True, check=True)
    return np.frombuffer(done.stdout, np.float32)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_the_multilingual_corpus_decodes_with_its_stated_durations(multilingual: Path) -> None:
    records = [json.loads(line) for line in (multilingual / "references.jsonl").read_text().splitlines()]
    assert [r["language"] for r in records[:-1]] == list(LANGUAGES)
    for r in records:
        audio = _decode(multilingual / "media" / r["path"])
        # Lossy encoders pad a few milliseconds.
        assert abs(audio.size / 16000 - r["duration_s"]) < 0.1, r["path"]
        for start, end in r["speech"]:
            assert _rms(audio[int(start * 16000) : int(end * 16000)]) > 0.02
    zh = next(r for r in records if r["language"] == "zh")
    assert set(script_units(zh["text"])) == {"Han"}  # Mandarin in Han characters, not pinyin
    ru = next(r for r in records if r["language"] == "ru")
    assert set(script_units(ru["text"])) == {"Cyrillic"}


def test_the_mixed_file_switches_language_every_turn(multilingual: Path) -> None:
    turns = [json.loads(line) for line in (multilingual / "turns.jsonl").read_text().splitlines()]
    mixed = json.loads((multilingual / "references.jsonl").read_text().splitlines()[-1])
    audio = _decode(multilingual / "media" / mixed["path"])
    assert 60 <= audio.size / 16000 <= 90 and mixed["language"] is None
    assert {t["language"] for t in turns} >= {"es", "fr", "de", "ru", "zh", "en"}
    assert [t["language"] for t in turns] == mixed["languages"]
    for a, b in zip(turns, turns[1:], strict=False):
        assert a["language"] != b["language"]
        assert 0.9 - 0.002 <= b["start_s"] - a["end_s"] <= 1.4 + 0.002  # pauses well past VAD's 0.5-s minimum silence
        pause = audio[int((a["end_s"] + 0.1) * 16000) : int((b["start_s"] - 0.1) * 16000)]
        speech = audio[int(a["start_s"] * 16000) : int(a["end_s"] * 16000)]
        assert _rms(speech) > 20 * _rms(pause)
