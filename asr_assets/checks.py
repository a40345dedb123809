"""Per-partition asset checks: nothing lost (counts reconcile between stages) and no duplicate ids.

The reconciliation is plain functions over the stored tables (tests call them directly); the checks wrap them.
"""

import hashlib
import json
import tarfile
import warnings
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from asr_assets import dedup, failures, layout
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
    pending: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def expect_final(self, stage: str, dead: pa.Table) -> None:
        """Dead letters that are not final (a transient kind, a suspect one with attempts left) count as outcomes for
        the partition, but their items are still to be retried: reported as a warning, never hidden."""
        waiting = len(dead) - len(failures.final_ids(dead))
        self.counts["pending_retry"] = waiting
        if waiting:
            self.pending.append(
                f"{waiting} {stage} dead letters are not final (retried by the next run of the partition, or the "
                "pending_work sensor's)"
            )

    def expect_partition(
        self, what: str, whole: set[str], parts: dict[str, set[str]], late: set[str] = frozenset()
    ) -> None:
        """Every id of ``whole`` is in exactly one of ``parts``, and the parts hold nothing else. Ids of ``late``
        (indexed after the step read the index) may be in one part or none: none means they are the next run's work,
        counted as ``indexed_since``."""
        self.counts[what] = len(whole - late)
        seen: Counter = Counter()
        for name, ids in parts.items():
            self.counts[name] = len(ids)
            seen.update(ids)
        if late:
            self.counts["indexed_since"] = len(late - set(seen))
        missing = whole - late - set(seen)
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

    def expect_none(self, what: str, items: Collection[str]) -> None:
        """``items`` are problems of one kind (``what``): reported with a few examples when there are any."""
        if items:
            self.problems.append(f"{len(items)} {what}, e.g. {sorted(items)[:3]}")

    def result(self) -> dg.AssetCheckResult:
        # Problems block what comes after (ERROR); items only waiting for a retry are a warning (WARN, not blocking).
        return dg.AssetCheckResult(
            passed=self.passed and not self.pending,
            severity=dg.AssetCheckSeverity.ERROR if self.problems else dg.AssetCheckSeverity.WARN,
            metadata={
                "problems": dg.MetadataValue.json(self.problems),
                "pending": dg.MetadataValue.json(self.pending),
                **self.counts,
            },
        )


def _dead(out: ObjectStore, stage: str, shard: str, r: Reconciliation | None = None) -> list[str]:
    table = layout.read_dead_letters(out, stage, shard)
    if r is not None:
        r.expect_final(stage, table)
    return table["item_id"].to_pylist()


def reconcile_index(out: ObjectStore, shard: str) -> Reconciliation:
    r = Reconciliation()
    index = layout.read_index(out, shard)
    r.expect_unique("media ids", index["media_id"].to_pylist())
    # A uri may be indexed once per version (a replaced object); the same version twice is a duplicate.
    versions = pc.fill_null(index["version"], "").to_pylist()
    r.expect_unique("uri versions", [f"{u} @ {v}" for u, v in zip(index["uri"].to_pylist(), versions, strict=True)])
    r.counts["media"] = index.num_rows
    r.counts["retired"] = len(layout.retired_media(index))
    return r


def _index_as_seen(out: ObjectStore, shard: str, seen_parts: list[str] | None) -> tuple[pa.Table, set[str]]:
    """The index now, and the ids of rows in parts added after a step read it (``seen_parts``; None: no record, so
    none are late)."""
    parts = layout.index_part_keys(out, shard)
    index = layout.read_index(out, shard, parts)
    if seen_parts is None:
        return index, set()
    late_parts = sorted(set(parts) - set(seen_parts))
    return index, set(layout.read_index(out, shard, late_parts)["media_id"].to_pylist()) if late_parts else set()


