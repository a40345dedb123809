"""New data arriving in the source: a sensor that follows it with a cursor, a periodic full rescan, and a sensor that
finds shards holding work nobody is doing.

The first two append new objects to their shards' index and request a run of the per-shard job for each shard that
gained objects. Shards are static and every asset is incremental, so such a run processes only the new items. The
third (``pending_work``) makes sure nothing is stranded: work whose run was never requested (a tick that died between
indexing and requesting), failed or was cancelled gets another run.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from itertools import islice

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from asr_assets import dedup, failures, layout
from asr_assets.records import AUDIO_SCHEMA, FEATURE_SCHEMA, SEGMENT_SCHEMA, VAD_MEDIA_SCHEMA
from asr_assets.stages import index_objects, read_transcripts
from partitions import NUM_SHARDS, media_id, shard_key, shard_of
from resources.storage import ObjectInfo, ObjectStore, StorageResource, read_table

# Objects indexed per sensor tick at most: bounded work (and memory) per tick; the next tick carries on.
MAX_OBJECTS_PER_TICK = int(os.environ.get("ASR_SENSOR_MAX_OBJECTS", "20000"))
# How often the daemon evaluates the sensor (a listing of the watched prefix from the cursor).
INTERVAL_S = int(os.environ.get("ASR_SENSOR_INTERVAL_S", "60"))
# How often pending_work looks for shards with work and no run.
PENDING_INTERVAL_S = int(os.environ.get("ASR_PENDING_INTERVAL_S", "600"))
# A shard gets at most one pending_work run per this many seconds (a run that failed is retried in the next period).
PENDING_RETRY_S = int(os.environ.get("ASR_PENDING_RETRY_S", "3600"))
# Shards pending_work reads per tick at most (it reads a few tables per shard); the cursor carries on from there.
PENDING_SHARDS_PER_TICK = int(os.environ.get("ASR_PENDING_SHARDS_PER_TICK", "2000"))

# A run in one of these states will (still) work on its shard: pending_work does not request another.
ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def _run_requests(shards: dict[str, dict[str, int]], run_key: str) -> list[dg.RunRequest]:
    """One request per shard, with its counts as tags (``asr/{name}``)."""
    return [
        dg.RunRequest(
            partition_key=shard,
            run_key=f"{run_key}:{shard}",
            tags={f"asr/{name}": str(count) for name, count in counts.items()},
        )
        for shard, counts in sorted(shards.items())
    ]


def _listed_shards(source: ObjectStore, batch: list[ObjectInfo]) -> dict[str, set[str]]:
    """The media ids of a batch of listed objects, by shard (the index's own uri, shard and id)."""
    prefix = source.root_uri.rstrip("/") + "/"
    by_shard: dict[str, set[str]] = {}
    for info in batch:
        uri = prefix + info.key
        by_shard.setdefault(shard_of(uri, NUM_SHARDS), set()).add(media_id(uri, info.version))
    return by_shard


def _final_dead(out: ObjectStore, stage: str, shard: str) -> pa.Array:
    """The ids of a stage's dead letters that are final: a transient one, or a suspect one with attempts left, is
    still work to do (its item is retried by the next run), not an outcome."""
    return pa.array(sorted(failures.final_ids(layout.read_dead_letters(out, stage, shard))), pa.string())


def _without_outcome(out: ObjectStore, shard: str, ids: set[str]) -> int:
    """How many of ``ids`` have no outcome yet: neither an ``audio_wav`` row or dead letter, nor a ``media_index``
    dead letter (an entry that could not be indexed)."""
    done = pa.concat_arrays(
        [
            read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)["media_id"].combine_chunks(),
            _final_dead(out, "audio_wav", shard),
            _final_dead(out, "media_index", shard),
        ]
    )
    given = pa.array(sorted(ids), pa.string())
    return len(ids) - pc.sum(pc.is_in(given, value_set=done)).as_py()


