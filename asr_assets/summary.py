"""Summarise an output root: counts across every shard and, given references, the error rate of the kept labels.

The error rate is the WER, the CER for zh/ja/ko/th (both when the references cover both kinds of language).

``python -m asr_assets.summary --output-root data/out [--references data/sample/references.jsonl --media-root DIR]``
prints the distillation report's headline and, as its last line, one JSON object (what ``make demo`` ends with).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from asr_assets.report import build_report, load_references
from resources.storage import OssSettings, open_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-root", required=True)
    parser.add_argument("--references", help="references JSONL (asr_assets.sample_corpus writes one)")
    parser.add_argument("--media-root", help="the source the references' paths are relative to (ASR_SOURCE_URI)")
    args = parser.parse_args(argv)

    from partitions import shard_partitions

    # oss:// roots: the same OSS_* variables the pipeline reads.
    oss = OssSettings(
        os.environ.get("OSS_ENDPOINT", ""),
        os.environ.get("OSS_ACCESS_KEY_ID", ""),
        os.environ.get("OSS_ACCESS_KEY_SECRET", ""),
        Path(os.environ.get("ASR_CACHE_DIR", "./data/cache")),
    )
    out = open_store(args.output_root, must_exist=True, what="--output-root", oss=oss)
    references = None
    if args.references:
        source = open_store(args.media_root, must_exist=True, what="--media-root", oss=oss)
        references = load_references(args.references, source)
    report, _ = build_report(out, shard_partitions.get_partition_keys(), references)
    print(f"report: {report.headline()}")
    summary = {
        "media": report.media,
        "decoded": report.decoded,
        "dead_letter": report.dead_letter,
        "segments": report.segments,
        "transcribed": report.transcribed,
        "kept": report.kept,
        "kept_hours": round(report.kept_hours, 4),
    }
    if report.wer_kept is not None:
        summary["wer"] = round(report.wer_kept, 4)
    # zh/ja/ko/th labels are measured in characters; with several languages, each one's figure under its metric.
    if report.cer_kept is not None:
        summary["cer"] = round(report.cer_kept, 4)
    if len(report.error_rate_by_language) > 1:
        summary["error_rate_by_language"] = {
            language: {"metric": v["metric"], "kept": v["kept"]}
            for language, v in report.error_rate_by_language.items()
        }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
