"""The filters' value on real teacher output: junk segments go, real speech stays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asr_assets.distill import Candidate, apply_rules, default_rules, fit_rules
from asr_assets.media import DecodeJob, decode_media
from asr_assets.sample_corpus import Corpus
from asr_assets.segments import CLIP_LEVEL, dbfs, rms
from resources.teachers.base import TeacherInput, TeacherSettings, compression_ratio, create_engine

SR = 16_000


def _segments(corpus: Corpus, tmp_path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Real speech segments (each sentence, padded 0.1 s) and as many junk ones: noise, silence, 0.3 s fragments."""
    speech = []
    for n, item in enumerate(i for i in corpus.items if not i.broken):
        dst = tmp_path / f"{n}.flac"
        decode_media(DecodeJob("m", item.path, corpus.media_dir / item.path, dst, 1 << 30, 3600.0))
        audio = sf.read(dst, dtype="float32")[0]
        speech += [audio[max(0, int((s - 0.1) * SR)) : int((e + 0.1) * SR)] for s, e in item.speech]
    rng = np.random.default_rng(7)
    junk = []
    for k in range(len(speech)):
        kind = k % 3
        if kind == 0:  # white or pink-ish noise at -45 to -15 dBFS, 1-10 s
            noise = rng.normal(0, 1, int(rng.uniform(1, 10) * SR)).astype(np.float32)
            if k % 2:
                noise = np.cumsum(noise) / 50
                noise -= noise.mean()
            junk.append((noise / max(rms(noise), 1e-9) * 10 ** (rng.uniform(-45, -15) / 20)).astype(np.float32))
        elif kind == 1:  # digital silence up to 30 s, or near-silence with a little hiss
            seconds = rng.uniform(1, 30)
            junk.append(rng.normal(0, 1e-4 * (k % 2), int(seconds * SR)).astype(np.float32))
        else:  # 0.3 s fragments of real speech
            source = speech[k % len(speech)]
            start = int(rng.uniform(0, max(1, source.shape[0] - 0.3 * SR)))
            junk.append(source[start : start + int(0.3 * SR)])
    return speech, junk


@pytest.fixture(scope="module")
def labelled(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory):
    speech, junk = _segments(corpus, tmp_path_factory.mktemp("quality"))
    teacher = create_engine("faster-whisper", TeacherSettings(threads=2))
    try:
        outputs = teacher.transcribe([TeacherInput(f"s{i}", a, "en") for i, a in enumerate(speech + junk)])
    finally:
        teacher.close()
    candidates = []
    for i, (audio, out) in enumerate(zip(speech + junk, outputs, strict=True)):
        candidates.append(
            Candidate(
                segment_id=f"s{i}",
                text=out.text,
                duration_s=audio.shape[0] / SR,
                rms_dbfs=dbfs(rms(audio)),
                avg_logprob=out.avg_logprob,
                no_speech_prob=out.no_speech_prob,
                compression_ratio=compression_ratio(out.text),
                finish_reason=out.finish_reason,
                clip_ratio=float(np.mean(np.abs(audio) >= CLIP_LEVEL)),
            )
        )
    return candidates[: len(speech)], candidates[len(speech) :]


def test_filters_drop_junk_and_keep_speech(labelled) -> None:
    speech, junk = labelled
    rules = fit_rules(default_rules(), speech + junk)
    kept_junk = [(c.text, round(c.duration_s, 2), round(c.rms_dbfs)) for c in junk if not apply_rules(rules, c)]
    dropped_speech = [(c.text, apply_rules(rules, c)) for c in speech if apply_rules(rules, c)]
    speech_hours = sum(c.duration_s for c in speech)
    kept_speech_hours = sum(c.duration_s for c in speech if not apply_rules(rules, c))
    assert len(kept_junk) <= 0.05 * len(junk), kept_junk
    assert kept_speech_hours >= 0.95 * speech_hours, dropped_speech