def arrivals_sensor(job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    """The sensor for ``job`` (the per-shard job)."""

    @dg.sensor(
        name="media_arrivals",
        job=job,
        minimum_interval_seconds=INTERVAL_S,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Indexes objects that sort after the cursor (the last key seen) and runs the shards that gained "
        "any, or whose listed objects are indexed but not processed yet. Objects whose key sorts before the cursor "
        "are caught by the full_rescan schedule.",
    )
    def media_arrivals(context: dg.SensorEvaluationContext, storage: StorageResource):
        source, out = storage.source(), layout.dataset_output(storage)
        after = json.loads(context.cursor)["after"] if context.cursor else ""
        batch = list(islice(source.list(start_after=after), MAX_OBJECTS_PER_TICK))
        if not batch:
            return dg.SkipReason(f"nothing after {after!r} in {source.root_uri}")
        added = index_objects(source, out, batch, NUM_SHARDS)
        # Not only the shards that gained rows: a tick that died after indexing and before its run requests existed
        # is evaluated again from the same cursor, finds the objects indexed, and must still request their runs.
        # Objects already processed need no run (a sensor started over an existing dataset requests nothing).
        shards = {}
        for shard, ids in _listed_shards(source, batch).items():
            pending = added.get(shard, 0) or _without_outcome(out, shard, ids)
            if pending:
                shards[shard] = {"new_objects": added.get(shard, 0), "pending_objects": pending}
        cursor = batch[-1].key
        context.update_cursor(json.dumps({"after": cursor}))
        context.log.info(f"indexed {sum(added.values())} new objects of {len(batch)} listed; cursor now {cursor!r}")
        # The run key makes a re-evaluated tick idempotent: the same batch never launches the same runs twice.
        return _run_requests(shards, f"arrivals:{cursor}") or dg.SkipReason(f"{len(batch)} listed, none new")

    return media_arrivals


def rescan_schedule(job: dg.UnresolvedAssetJobDefinition) -> dg.ScheduleDefinition:
    """The daily full rescan for ``job``."""

    @dg.schedule(
        name="full_rescan",
        job=job,
        cron_schedule="0 3 * * *",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Lists the whole source once a day and indexes what the sensor's cursor missed (keys sorting "
        "before it, objects replaced in place under a new name).",
    )
    def full_rescan(context: dg.ScheduleEvaluationContext, storage: StorageResource):
        source, out = storage.source(), layout.dataset_output(storage)
        added = index_objects(source, out, source.list(), NUM_SHARDS)
        # The tick's time makes its run keys unique per tick and stable if the same tick is evaluated again.
        stamp = context.scheduled_execution_time.isoformat()
        shards = {shard: {"new_objects": count} for shard, count in added.items() if count}
        return _run_requests(shards, f"rescan:{stamp}") or dg.SkipReason("the index already has every object")

    return full_rescan


def pending_work(out: ObjectStore, shard: str, dedup_state: dict | None = None) -> Counter:
    """Items of a shard that have no outcome yet at the stage that takes them next, by stage (zero counts left out):

    - ``audio_wav``: index rows without an audio row or dead letter;
    - ``vad_segments``: decoded media without a VAD row or dead letter;
    - ``segment_features``: segments without features or dead letter;
    - ``transcripts``: featured segments without a transcript or dead letter;
    - ``distilled_dataset``: 1 when transcripts exist but no dataset build, or the current build was made from another
      number of transcripts (a step that died after the labels and before the dataset), or before the dedup index
      last changed the shard's outcomes (``dedup.outcomes_revision``).

    A dead letter is an outcome only when it is final (``failures.is_final``): a transient one, or a suspect one with
    attempts left, counts as work to do. Reads only id columns of the stage tables.
    """

    def ids(table: pa.Table, column: str) -> pa.Array:
        return table[column].combine_chunks()

    def missing(items: pa.Array, *outcomes: pa.Array) -> int:
        if not len(items):
            return 0
        done = pa.concat_arrays(list(outcomes))
        return len(items) - pc.sum(pc.is_in(items, value_set=done)).as_py()

    def dead(stage: str) -> pa.Array:
        return _final_dead(out, stage, shard)

    counts: Counter = Counter()
    index = ids(layout.read_index(out, shard), "media_id")
    if not len(index):
        return counts
    audio = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    counts["audio_wav"] = missing(index, ids(audio, "media_id"), dead("audio_wav"))
    decoded = ids(audio.filter(pc.equal(audio["status"], "decoded")), "media_id")
    vad = read_table(out, layout.vad_media_key(shard), VAD_MEDIA_SCHEMA)
    counts["vad_segments"] = missing(decoded, ids(vad, "media_id"), dead("vad_segments"))
    segments = ids(read_table(out, layout.segments_key(shard), SEGMENT_SCHEMA), "segment_id")
    featured = ids(read_table(out, layout.features_key(shard), FEATURE_SCHEMA), "segment_id")
    counts["segment_features"] = missing(segments, featured, dead("segment_features"))
    labelled = ids(read_transcripts(out, shard), "segment_id")
    counts["transcripts"] = missing(featured, labelled, dead("transcripts"))
    current = layout.read_current(out, shard)
    built = current["counts"].get("transcribed") if current else None
    # Or the dedup index changed the shard's outcomes (a copy found, an evaluation file registered or removed) after
    # the current build read them.
    stale = dedup.dataset_is_stale(current, shard, dedup_state if dedup_state is not None else dedup.read_state(out))
    counts["distilled_dataset"] = int(len(labelled) > 0 and (built != len(labelled) or stale))
    return +counts


def _active_runs(instance: dg.DagsterInstance):
    """Whether a shard has a queued or running run (any job: a backfill of the assets counts too, also a run over a
    range of shards, which carries range tags instead of ``dagster/partition``), from one read of the active runs."""
    single, ranges = set(), []
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=ACTIVE_RUN_STATUSES), limit=10_000):
        tags = record.dagster_run.tags
        if "dagster/partition" in tags:
            single.add(tags["dagster/partition"])
        first, last = tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")
        if first and last:
            ranges.append((first, last))

    def active(shard: str) -> bool:
        # Shard keys are zero-padded: string order is shard order.
        return shard in single or any(first <= shard <= last for first, last in ranges)

    return active


