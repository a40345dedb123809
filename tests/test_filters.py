"""Table tests for every filter rule: (rule, candidate, expected decision)."""

from __future__ import annotations

import pytest

from asr_assets.distill import (
    Candidate,
    EmptyText,
    HallucinationPhrase,
    LowConfidence,
    NoSpeech,
    RepetitionLoop,
    SpeakingRate,
    TooLong,
    TooShort,
    apply_rules,
    default_rules,
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
) -> Candidate:
    return Candidate(
        "s-00000", text, duration_s, rms_dbfs, avg_logprob, no_speech_prob, compression_ratio(text), finish_reason
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
    ],
)
def test_rule(rule, candidate: Candidate, drops: bool) -> None:
    assert rule.drops(candidate) is drops


def test_rules_run_in_order_and_record_every_reason() -> None:
    c = cand(text="you", duration_s=0.2, rms_dbfs=-80.0, avg_logprob=-1.6, no_speech_prob=0.95)
    assert apply_rules(default_rules(), c) == ["too_short", "hallucination_phrase", "no_speech", "low_confidence"]
    assert apply_rules(default_rules(), cand()) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Hello, World!", "hello world"), ("It's  fine.", "its fine"), ("  ", ""), ("Café au lait?", "café au lait")],
)
def test_normalize_text(text: str, expected: str) -> None:
    assert normalize_text(text) == expected
