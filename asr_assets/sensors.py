"""New data arriving in the source: a sensor that follows it with a cursor, and a periodic full rescan.

Both append new objects to their shards' index and request a run of the per-shard job for each shard that gained
objects. Shards are static and every asset is incremental, so such a run processes only the new items.
"""

from __future__ import annotations

import json
import os
from itertools import islice

import dagster as dg

from asr_assets import layout
from asr_assets.stages import index_objects
from partitions import NUM_SHARDS
from resources.storage import StorageResource

# Objects indexed per sensor tick at most: bounded work (and memory) per tick; the next tick carries on.
MAX_OBJECTS_PER_TICK = int(os.environ.get("ASR_SENSOR_MAX_OBJECTS", "20000"))
# How often the daemon evaluates the sensor (a listing of the watched prefix from the cursor).
INTERVAL_S = int(os.environ.get("ASR_SENSOR_INTERVAL_S", "60"))


def _run_requests(added: dict[str, int], run_key: str) -> list[dg.RunRequest]:
    return [
        dg.RunRequest(partition_key=shard, run_key=f"{run_key}:{shard}", tags={"asr/new_objects": str(count)})
        for shard, count in sorted(added.items())
        if count
    ]


def arrivals_sensor(job: dg.UnresolvedAssetJobDefinition) -> dg.SensorDefinition:
    """The sensor for ``job`` (the per-shard job)."""

    @dg.sensor(
        name="media_arrivals",
        job=job,
        minimum_interval_seconds=INTERVAL_S,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Indexes objects that sort after the cursor (the last key seen) and runs the shards that gained "
        "any. Objects whose key sorts before the cursor are caught by the full_rescan schedule.",
    )
    def media_arrivals(context: dg.SensorEvaluationContext, storage: StorageResource):
        source, out = storage.source(), layout.dataset_output(storage)
        after = json.loads(context.cursor)["after"] if context.cursor else ""
        batch = list(islice(source.list(start_after=after), MAX_OBJECTS_PER_TICK))
        if not batch:
            return dg.SkipReason(f"nothing after {after!r} in {source.root_uri}")
        added = index_objects(source, out, batch, NUM_SHARDS)
        cursor = batch[-1].key
        context.update_cursor(json.dumps({"after": cursor}))
        context.log.info(f"indexed {sum(added.values())} new objects of {len(batch)} listed; cursor now {cursor!r}")
        # The run key makes a re-evaluated tick idempotent: the same batch never launches the same runs twice.
        return _run_requests(added, f"arrivals:{cursor}") or dg.SkipReason(f"{len(batch)} listed, none new")

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
        return _run_requests(added, f"rescan:{stamp}") or dg.SkipReason("the index already has every object")

    return full_rescan
