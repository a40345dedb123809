"""The filters on real speech: good labels dropped and bad labels caught, per rule.

Builds the real-speech corpus from Debian packages (asr_assets/real_speech.py), runs the whole asset graph on it with
the CPU teacher and its second opinion, classes every label against its reference, plants bad labels of every kind,
and applies the real rules. Prints one JSON line last:
{"good_segments", "good_dropped_ratio", "bad_segments", "bad_caught_ratio", "per_rule": {rule: {...}}, ...}.

    .venv/bin/python bench/filters.py [--limit 150] [--holdout] [--work data/bench-filters] [--card CARD.json]

The work folder is reused: a second run with the same settings labels nothing again (the graph is incremental).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr_assets.assets import NOT_RULE_FIELDS, DistilledConfig  # noqa: E402
from asr_assets.calibrate import CARD_FIELDS, fit_card  # noqa: E402
from asr_assets.filter_eval import (  # noqa: E402
    evaluate,
    junk_candidates,
    load_references,
    natural_labels,
    planted_text_labels,
    run_pipeline,
    summarize_kinds,
)
from asr_assets.real_speech import build_corpus, prompt_texts  # noqa: E402
from asr_assets.report import build_report  # noqa: E402
from partitions import shard_partitions  # noqa: E402
from resources.storage import LocalStore  # noqa: E402
from resources.teachers import TeacherResource  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=150, help="Asterisk sentence prompts (English)")
    parser.add_argument("--per-kind", type=int, default=24, help="planted bad labels of each kind")
    parser.add_argument("--work", type=Path, default=Path("data/bench-filters"))
    parser.add_argument("--cache", type=Path, default=Path("data/cache-debs"))
    parser.add_argument("--card", type=Path, default=None, help="evaluate with a threshold card's thresholds")
    parser.add_argument(
        "--fit-card",
        type=Path,
        default=None,
        help="fit a threshold card on these labels and save it",
    )
    parser.add_argument("--target-wer", type=float, default=0.05, help="the card's target WER of kept labels")
    parser.add_argument(
        "--holdout", action="store_true", help="the English prompts --limit does NOT select (rules never tuned on them)"
    )
    args = parser.parse_args()

    started = time.perf_counter()
    name = f"{args.limit}-holdout" if args.holdout else str(args.limit)
    corpus, root = args.work / f"corpus-{name}", args.work / f"out-{name}"
    records = build_corpus(
        corpus, args.cache.resolve(), limit=args.limit, holdout=args.holdout, with_pocketsphinx=not args.holdout
    )
    teacher = TeacherResource()
    run_pipeline(corpus / "media", root, teacher)
    natural, second_text = natural_labels(root, corpus / "media", load_references(corpus))
    good = [item.candidate for item in natural if item.kind == "good"]
    foreign = [t for t in prompt_texts(args.cache.resolve(), "es").values() if len(t.split()) >= 4]
    planted = planted_text_labels(good, second_text, sorted(foreign), args.per_kind)
    engine = teacher.load_second_opinion()
    junk = junk_candidates(args.work / "junk", good[:: max(1, len(good) // (3 * args.per_kind))][: 3 * args.per_kind],
                           engine)  # fmt: skip
    labelled = natural + planted + junk
    if args.fit_card:
        base = DistilledConfig().model_dump(exclude={*NOT_RULE_FIELDS, *CARD_FIELDS})
        audited = {item.candidate.segment_id: item.audit for item in natural}
        fitted = fit_card([item.candidate for item in natural], audited, base, args.target_wer)
        args.fit_card.write_text(json.dumps(fitted, indent=2, sort_keys=True))
    card = json.loads(args.card.read_text()) if args.card else None
    result = evaluate(labelled, DistilledConfig().rules(card))
    # What the distillation report says about the same run (file level, the default rules as the graph applied them).
    source = LocalStore(corpus / "media")
    refs = {source.uri_of(path): text for path, text in load_references(corpus).items()}
    report, _ = build_report(LocalStore(root), shard_partitions.get_partition_keys(), refs)
    result |= {"report_wer_all": report.wer_all, "report_wer_kept": report.wer_kept}
    result |= {
        "files": len(records),
        "audio_s": round(sum(r["duration_s"] for r in records), 1),
        "kinds": summarize_kinds(labelled),
        "second_opinion": teacher.second_opinion,
        "card": str(args.card) if args.card else None,
        "holdout": args.holdout,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
