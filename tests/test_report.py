"""The distillation report asset: numbers that reconcile, plots, and the WER of all labels against kept labels."""

from __future__ import annotations

import json

import dagster as dg

from asr_assets.assets import distillation_report
from asr_assets.sample_corpus import Corpus
from tests.conftest import resources_for


def test_report_reconciles_and_measures_the_filters(pipeline_run, corpus: Corpus) -> None:
    _, out, shard = pipeline_run
    result = dg.materialize(
        [distillation_report],
        resources=resources_for(corpus, out),
        run_config={"ops": {"distillation_report": {"config": {"references": str(corpus.references_path)}}}},
    )
    assert result.success
    meta = {k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()}
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["decoded"] + report["dead_letter"] == report["media"]
    assert report["kept"] + sum(report["dropped_by_reason"].values()) == report["transcribed"]
    # Sums taken in different orders (Arrow sums in parallel): equal hours may differ in the last bits.
    assert 0 < report["kept_hours"] <= report["speech_hours"] + 1e-9 <= report["hours_in"] + 2e-9
    good_files = [i for i in corpus.items if not i.broken]
    assert 0 < report["referenced_files"] <= len(good_files)
    # Segment-level WER: dropping a correct label raises the kept WER a little (on espeak speech Whisper base
    # disagrees with one right label of the sample), dropping a wrong one lowers it; neither may move it far.
    assert abs(report["wer_kept"] - report["wer_all"]) < 0.03 and report["wer_kept"] < 0.3
    # The whole-file view counts every dropped segment's words as missing.
    assert report["wer_files_kept_text"] >= report["wer_kept"] - 1e-9
    assert meta["wer_kept_labels"] == round(report["wer_kept"], 4)
    # The run had a second opinion and DNSMOS on every segment: both are plotted and summarized.
    assert report["second_opinion_segments"] == report["transcribed"] == report["dnsmos_scored"]
    assert set(report["estimated_error_rate"]) == {shard}
    assert 0 <= report["estimated_error_rate"][shard]["all"] <= 1
    assert 1 <= report["dnsmos_ovrl_median"]["all"] <= 5
    for name in ("duration", "speaking_rate", "confidence", "disagreement", "dnsmos"):
        png = (out / "report" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        assert f"![{name}](data:image/png;base64," in meta["plots"]
