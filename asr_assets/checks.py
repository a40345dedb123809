"""Per-partition asset checks: nothing lost (counts reconcile between stages) and no duplicate ids.

The reconciliation is plain functions over the stored tables (tests call them directly); the checks wrap them.
"""

import warnings
from collections import Counter
from dataclasses import dataclass, field

import dagster as dg
import pyarrow.compute as pc

from asr_assets import layout
from asr_assets.assets import audio_wav, distilled_dataset, media_index, segment_features, transcripts, vad_segments
from asr_assets.distill import MANIFEST_SCHEMA
from asr_assets.records import (
    AUDIO_SCHEMA,
    DECISION_SCHEMA,
    FEATURE_SCHEMA,
    SEGMENT_SCHEMA,
    VAD_MEDIA_SCHEMA,
)
from asr_assets.stages import read_transcripts
from partitions import shard_partitions
from resources.storage import ObjectStore, StorageResource, read_table

# Partitioned asset checks are a Dagster preview feature; the warning says nothing actionable to our users.
warnings.filterwarnings("ignore", message=".*partitions_def.*", category=Warning)


@dataclass
class Reconciliation:
    """The outcome of one check: problems found (empty: passed) and the counts that were compared."""

    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems

    def expect_partition(self, what: str, whole: set[str], parts: dict[str, set[str]]) -> None:
        """Every id of ``whole`` is in exactly one of ``parts``, and the parts hold nothing else."""
        self.counts[what] = len(whole)
        seen: Counter = Counter()
        for name, ids in parts.items():
            self.counts[name] = len(ids)
            seen.update(ids)
        missing = whole - set(seen)
        twice = [i for i, n in seen.items() if n > 1]
        extra = set(seen) - whole
        if missing:
            self.problems.append(f"{len(missing)} {what} without an outcome, e.g. {sorted(missing)[:3]}")
        if twice:
            self.problems.append(f"{len(twice)} {what} with more than one outcome, e.g. {sorted(twice)[:3]}")
        if extra:
            self.problems.append(f"{len(extra)} outcomes for unknown {what}, e.g. {sorted(extra)[:3]}")

    def expect_unique(self, what: str, ids: list[str]) -> None:
        dupes = [i for i, n in Counter(ids).items() if n > 1]
        if dupes:
            self.problems.append(f"{len(dupes)} duplicate {what}, e.g. {sorted(dupes)[:3]}")

    def result(self) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(
            passed=self.passed,
            metadata={"problems": dg.MetadataValue.json(self.problems), **self.counts},
        )


def _dead(out: ObjectStore, stage: str, shard: str) -> list[str]:
    return layout.read_dead_letters(out, stage, shard)["item_id"].to_pylist()


def reconcile_index(out: ObjectStore, shard: str) -> Reconciliation:
    r = Reconciliation()
    index = layout.read_index(out, shard)
    r.expect_unique("media ids", index["media_id"].to_pylist())
    r.expect_unique("uris", index["uri"].to_pylist())
    r.counts["media"] = index.num_rows
    return r


def reconcile_audio(out: ObjectStore, shard: str) -> Reconciliation:
    r = Reconciliation()
    index = layout.read_index(out, shard)
    audio = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    decoded = audio.filter(pc.equal(audio["status"], "decoded"))["media_id"].to_pylist()
    dead = _dead(out, "audio_wav", shard)
    r.expect_unique("audio manifest rows", audio["media_id"].to_pylist())
    r.expect_unique("dead letters", dead)
    r.expect_partition("media", set(index["media_id"].to_pylist()), {"decoded": set(decoded), "dead_letter": set(dead)})
    missing_files = [k for k in audio["audio_key"].drop_null().to_pylist() if not out.exists(k)]
    if missing_files:
        r.problems.append(f"{len(missing_files)} decoded audio files missing, e.g. {missing_files[:3]}")
    return r


def reconcile_vad(out: ObjectStore, shard: str) -> Reconciliation:
    r = Reconciliation()
    audio = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    decoded = set(audio.filter(pc.equal(audio["status"], "decoded"))["media_id"].to_pylist())
    media = read_table(out, layout.vad_media_key(shard), VAD_MEDIA_SCHEMA)
    segments = read_table(out, layout.segments_key(shard), SEGMENT_SCHEMA)
    r.expect_unique("segment ids", segments["segment_id"].to_pylist())
    r.expect_partition(
        "decoded media",
        decoded,
        {"segmented": set(media["media_id"].to_pylist()), "dead_letter": set(_dead(out, "vad_segments", shard))},
    )
    per_media = Counter(segments["media_id"].to_pylist())
    wrong = [m["media_id"] for m in media.to_pylist() if per_media[m["media_id"]] != m["num_segments"]]
    if wrong:
        r.problems.append(f"{len(wrong)} media whose segment count disagrees with their segments, e.g. {wrong[:3]}")
    return r


