"""The filters on a slice of real human speech (Debian's Asterisk prompts): no rule drops a good label, and planted
bad labels of every kind are caught. The full set is ``bench/filters.py`` (bench/RESULTS.md)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from asr_assets.assets import DistilledConfig
from asr_assets.distill import apply_rules, fit_rules
from asr_assets.filter_eval import (
    evaluate,
    junk_candidates,
    load_references,
    natural_labels,
    planted_text_labels,
    run_pipeline,
)
from asr_assets.real_speech import build_corpus, prompt_texts
from resources.teachers import TeacherResource

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_speech_eval(tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("real-speech")
    cache = ROOT / "data" / "cache-debs"  # the packages are downloaded once per checkout (data/ is not tracked)
    corpus = work / "corpus"
    # Clean prompts, a degraded copy of every fourth (noise, telephone band), and the LibriVox sentences and card
    # names (digits, another speaker): the cases where rules used to drop good labels.
    build_corpus(corpus, cache, limit=14, degraded_every=4, with_pocketsphinx=True)
    teacher = TeacherResource()
    run_pipeline(corpus / "media", work / "out", teacher, dnsmos_fraction=0.0)
    natural, second_text = natural_labels(work / "out", corpus / "media", load_references(corpus))
    good = [item.candidate for item in natural if item.kind == "good"]
    foreign = sorted(t for t in prompt_texts(cache, "es").values() if len(t.split()) >= 4)
    planted = planted_text_labels(good, second_text, foreign, per_kind=4)
    junk = junk_candidates(work / "junk", good[:6], teacher.load_second_opinion())
    rules = DistilledConfig().rules()
    fitted = fit_rules(rules, [item.candidate for item in natural])
    # Per truncated label: the share of the good label's words it kept, and the rules that dropped it.
    originals = {c.segment_id: c for c in good}
    truncated = [
        (
            len(item.candidate.text.split())
            / len(originals[item.candidate.segment_id.removesuffix("-truncated")].text.split()),
            apply_rules(fitted, item.candidate),
        )
        for item in planted
        if item.kind == "truncated"
    ]
    return {"natural": natural, "truncated": truncated, "result": evaluate(natural + planted + junk, rules)}


def test_the_slice_is_real_speech_the_teacher_gets_right(real_speech_eval: dict) -> None:
    result = real_speech_eval["result"]
    # Clean studio prompts: the CPU teacher gets nearly all of them right; a slice that classes most labels as
    # errors would mean broken references or alignment, not a hard corpus.
    assert result["good_segments"] >= 16
    assert result["natural_errors"] <= result["good_segments"] // 2


def test_no_rule_drops_a_good_label(real_speech_eval: dict) -> None:
    result = real_speech_eval["result"]
    offenders = {name: c["good_dropped"] for name, c in result["per_rule"].items() if c["good_dropped"]}
    assert not offenders, f"rules dropping good labels: {offenders}; e.g. {result['good_dropped_examples']}"


def test_planted_bad_labels_are_caught(real_speech_eval: dict) -> None:
    result = real_speech_eval["result"]
    by_kind = result["caught_by_kind"]
    for kind in ("swapped", "wrong_language", "repetition", "silence", "noise", "music"):
        assert by_kind[kind]["total"] >= 2, kind
        assert by_kind[kind]["caught"] == by_kind[kind]["total"], f"{kind}: {by_kind[kind]}"
    # A label missing 40% or more of its words is always caught (the second opinion then disagrees on more than 60%
    # of the teacher's words). One cut at 70-75% of a short prompt is near what any rule can tell from a good label:
    # whether its speaking rate or disagreement crosses a line depends on the labels this CPU's teacher wrote (a CI
    # machine caught 2 of 4 where this one catches 4), so those are reported, not required (bench/RESULTS.md has the
    # catch ratio on the full set).
    truncated = real_speech_eval["truncated"]
    assert len(truncated) >= 4
    heavy = [(kept, reasons) for kept, reasons in truncated if kept <= 0.6]
    assert len(heavy) >= 2 and all(reasons for _, reasons in heavy), truncated
    light = [(round(kept, 2), reasons) for kept, reasons in truncated if kept > 0.6]
    if any(not reasons for _, reasons in light):
        warnings.warn(f"light truncations not caught (share of words kept, rules): {light}", stacklevel=1)
    assert result["planted_caught_ratio"] >= 0.9