def reconcile_audio(out: ObjectStore, shard: str) -> Reconciliation:
    r = Reconciliation()
    # Rows a sensor indexed while the step ran are the next run's work (pending_work and media_arrivals ask for it).
    index, late = _index_as_seen(out, shard, layout.read_index_seen(out, layout.audio_index_seen_key(shard)))
    audio = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    decoded = audio.filter(pc.equal(audio["status"], "decoded"))["media_id"].to_pylist()
    dead = _dead(out, "audio_wav", shard, r)
    r.expect_unique("audio manifest rows", audio["media_id"].to_pylist())
    r.expect_unique("dead letters", dead)
    superseded = audio.filter(pc.equal(audio["status"], "superseded"))["media_id"].to_pylist()
    r.expect_partition(
        "media",
        set(index["media_id"].to_pylist()),
        {"decoded": set(decoded), "dead_letter": set(dead), "superseded": set(superseded)},
        late,
    )
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
        {"segmented": set(media["media_id"].to_pylist()), "dead_letter": set(_dead(out, "vad_segments", shard, r))},
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
            "dead_letter": set(_dead(out, "segment_features", shard, r)),
        },
    )
    return r


def reconcile_transcripts(out: ObjectStore, shard: str) -> Reconciliation:
    r = Reconciliation()
    features = read_table(out, layout.features_key(shard), FEATURE_SCHEMA)
    table = read_transcripts(out, shard)
    labelled = table["segment_id"].to_pylist()
    r.expect_unique("transcripts", labelled)
    # Known copies (duplicates, evaluation-set matches) are an outcome of their own: never given to the teacher.
    skipped = pc.starts_with(table["finish_reason"], dedup.SKIPPED_FINISH)
    r.expect_partition(
        "featured segments",
        set(features["segment_id"].to_pylist()),
        {
            "transcribed": set(table.filter(pc.invert(skipped))["segment_id"].to_pylist()),
            "skipped_duplicate": set(table.filter(skipped)["segment_id"].to_pylist()),
            "dead_letter": set(_dead(out, "transcripts", shard, r)),
        },
    )
    return r


def reconcile_distilled(out: ObjectStore, shard: str) -> Reconciliation:
    r = Reconciliation()
    labelled = set(read_transcripts(out, shard)["segment_id"].to_pylist())
    # The current build is checked: its decisions, tars and per-file transcripts, and the manifest users read.
    current = layout.read_current(out, shard)
    if current is None:
        r.problems.append(f"{layout.distilled_current_key(shard)} is missing: no dataset build was committed")
        return r
    build = current["build_id"]
    decisions = read_table(out, layout.decisions_key(shard, build), DECISION_SCHEMA)
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
    manifest_key = layout.distilled_manifest_key(shard)
    if not out.exists(manifest_key) or hashlib.sha256(out.read_bytes(manifest_key)).hexdigest() != current.get(
        "manifest_sha256"
    ):
        r.problems.append(f"{manifest_key} is not the manifest of the current build {build}")
    manifest = read_table(out, manifest_key, MANIFEST_SCHEMA)
    keys = manifest["key"].to_pylist()
    r.expect_unique("dataset keys", keys)
    r.counts["manifest_rows"] = manifest.num_rows
    kept_ids = set(kept["segment_id"].to_pylist())
    r.expect_none("kept segments missing from the manifest", kept_ids - set(keys))
    r.expect_none("manifest rows for segments that are not kept", set(keys) - kept_ids)
    _reconcile_tars(r, out, shard, build, manifest)
    _reconcile_files(r, out, shard, build, set(keys), dropped)
    return r


# Fields of a sample's .json that must equal its manifest row (strings: compared exactly).
_SAMPLE_FIELDS = ("key", "text", "media_id")


