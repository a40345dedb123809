"""Threshold cards: references split over segments, the fitted thresholds meet the target, and the card is
deterministic."""

from __future__ import annotations

import json

import pytest

from asr_assets.assets import NOT_RULE_FIELDS, DistilledConfig
from asr_assets.calibrate import (
    CARD_FIELDS,
    audit_segments,
    card_overrides,
    fit_card,
    label_errors,
    segment_references,
)
from asr_assets.distill import Candidate, default_rules
from resources.teachers.base import compression_ratio


@pytest.mark.parametrize(
    ("reference", "hypotheses", "expected"),
    [
        ("the cat sat on the mat", ["the cat sat", "on the mat"], ["the cat sat", "on the mat"]),
        # A word the teacher missed goes to the segment that was speaking.
        ("the cat sat on the mat", ["the cat", "on the mat"], ["the cat sat", "on the mat"]),
        ("the cat sat on the mat", ["the dog sat", "on a mat"], ["the cat sat", "on the mat"]),
        ("Hello, World!", ["hello", "world"], ["hello", "world"]),
        # Compared as canonical text: number words as digits.
        ("one two", ["", "one two"], ["", "1 2"]),
        ("one two", ["", ""], ["1 2", ""]),
    ],
)
def test_segment_references(reference: str, hypotheses: list[str], expected: list[str]) -> None:
    assert segment_references(reference, hypotheses) == expected


def test_segment_references_of_an_unspaced_script() -> None:
    assert segment_references("今天天气很好", ["今天天气", "很好"], "zh") == ["今天天气", "很好"]
    assert label_errors("今天天气很好", "今天天汽很好", "zh") == (1, 6)


def test_label_errors_normalize() -> None:
    assert label_errors("The cat, sat.", "the cat sat") == (0, 3)
    assert label_errors("the cat sat", "") == (3, 3)
    assert label_errors("", "noise") == (1, 0)


def _cand(i: int, text: str, logprob: float, disagreement: float | None) -> Candidate:
    return Candidate(
        f"m{i:03d}-00000", text, 3.0, -20.0, logprob, 0.01, compression_ratio(text), "stop", "en", 0.0, 2.5,
        disagreement,
    )  # fmt: skip


def _audit_set():
    """40 files of one segment each: 30 right (confident, agreeing), 10 wrong (less confident, disagreeing)."""
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
    candidates, files, references = [], {}, {}
    for i in range(40):
        ref = " ".join(words[(i + k) % 8] for k in range(8))
        wrong = i % 4 == 3
        # An English word: a code word ("zulu") makes the text read as Romanian, which language_mismatch would see.
        text = " ".join(["nothing"] * 3 + ref.split()[3:]) if wrong else ref
        c = _cand(i, text, -0.9 if wrong else -0.2 - 0.01 * (i % 5), 0.375 if wrong else 0.0 + 0.05 * (i % 3))
        candidates.append(c)
        files[f"file://{i}"] = [(c.segment_id, c.text, "en")]
        references[f"file://{i}"] = ref
    return candidates, audit_segments(files, references)


def test_card_meets_the_target_and_keeps_the_most_hours() -> None:
    candidates, audited = _audit_set()
    base = DistilledConfig().model_dump(exclude={*NOT_RULE_FIELDS, *CARD_FIELDS})
    card = fit_card(candidates, audited, base, target_wer=0.05)
    effect = card["effect"]
    assert card["target_met"] is True
    assert effect["wer_all"] == pytest.approx(10 * 3 / (40 * 8), abs=1e-4)
    assert effect["wer_kept"] <= 0.05
    # Every right label is kept: 30 segments of 3 s.
    assert effect["kept_segments"] == 30 and effect["hours_kept"] == pytest.approx(90 / 3600, abs=1e-5)
    lo, hi = effect["wer_kept_ci95"]
    assert lo <= effect["wer_kept"] <= hi
    again = fit_card(list(reversed(candidates)), audited, base, target_wer=0.05)
    assert json.dumps(again, sort_keys=True) == json.dumps(card, sort_keys=True)


def test_an_unreachable_target_is_reported_not_hidden() -> None:
    candidates, audited = _audit_set()
    # The wrong labels become indistinguishable from the right ones: no threshold separates them.
    blind = [
        Candidate(c.segment_id, c.text, 3.0, -20.0, -0.2, 0.01, c.compression_ratio, "stop", "en", 0.0, 2.5, None)
        for c in candidates
    ]
    base = DistilledConfig().model_dump(exclude={*NOT_RULE_FIELDS, *CARD_FIELDS})
    card = fit_card(blind, audited, base, target_wer=0.01)
    assert card["target_met"] is False
    assert card["effect"]["wer_kept"] == pytest.approx(card["effect"]["wer_all"])


def test_a_card_replaces_the_configured_thresholds() -> None:
    candidates, audited = _audit_set()
    base = DistilledConfig().model_dump(exclude={*NOT_RULE_FIELDS, *CARD_FIELDS})
    card = fit_card(candidates, audited, base, target_wer=0.05)
    rules = DistilledConfig().rules(card)
    by_name = {r.name: r for r in rules}
    assert by_name["low_confidence"].min_avg_logprob == card["thresholds"]["min_avg_logprob"]
    assert by_name["disagreement"].max_disagreement == card["thresholds"]["max_disagreement"]
    assert by_name["speaking_rate_outlier"].k == card["thresholds"]["rate_fence_k"]
    assert DistilledConfig().rules() == default_rules()
    with pytest.raises(ValueError, match="threshold card"):
        card_overrides({"version": "something-else"})


def test_threshold_card_asset_and_a_dataset_built_with_it(pipeline_run, corpus, tmp_path) -> None:
    import shutil

    import dagster as dg

    from asr_assets.assets import distilled_dataset, threshold_card
    from tests.conftest import resources_for

    _, out, shard = pipeline_run
    root = tmp_path / "out"
    shutil.copytree(out, root)
    audit = {"ops": {"threshold_card": {"config": {"audit": str(corpus.references_path), "target_wer": 0.2}}}}
    result = dg.materialize([threshold_card], resources=resources_for(corpus, root), run_config=audit)
    card = json.loads((root / "report" / "threshold_card.json").read_text())
    meta = {k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()}
    assert card["effect"]["audited_segments"] > 0 and card["target_met"] == meta["target_met"]
    assert meta["thresholds"] == card["thresholds"]
    # The same inputs give the same card.
    dg.materialize([threshold_card], resources=resources_for(corpus, root), run_config=audit)
    assert json.loads((root / "report" / "threshold_card.json").read_text()) == card

    built = dg.materialize(
        [distilled_dataset],
        resources=resources_for(corpus, root),
        partition_key=shard,
        run_config={"ops": {"distilled_dataset": {"config": {"threshold_card": "report/threshold_card.json"}}}},
    )
    meta = {k: v.value for k, v in built.get_asset_materialization_events()[0].materialization.metadata.items()}
    assert meta["threshold_card"]["thresholds"] == card["thresholds"]
    bad = dg.materialize(
        [distilled_dataset],
        resources=resources_for(corpus, root),
        partition_key=shard,
        run_config={"ops": {"distilled_dataset": {"config": {"threshold_card": "report/no-such-card.json"}}}},
        raise_on_error=False,
    )
    assert not bad.success
