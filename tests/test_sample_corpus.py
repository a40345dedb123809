"""Tests for the deterministic sample corpus generator."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from asr_assets import sample_corpus
from asr_assets.sample_corpus import FORMATS, VOICES, Corpus, CorpusItem, generate_corpus
from tests.conftest import NUM_FILES

TAIL_S = 0.5
# Encoders pad or estimate: ffprobe reports mp3 about 75 ms long and AAC carries up to a 46 ms frame of priming.
DURATION_TOLERANCE_S = 0.1


def _probe(path: Path) -> dict:
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration:stream=codec_type", "-of", "json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"ffprobe failed on {path}: {result.stderr}"
    return json.loads(result.stdout)


def _hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_files_exist_with_expected_extensions(corpus: Corpus) -> None:
    good = [item for item in corpus.items if item.broken is None]
    assert [Path(item.path).suffix for item in good] == [f".{fmt}" for fmt in FORMATS]
    assert any("/" in item.path for item in good), "some files must sit in a subfolder"
    broken = {item.path: item.broken for item in corpus.items if item.broken is not None}
    assert broken == {
        "broken_empty.wav": "empty",
        "broken_random.mp3": "random",
        "broken_text.flac": "text",
        "broken_noaudio.mp4": "noaudio",
    }
    listed = {path.relative_to(corpus.media_dir).as_posix() for path in corpus.media_dir.rglob("*") if path.is_file()}
    assert listed == {item.path for item in corpus.items}
    assert (corpus.media_dir / "broken_empty.wav").stat().st_size == 0
    assert (corpus.media_dir / "broken_random.mp3").stat().st_size == 4096


def test_good_files_have_audio_of_the_right_duration(corpus: Corpus) -> None:
    for item in corpus.items:
        if item.broken is not None:
            continue
        probe = _probe(corpus.media_dir / item.path)
        assert "audio" in [stream["codec_type"] for stream in probe["streams"]], item.path
        expected_s = item.speech[-1][1] + TAIL_S
        assert float(probe["format"]["duration"]) == pytest.approx(expected_s, abs=DURATION_TOLERANCE_S), item.path


def test_noaudio_video_has_no_audio_stream(corpus: Corpus) -> None:
    probe = _probe(corpus.media_dir / "broken_noaudio.mp4")
    assert [stream["codec_type"] for stream in probe["streams"]] == ["video"]


def test_references_round_trip(corpus: Corpus) -> None:
    lines = corpus.references_path.read_text(encoding="utf-8").splitlines()
    assert tuple(CorpusItem.from_json(json.loads(line)) for line in lines) == corpus.items
    for item in corpus.items:
        assert item.text == " ".join(item.sentences)
        assert (item.broken is None) == bool(item.text)
        assert len(item.speech) == len(item.sentences)


def test_speech_intervals_are_sorted_and_separated(corpus: Corpus) -> None:
    for item in corpus.items:
        if item.broken is None:
            assert 2 <= len(item.speech) <= 4, item.path
        for start, end in item.speech:
            assert start < end, item.path
        for (_, end), (next_start, _) in zip(item.speech, item.speech[1:], strict=False):
            # The gap is a whole number of samples >= 1 s; the tolerance only absorbs float division.
            assert next_start - end >= 1.0 - 1e-9, item.path


def test_generation_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # espeak-ng itself is not always bit-reproducible: a CI run once got one sample less at the end of a sentence from
    # the session's first espeak-ng call than every later call gave (300 in a row alike). So each sentence is spoken
    # once here, and the test checks what this generator adds: plans, trimming, gaps, noise, encoding and pruning.
    spoken: dict[tuple[str, str, int], np.ndarray] = {}
    synthesize = sample_corpus._synthesize

    def speak_once(sentence: str, plan, wav_path: Path) -> np.ndarray:
        key = (sentence, plan.voice, plan.speed_wpm)
        if key not in spoken:
            spoken[key] = synthesize(sentence, plan, wav_path)
        return spoken[key].copy()

    monkeypatch.setattr(sample_corpus, "_synthesize", speak_once)
    first = generate_corpus(tmp_path / "first", seed=0, num_files=NUM_FILES)
    out_dir = tmp_path / "again"
    # A larger first run leaves en_007_wav.wav behind, which the second run must prune.
    generate_corpus(out_dir, seed=0, num_files=NUM_FILES + 1)
    again = generate_corpus(out_dir, seed=0, num_files=NUM_FILES)
    assert again.items == first.items
    assert _hashes(out_dir) == _hashes(first.references_path.parent)


def test_voices_are_distinct(tmp_path: Path) -> None:
    # espeak-ng silently falls back to the base voice for a variant it does not apply (e.g. "en-gb+f2").
    digests = set()
    for voice in VOICES:
        wav = tmp_path / "voice.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(wav), "Glue the sheet."], check=True, capture_output=True)
        digests.add(hashlib.sha256(wav.read_bytes()).hexdigest())
    assert len(digests) == len(VOICES)
