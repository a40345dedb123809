"""Table tests for every filter rule: (rule, candidate, expected decision)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from asr_assets.distill import (
    Candidate,
    Clipped,
    Disagreement,
    EmptyText,
    HallucinationPhrase,
    LowAcousticQuality,
    LowConfidence,
    NearSilent,
    NoSpeech,
    RepetitionLoop,
    SpeakingRate,
    SpeakingRateOutlier,
    TooLong,
    TooShort,
    UnsureDisagreement,
    apply_rules,
    canonical_text,
    default_rules,
    fit_rules,
    normalize_text,
)
from resources.teachers.base import compression_ratio


def cand(
    text: str = "the cat sat on the mat",
    duration_s: float = 2.0,
    rms_dbfs: float = -20.0,
    avg_logprob: float | None = -0.3,
    no_speech_prob: float | None = 0.01,
    finish_reason: str = "stop",
    language: str = "en",
    clip_ratio: float = 0.0,
) -> Candidate:
    return Candidate(
        "s-00000",
        text,
        duration_s,
        rms_dbfs,
        avg_logprob,
        no_speech_prob,
        compression_ratio(text),
        finish_reason,
        language,
        clip_ratio,
    )


@pytest.mark.parametrize(
    ("rule", "candidate", "drops"),
    [
        (EmptyText(), cand(text=""), True),
        (EmptyText(), cand(text=" ... !?"), True),
        (EmptyText(), cand(text="ok."), False),
        (TooShort(0.5), cand(duration_s=0.3), True),
        (TooShort(0.5), cand(duration_s=0.5), False),
        (TooLong(30.0), cand(duration_s=30.5), True),
        (TooLong(30.0), cand(duration_s=30.0), False),
        # Whisper tiny on this machine: 30 s of digital silence -> " you" (no_speech_prob 0.95).
        (HallucinationPhrase(), cand(text=" you", duration_s=30.0, rms_dbfs=-120.0, no_speech_prob=0.95), True),
        # 0.2 s fragments -> "Thank you very much."
        (HallucinationPhrase(), cand(text="Thank you very much.", duration_s=0.2, rms_dbfs=-30.0), True),
        (HallucinationPhrase(), cand(text="Thanks for watching!", duration_s=6.0, rms_dbfs=-60.0), True),
        # The same words said clearly in a long, loud segment are speech.
        (HallucinationPhrase(), cand(text="Thank you very much.", duration_s=4.0, rms_dbfs=-18.0), False),
        (HallucinationPhrase(), cand(text="thank you for the lovely dinner"), False),
        (RepetitionLoop(), cand(text="go go go go go go"), True),
        (RepetitionLoop(), cand(text="I think that I think that I think that I think that I think that"), True),
        (RepetitionLoop(), cand(finish_reason="length"), True),
        (RepetitionLoop(), cand(text="the the cat"), False),
        # max_repeats=4 is the boundary: four times in a row is a loop, three is not.
        (RepetitionLoop(max_compression_ratio=99), cand(text="go go go go"), True),
        (RepetitionLoop(max_compression_ratio=99), cand(text="go go go"), False),
        (RepetitionLoop(max_compression_ratio=99), cand(text="we can, we can, we can, we can"), True),
        # A phrase three times is a loop; a word three times is emphasis.
        (RepetitionLoop(max_compression_ratio=99), cand(text="go to the menu to the menu to the menu"), True),
        (RepetitionLoop(max_compression_ratio=99), cand(text="no no no, not that one"), False),
        (RepetitionLoop(max_compression_ratio=99), cand(text="I said it, I said it."), False),
        (RepetitionLoop(), cand(text="we need to finish this project before the holidays"), False),
        (NoSpeech(), cand(no_speech_prob=0.9, avg_logprob=-1.5), True),
        (NoSpeech(), cand(no_speech_prob=0.9, avg_logprob=-0.2), False),
        (NoSpeech(), cand(no_speech_prob=None, avg_logprob=-1.5), False),
        (LowConfidence(-1.0), cand(avg_logprob=-1.2), True),
        (LowConfidence(-1.0), cand(avg_logprob=None), True),
        (LowConfidence(-1.0), cand(avg_logprob=-0.4), False),
        (SpeakingRate(2.0, 30.0), cand(text="a" * 100, duration_s=1.0), True),
        (SpeakingRate(2.0, 30.0), cand(text="hi", duration_s=10.0), True),
        (SpeakingRate(2.0, 30.0), cand(text="the cat sat on the mat", duration_s=1.5), False),
        (NearSilent(-50.0), cand(rms_dbfs=-62.0), True),
        (NearSilent(-50.0), cand(rms_dbfs=-35.0), False),
        (Clipped(0.01), cand(clip_ratio=0.05), True),
        (Clipped(0.01), cand(clip_ratio=0.001), False),
        # Unfitted shard-level rules judge nothing.
        (SpeakingRateOutlier(), cand(text="a" * 200, duration_s=1.0), False),
    ],
)
def test_rule(rule, candidate: Candidate, drops: bool) -> None:
    assert rule.drops(candidate) is drops


# A shard of English segments speaking at 12-16 chars/s, and German ones at 8-9.
SHARD = [cand(text="x" * (24 + i % 9), duration_s=2.0) for i in range(40)] + [
    cand(text="y" * (16 + i % 3), duration_s=2.0, language="de") for i in range(25)
]


@pytest.mark.parametrize(
    ("candidate", "drops"),
    [
        (cand(text="x" * 28, duration_s=2.0), False),  # 14 chars/s: the middle of the English shard
        (cand(text="x" * 50, duration_s=2.0), True),  # 25 chars/s: fine in absolute terms, an outlier here
        (cand(text="x" * 10, duration_s=2.0), True),  # 5 chars/s
        (cand(text="y" * 17, duration_s=2.0, language="de"), False),
        (cand(text="y" * 32, duration_s=2.0, language="de"), True),  # normal for English, not for this German
        (cand(text="z" * 60, duration_s=2.0, language="fr"), False),  # too few French segments to judge
    ],
)
def test_speaking_rate_fence_is_per_language_and_per_shard(candidate: Candidate, drops: bool) -> None:
    (fitted,) = fit_rules([SpeakingRateOutlier(k=1.5, min_segments=20)], SHARD)
    assert fitted.drops(candidate) is drops


def test_a_narrow_shard_keeps_its_own_tails() -> None:
    # One calm speaker: every segment at 13.5-14.5 chars per voiced second. A plain 1.5 x IQR fence would be
    # [12.75, 15.25] and drop ordinary variation; the floor on the width keeps it and still drops half a transcript.
    shard = [cand(text="x" * (27 + i % 3), duration_s=2.0) for i in range(40)]
    (fitted,) = fit_rules([SpeakingRateOutlier()], shard)
    assert not fitted.drops(cand(text="x" * 24, duration_s=2.0))  # 12 chars/s
    assert not fitted.drops(cand(text="x" * 34, duration_s=2.0))  # 17 chars/s
    assert fitted.drops(cand(text="x" * 14, duration_s=2.0))  # the same speech with its text cut at half


def test_speaking_rate_is_measured_over_voiced_time() -> None:
    # 28 letters in a 4 s segment of which 2 s are voiced (padding and a pause): 14 chars per voiced second.
    padded = replace(cand(text="x" * 28, duration_s=4.0), speech_s=2.0)
    assert padded.chars_per_s == 14.0
    (fitted,) = fit_rules([SpeakingRateOutlier()], SHARD)
    assert not fitted.drops(padded)
    assert fitted.drops(replace(padded, speech_s=None))  # over the whole 4 s it would look like 7 chars/s
    # A voiced time far under the segment (windows just under the VAD threshold) is floored at a quarter of it.
    assert replace(padded, speech_s=0.1).chars_per_s == 28.0


@pytest.mark.parametrize(
    ("rule", "candidate", "drops"),
    [
        (Disagreement(0.5), cand(), False),  # no second opinion: not judged
        (Disagreement(0.5), replace(cand(), disagreement=0.5), False),
        (Disagreement(0.5), replace(cand(), disagreement=0.51), True),
        # 3 of 5 words as stored (float32) is not over 0.6.
        (Disagreement(0.6), replace(cand(), disagreement=float(np.float32(0.6))), False),
        (UnsureDisagreement(), replace(cand(avg_logprob=-0.7), disagreement=0.5), True),
        (UnsureDisagreement(), replace(cand(avg_logprob=-0.3), disagreement=0.5), False),  # a confident teacher
        (UnsureDisagreement(), replace(cand(avg_logprob=-0.7), disagreement=0.4), False),
        (UnsureDisagreement(), cand(avg_logprob=-0.9), False),  # no second opinion
        (LowAcousticQuality(), replace(cand(), dnsmos_ovrl=1.2), False),  # off by default
        (LowAcousticQuality(3.0), replace(cand(), dnsmos_ovrl=2.9), True),
        (LowAcousticQuality(3.0), cand(), False),  # unscored
    ],
)
def test_second_opinion_and_quality_rules(rule, candidate: Candidate, drops: bool) -> None:
    assert rule.drops(candidate) is drops


def test_confidence_quantile_of_the_shard() -> None:
    shard = [cand(avg_logprob=-0.1 - 0.01 * i) for i in range(100)]  # -0.10 .. -1.09
    (fitted,) = fit_rules([LowConfidence(min_avg_logprob=-5.0, quantile=0.1)], shard)
    assert fitted.drops(cand(avg_logprob=-1.05)) and not fitted.drops(cand(avg_logprob=-0.5))
    (absolute,) = fit_rules([LowConfidence(min_avg_logprob=-1.0, quantile=0.0)], shard)
    assert not absolute.drops(cand(avg_logprob=-0.99)) and absolute.drops(cand(avg_logprob=-1.01))


def test_rules_run_in_order_and_record_every_reason() -> None:
    c = cand(text="you", duration_s=0.2, rms_dbfs=-80.0, avg_logprob=-1.6, no_speech_prob=0.95)
    assert apply_rules(default_rules(), c) == [
        "too_short",
        "near_silent",
        "hallucination_phrase",
        "no_speech",
        "low_confidence",
    ]
    assert apply_rules(default_rules(), cand()) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Hello, World!", "hello world"), ("It's  fine.", "its fine"), ("  ", ""), ("Café au lait?", "café au lait")],
)
def test_normalize_text(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        ("Press one, then pound.", "en", "press 1 then pound"),
        ("Seven of clubs", "en", "7 of clubs"),
        ("five, five.", "en", "5 5"),
        ("M-I-S-D-N", "en", "misdn"),
        ("I am a cat", "en", "i am a cat"),  # single letters apart are words
        ("uno dos", "es", "uno dos"),  # number words are English only
        ("I'm sorry, that's all. Don't press #.", "en", "i am sorry that is all do not press pound"),
        ("You can't; it cannot", "en", "you can not it can not"),
        ("the dog's bone", "en", "the dogs bone"),  # a possessive stays
        ("ไม่ใช่", "th", "ไม่ใช่"),  # combining vowel and tone marks stay in the word
    ],
)
def test_canonical_text(text: str, language: str, expected: str) -> None:
    assert canonical_text(text, language) == expected


def test_run_config_defaults_are_the_default_rule_set() -> None:
    from asr_assets.assets import DistilledConfig

    assert DistilledConfig().rules() == default_rules()
    assert DistilledConfig(max_repeats=7).rules()[6] == RepetitionLoop(max_repeats=7)
