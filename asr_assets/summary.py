"""Summarise an output root: counts across every shard and, given references, the WER of the kept transcripts.

``python -m asr_assets.summary --output-root data/out [--references data/sample/references.jsonl]`` prints a table
of per-shard counts and, as its last line, one JSON object (what ``make demo`` ends with).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import jiwer
import pyarrow.compute as pc

from asr_assets import layout
from asr_assets.distill import normalize_text
from asr_assets.records import AUDIO_SCHEMA, DECISION_SCHEMA, MEDIA_SCHEMA, SEGMENT_SCHEMA
from asr_assets.stages import read_transcripts
from resources.storage import ObjectStore, open_store, read_table


def summarize(out: ObjectStore, shards: list[str]) -> dict:
    """Whole-dataset counts: media, decoded, dead-lettered, segments, transcribed, kept, kept hours, drops by reason."""
    totals: Counter = Counter()
    drops: Counter = Counter()
    for shard in shards:
        index = read_table(out, layout.index_key(shard), MEDIA_SCHEMA)
        audio = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
        decisions = read_table(out, layout.decisions_key(shard), DECISION_SCHEMA)
        totals["media"] += index.num_rows
        totals["decoded"] += pc.sum(pc.equal(audio["status"], "decoded")).as_py() or 0
        totals["dead_letter"] += layout.read_dead_letters(out, "audio_wav", shard).num_rows
        totals["segments"] += read_table(out, layout.segments_key(shard), SEGMENT_SCHEMA).num_rows
        totals["transcribed"] += read_transcripts(out, shard).num_rows
        totals["kept"] += pc.sum(decisions["kept"]).as_py() or 0
        drops.update(decisions.filter(pc.invert(decisions["kept"]))["drop_reason"].to_pylist())
        if out.exists(layout.distilled_state_key(shard)):
            state = json.loads(out.read_bytes(layout.distilled_state_key(shard)))
            totals["kept_s"] += state["totals"]["kept_hours"] * 3600
    return {
        "media": totals["media"],
        "decoded": totals["decoded"],
        "dead_letter": totals["dead_letter"],
        "segments": totals["segments"],
        "transcribed": totals["transcribed"],
        "kept": totals["kept"],
        "kept_hours": round(totals["kept_s"] / 3600, 4),
        "dropped_by_reason": dict(sorted(drops.items())),
    }


def kept_texts(out: ObjectStore, shards: list[str]) -> dict[str, str]:
    """Full kept text of every media object, by uri (from the per-file JSONL)."""
    texts = {}
    for shard in shards:
        key = layout.files_key(shard)
        if out.exists(key):
            for line in out.read_bytes(key).decode().splitlines():
                row = json.loads(line)
                texts[row["uri"]] = row["text"]
    return texts


def corpus_wer(references: dict[str, str], hypotheses: dict[str, str]) -> float:
    """Corpus-level WER of normalized hypotheses against references (a missing hypothesis counts as empty)."""
    refs = [normalize_text(t) for t in references.values()]
    hyps = [normalize_text(hypotheses.get(uri, "")) for uri in references]
    return float(jiwer.wer(refs, hyps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-root", required=True)
    parser.add_argument("--references", type=Path, help="references.jsonl from asr_assets.sample_corpus")
    parser.add_argument("--media-root", help="the source the references' paths are relative to (ASR_SOURCE_URI)")
    args = parser.parse_args(argv)

    from partitions import shard_partitions

    out = open_store(args.output_root, must_exist=True, what="--output-root")
    shards = shard_partitions.get_partition_keys()
    summary = summarize(out, shards)
    if args.references:
        source = open_store(
            args.media_root or str(args.references.parent / "media"), must_exist=True, what="--media-root"
        )
        refs = {}
        for line in args.references.read_text().splitlines():
            item = json.loads(line)
            if not item.get("broken"):
                refs[source.uri_of(item["path"])] = item["text"]
        summary["wer"] = round(corpus_wer(refs, kept_texts(out, shards)), 4)
    print(f"{'':<14}" + "".join(f"{k:>13}" for k in ("media", "decoded", "dead_letter", "segments", "kept")))
    print(
        f"{'all shards':<14}"
        + "".join(f"{summary[k]:>13}" for k in ("media", "decoded", "dead_letter", "segments", "kept"))
    )
    print(f"dropped by reason: {summary.pop('dropped_by_reason')}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