def _reconcile_tars(r: Reconciliation, out: ObjectStore, shard: str, build: str, manifest: pa.Table) -> None:
    """Every manifest row is a ``.flac`` + ``.json`` pair in a tar of the build, the .json agrees with the row, and
    the build's tars hold nothing else. Reads tar headers and the small .json members only, never the audio."""
    folder = f"{layout.distilled_builds_prefix(shard)}{build}/"
    sizes = {i.key: i.size for i in out.list(folder) if i.key.endswith(".tar")}
    rows_by_tar: dict[str, list[dict]] = {}
    for row in manifest.select(["tar_key", *_SAMPLE_FIELDS]).to_pylist():
        rows_by_tar.setdefault(row["tar_key"], []).append(row)
    r.counts["tars"] = len(sizes)
    r.expect_none("tars not named by the manifest", set(sizes) - set(rows_by_tar))
    for tar_key, rows in sorted(rows_by_tar.items()):
        keys = sorted(row["key"] for row in rows)
        if tar_key not in sizes:
            r.problems.append(f"{tar_key}: missing, yet named by {len(rows)} manifest rows, e.g. {keys[:3]}")
            continue
        reader = _ChunkedReader(out, tar_key, sizes[tar_key])
        try:
            members = _tar_members(reader, sizes[tar_key])
        except tarfile.TarError as exc:
            r.problems.append(f"{tar_key}: unreadable ({exc}); it holds {len(rows)} manifest rows, e.g. {keys[:3]}")
            continue
        r.expect_none(
            f"duplicate members in {tar_key}", {n for n, c in Counter(m[0] for m in members).items() if c > 1}
        )
        where = {name: (start, size) for name, start, size in members}
        for ext in ("flac", "json"):
            r.expect_none(
                f"manifest rows without a .{ext} member in {tar_key}", {k for k in keys if f"{k}.{ext}" not in where}
            )
        expected = {f"{k}.{ext}" for k in keys for ext in ("flac", "json")}
        r.expect_none(f"members of {tar_key} not in the manifest", set(where) - expected)
        r.expect_none(
            f"empty .flac members in {tar_key}",
            {n for n, (_, size) in where.items() if n.endswith(".flac") and not size},
        )
        disagree = []
        for row in rows:
            if f"{row['key']}.json" not in where:
                continue
            start, size = where[f"{row['key']}.json"]
            try:
                sample = json.loads(reader.read(start, size))
            except ValueError as exc:
                disagree.append(f"{row['key']}.json: not JSON ({exc})")
                continue
            disagree += [
                f"{row['key']}.json: {name} {sample.get(name)!r} != manifest {row[name]!r}"
                for name in _SAMPLE_FIELDS
                if sample.get(name) != row[name]
            ]
        r.expect_none(f"samples in {tar_key} whose .json disagrees with the manifest", disagree)


class _ChunkedReader:
    """Reads an object through aligned 8 MiB range reads, keeping the last chunk: walking a tar's headers costs one
    request per 8 MiB (about 32 for a 256 MB tar on OSS), not one per member."""

    CHUNK = 8 << 20

    def __init__(self, out: ObjectStore, key: str, size: int) -> None:
        self._out, self._key, self._size = out, key, size
        self._start, self._data = -1, b""

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        while length > 0:
            first = offset - offset % self.CHUNK
            if first != self._start:
                self._start = first
                self._data = self._out.read_range(self._key, first, min(first + self.CHUNK, self._size))
            piece = self._data[offset - first : offset - first + length]
            if not piece:
                break
            parts.append(piece)
            offset += len(piece)
            length -= len(piece)
        return b"".join(parts)