def reconcile_features(out: ObjectStore, shard: str) -> Reconciliation:
    r = Reconciliation()
    segments = read_table(out, layout.segments_key(shard), SEGMENT_SCHEMA)
    features = read_table(out, layout.features_key(shard), FEATURE_SCHEMA)
    r.expect_unique("feature rows", features["segment_id"].to_pylist())
    r.expect_partition(
        "segments",
        set(segments["segment_id"].to_pylist()),
        {
            "featured": set(features["segment_id"].to_pylist()),
            "dead_letter": set(_dead(out, "segment_features", shard)),
        },
    )
    return r


def reconcile_transcripts(out: ObjectStore, shard: str) -> Reconciliation:
    r = Reconciliation()
    features = read_table(out, layout.features_key(shard), FEATURE_SCHEMA)
    labelled = read_transcripts(out, shard)["segment_id"].to_pylist()
    r.expect_unique("transcripts", labelled)
    r.expect_partition(
        "featured segments",
        set(features["segment_id"].to_pylist()),
        {"transcribed": set(labelled), "dead_letter": set(_dead(out, "transcripts", shard))},
    )
    return r


def reconcile_distilled(out: ObjectStore, shard: str) -> Reconciliation:
    r = Reconciliation()
    labelled = set(read_transcripts(out, shard)["segment_id"].to_pylist())
    decisions = read_table(out, layout.decisions_key(shard), DECISION_SCHEMA)
    r.expect_unique("decisions", decisions["segment_id"].to_pylist())
    kept = decisions.filter(decisions["kept"])
    dropped = decisions.filter(pc.invert(decisions["kept"]))
    if dropped.num_rows and dropped["drop_reason"].null_count:
        r.problems.append(f"{dropped['drop_reason'].null_count} dropped segments without a reason")
    r.expect_partition(
        "transcribed segments",
        labelled,
        {"kept": set(kept["segment_id"].to_pylist()), "dropped": set(dropped["segment_id"].to_pylist())},
    )
    manifest = read_table(out, layout.distilled_manifest_key(shard), MANIFEST_SCHEMA)
    r.expect_unique("dataset keys", manifest["key"].to_pylist())
    if manifest.num_rows != kept.num_rows:
        r.problems.append(f"manifest has {manifest.num_rows} rows for {kept.num_rows} kept segments")
    return r


def _check(asset: dg.AssetsDefinition, name: str, fn, description: str):
    @dg.asset_check(asset=asset, name=name, partitions_def=shard_partitions, description=description, blocking=True)
    def _run(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
        # A run over a range of shards (the teacher's backfill policy) checks each of them; problems name the shard.
        shards = context.partition_keys
        if len(shards) == 1:
            return fn(storage.output(), shards[0]).result()
        combined = Reconciliation()
        for shard in shards:
            r = fn(storage.output(), shard)
            combined.problems.extend(f"{shard}: {p}" for p in r.problems)
            for what, count in r.counts.items():
                combined.counts[what] = combined.counts.get(what, 0) + count
        return combined.result()

    return _run


index_ids_unique = _check(media_index, "ids_unique", reconcile_index, "No media id or uri appears twice.")
audio_counts_reconcile = _check(
    audio_wav, "counts_reconcile", reconcile_audio, "Every index row is decoded or dead-lettered, exactly once."
)
vad_counts_reconcile = _check(
    vad_segments,
    "counts_reconcile",
    reconcile_vad,
    "Every decoded media has a VAD outcome or a dead letter; ids unique.",
)
features_counts_reconcile = _check(
    segment_features,
    "counts_reconcile",
    reconcile_features,
    "Every segment is featured or dead-lettered, exactly once.",
)
transcripts_counts_reconcile = _check(
    transcripts, "counts_reconcile", reconcile_transcripts, "Every featured segment is transcribed or dead-lettered."
)
distilled_counts_reconcile = _check(
    distilled_dataset, "counts_reconcile", reconcile_distilled, "Every transcript is kept or dropped with a reason."
)