def pending_work_sensor(job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    """The sensor that requests ``job`` runs for shards holding work without an outcome and no run."""

    @dg.sensor(
        name="pending_work",
        job=job,
        minimum_interval_seconds=PENDING_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Finds shards holding items without an outcome at some stage (indexed but not decoded, decoded "
        "but not segmented, segments without features, featured segments without a transcript) and no queued or "
        "running run, and requests a run for each: nothing stays stranded after a lost request, a failed or a "
        f"cancelled run. At most one request per shard every {PENDING_RETRY_S} s (ASR_PENDING_RETRY_S).",
    )
    def pending_work_tick(context: dg.SensorEvaluationContext, storage: StorageResource):
        out = layout.dataset_output(storage)
        start = json.loads(context.cursor)["next"] % NUM_SHARDS if context.cursor else 0
        count = min(PENDING_SHARDS_PER_TICK, NUM_SHARDS)
        shards = [shard_key((start + i) % NUM_SHARDS) for i in range(count)]
        context.update_cursor(json.dumps({"next": (start + count) % NUM_SHARDS}))
        # The period in the run key: a shard whose run failed is requested again in the next period, not before.
        period = int(now() // PENDING_RETRY_S)
        wanted, busy = {}, []
        active = _active_runs(context.instance)
        dedup_state = dedup.read_state(out)  # once a tick, not once a shard
        for shard in shards:
            pending = pending_work(out, shard, dedup_state)
            if not pending:
                continue
            if active(shard):
                busy.append(shard)
                continue
            wanted[shard] = {f"pending_{stage}": n for stage, n in pending.items()}
        if busy:
            context.log.info(f"{len(busy)} shards with pending work already have a run: {busy[:5]}")
        return _run_requests(wanted, f"pending:{period}") or dg.SkipReason(
            f"{len(shards)} shards read: {len(busy)} with pending work and a run, none without"
        )

    return pending_work_tick


def now() -> float:
    """Seconds since the epoch (a function, so tests can move time)."""
    return time.time()