def _tar_members(reader: _ChunkedReader, size: int) -> list[tuple[str, int, int]]:
    """(name, data offset, data size) of every member, from the headers alone.

    Our tars are plain USTAR (``distill_shard`` writes them so): a header block, the data padded to whole blocks, and
    zero blocks at the end. Raises ``tarfile.TarError`` saying where a corrupt or truncated tar stops making sense.
    """
    block = tarfile.BLOCKSIZE
    members = []
    offset = 0
    while offset + block <= size:
        header = reader.read(offset, block)
        if header == tarfile.NUL * block:
            return members
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise tarfile.TarError(f"bad header at byte {offset}: {exc}") from exc
        start = offset + block
        if start + info.size > size:
            raise tarfile.TarError(f"member {info.name} needs {start + info.size} bytes, the tar has {size}: truncated")
        members.append((info.name, start, info.size))
        offset = start + -(-info.size // block) * block
    raise tarfile.TarError(f"no end-of-archive blocks after byte {offset} of {size}: truncated")


def _reconcile_files(
    r: Reconciliation, out: ObjectStore, shard: str, build: str, dataset_keys: set[str], dropped: pa.Table
) -> None:
    """files.jsonl gives every indexed file exactly one outcome, the one the stage tables and dead letters imply, and
    every segment the status the manifest, the decisions and the dead letters imply (see ``_file_records``)."""
    files_key = layout.files_key(shard, build)
    if not out.exists(files_key):
        r.problems.append(f"{files_key} is missing")
        return
    records = [json.loads(line) for line in out.read_bytes(files_key).decode().splitlines()]
    # files.jsonl covers the index as the build read it; rows indexed since are the next build's.
    seen = layout.read_index_seen(out, layout.build_info_key(shard, build))
    index = layout.read_index(out, shard, seen)
    if seen is not None:
        r.counts["index_parts_since"] = len(set(layout.index_part_keys(out, shard)) - set(seen))
    by_outcome: dict[str, set[str]] = {}
    for rec in records:
        by_outcome.setdefault(f"files_{rec['outcome']}", set()).add(rec["media_id"])
    r.expect_partition("indexed files (files.jsonl)", set(index["media_id"].to_pylist()), by_outcome)

    retired = layout.retired_media(index)
    media_failed = _first_dead_letter(out, shard, ("audio_wav", "vad_segments"))
    segment_failed = _first_dead_letter(out, shard, ("segment_features", "transcripts"))
    vad_done = set(read_table(out, layout.vad_media_key(shard), VAD_MEDIA_SCHEMA)["media_id"].to_pylist())
    segments = read_table(out, layout.segments_key(shard), SEGMENT_SCHEMA)
    per_media: dict[str, list[str]] = {}
    for s in segments.sort_by([("media_id", "ascending"), ("index", "ascending")]).to_pylist():
        per_media.setdefault(s["media_id"], []).append(s["segment_id"])
    drop_reasons = dict(zip(dropped["segment_id"].to_pylist(), dropped["drop_reason"].to_pylist(), strict=True))

    wrong_outcome, wrong_status, listed = [], [], set()
    for rec in records:
        media_id, seg_ids = rec["media_id"], per_media.get(rec["media_id"], [])
        stage = media_failed.get(media_id)
        if stage is None and seg_ids and all(s in segment_failed for s in seg_ids):
            stage = segment_failed[seg_ids[0]]
        if media_id in retired:
            outcome, stage = "superseded", None
        elif stage is not None:
            outcome = "failed"
        elif media_id not in vad_done:
            outcome = "pending"
        else:
            outcome = "transcribed" if seg_ids else "no_speech"
        recorded_stage = (rec.get("failure") or {}).get("stage")
        if rec["outcome"] != outcome or recorded_stage != stage:
            wrong_outcome.append(
                f"{media_id}: files.jsonl says {rec['outcome']} (stage {recorded_stage}), "
                f"the stage tables say {outcome} (stage {stage})"
            )
        for seg in rec["segments"]:
            sid = seg["segment_id"]
            listed.add(sid)
            if sid in dataset_keys:
                status = "kept"
            elif sid in drop_reasons:
                status = f"dropped:{drop_reasons[sid]}"
            elif sid in segment_failed:
                status = f"failed:{segment_failed[sid]}"
            else:
                status = "pending"
            if seg["status"] != status:
                wrong_status.append(f"{sid}: files.jsonl says {seg['status']}, expected {status}")
    r.expect_none("files whose files.jsonl outcome disagrees with the stage tables", wrong_outcome)
    r.expect_none(
        "segments whose files.jsonl status disagrees with the manifest, decisions or dead letters", wrong_status
    )
    r.expect_none("segments missing from files.jsonl", set(segments["segment_id"].to_pylist()) - listed)


def _first_dead_letter(out: ObjectStore, shard: str, stages: tuple[str, ...]) -> dict[str, str]:
    """Item id -> the earliest of ``stages`` that dead-lettered it."""
    first: dict[str, str] = {}
    for stage in stages:
        for item_id in _dead(out, stage, shard):
            first.setdefault(item_id, stage)
    return first


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


index_ids_unique = _check(
    media_index, "ids_unique", reconcile_index, "No media id, nor a uri at one version, appears twice."
)
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
    distilled_dataset,
    "counts_reconcile",
    reconcile_distilled,
    "In the current build: every transcript is kept or dropped with a reason; every kept segment is in the manifest "
    "(the current build's) once and in its tar as a .flac + .json that agrees with it, and nothing else is; "
    "files.jsonl gives every file and segment the outcome the stage tables and dead letters imply.",
)
