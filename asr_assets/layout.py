"""Where every output lives under the output root (DESIGN §6), and the dead-letter table shared by all stages."""

from __future__ import annotations

import contextlib
import errno
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asr_assets import lease
from asr_assets.records import DEAD_LETTER_SCHEMA, MEDIA_SCHEMA, DeadLetterRow, to_table
from partitions import MEDIA_ID_SCHEME, NUM_SHARDS
from resources.storage import (
    ObjectStore,
    StorageFull,
    StorageResource,
    is_out_of_space,
    read_table,
    write_table,
)

DATASET_KEY = "dataset.json"
# Stages that dead-letter items, in pipeline order (media_index only for names that cannot be keys).
STAGES = ("media_index", "audio_wav", "vad_segments", "segment_features", "transcripts")


def index_prefix(shard: str) -> str:
    return f"index/{shard}/"


# Part names come from their content, the first item id in the part (no numbering by counting existing files): an item
# enters a shard's parts once, so a name is never reused for other content, and re-runs over the same input name their
# parts alike.
def index_part_key(shard: str, first_media_id: str) -> str:
    return f"index/{shard}/part-{first_media_id}.parquet"


def index_part_keys(store: ObjectStore, shard: str) -> list[str]:
    """The keys of the shard's index parts as they are now (indexing only ever adds parts)."""
    return sorted(info.key for info in store.list(index_prefix(shard)))


def read_index(store: ObjectStore, shard: str, part_keys: list[str] | None = None) -> pa.Table:
    """The shard's index: every part (or the ``part_keys`` given: the index as a step saw it), in the order they were
    appended (parts are named by content, so by the time each row was discovered; a stable sort keeps a part's own
    order)."""
    keys = index_part_keys(store, shard) if part_keys is None else part_keys
    parts = [read_table(store, key, MEDIA_SCHEMA) for key in keys]
    if not parts:
        return MEDIA_SCHEMA.empty_table()
    return pa.concat_tables(parts).sort_by([("discovered_at", "ascending")])


def retired_media(index: pa.Table) -> set[str]:
    """Media ids of index rows whose uri was indexed again later, with another version (the object was replaced):
    for each uri only the newest version is live. Newest by ``discovered_at``, then by position in the index."""
    n = index.num_rows
    if n == 0:
        return set()
    positions = pa.array(np.arange(n))
    order = pa.table({"at": index["discovered_at"], "pos": positions}).sort_by(
        [("at", "descending"), ("pos", "descending")]
    )["pos"]
    uris = index["uri"].take(order)
    # Newest first: a row is live where its uri occurs for the first time.
    live = pc.equal(pc.index_in(uris, value_set=uris), positions)
    return set(index["media_id"].take(order).filter(pc.invert(live)).to_pylist())


def audio_manifest_key(shard: str) -> str:
    return f"audio_wav/{shard}.parquet"


def audio_index_seen_key(shard: str) -> str:
    """The index parts the last successful ``audio_wav`` step worked from (JSON): rows a sensor indexes while the step
    runs are the next run's work, not ones the step lost."""
    return f"audio_wav/{shard}.index-parts.json"


def read_index_seen(store: ObjectStore, key: str) -> list[str] | None:
    """Index part keys recorded under ``key`` (a JSON object with ``index_parts``); None where none were recorded."""
    if not store.exists(key):
        return None
    parts = json.loads(store.read_bytes(key)).get("index_parts")
    return None if parts is None else list(parts)


def audio_key(shard: str, media_id: str) -> str:
    return f"audio_wav/{shard}/{media_id}.flac"


def segments_key(shard: str) -> str:
    return f"vad_segments/{shard}.parquet"


def vad_media_key(shard: str) -> str:
    return f"vad_segments/{shard}.media.parquet"


def features_key(shard: str) -> str:
    return f"segment_features/{shard}.parquet"


def packed_audio_key(shard: str, first_segment_id: str) -> str:
    return f"segment_features/{shard}/part-{first_segment_id}.flac"


def mel_part_key(shard: str, first_segment_id: str) -> str:
    return f"segment_features/{shard}/mel-part-{first_segment_id}.parquet"


def transcripts_prefix(shard: str) -> str:
    return f"transcripts/{shard}/"


def transcript_part_key(shard: str, first_segment_id: str) -> str:
    return f"transcripts/{shard}/part-{first_segment_id}.parquet"


def distilled_builds_prefix(shard: str) -> str:
    """Where every build of the shard's dataset has its own folder (``{prefix}{build_id}/``)."""
    return f"distilled/{shard}/"


def distilled_tar_key(shard: str, build_id: str, n: int) -> str:
    return f"distilled/{shard}/{build_id}/{n:06d}.tar"


def distilled_manifest_key(shard: str) -> str:
    """The manifest users read: a copy of the current build's, written last when a build is committed."""
    return f"distilled/{shard}.parquet"


def distilled_current_key(shard: str) -> str:
    """The pointer to the shard's current build (written with the manifest: together they commit a build)."""
    return f"distilled/{shard}.current.json"


def build_manifest_key(shard: str, build_id: str) -> str:
    return f"distilled/{shard}/{build_id}/manifest.parquet"


def decisions_key(shard: str, build_id: str) -> str:
    return f"distilled/{shard}/{build_id}/decisions.parquet"


def files_key(shard: str, build_id: str) -> str:
    return f"distilled/{shard}/{build_id}/files.jsonl"


def files_parquet_key(shard: str, build_id: str) -> str:
    return f"distilled/{shard}/{build_id}/files.parquet"


def build_info_key(shard: str, build_id: str) -> str:
    return f"distilled/{shard}/{build_id}/build.json"


def changes_key(shard: str, build_id: str) -> str:
    """Samples added and removed (with why) from the build this one replaced."""
    return f"distilled/{shard}/{build_id}/changes.parquet"


def changes_summary_key(shard: str, build_id: str) -> str:
    return f"distilled/{shard}/{build_id}/changes.json"


def read_current(store: ObjectStore, shard: str) -> dict | None:
    """The shard's current-build pointer (``build_id``, ``created_at``, ``previous``, ``counts``...); None before the
    first build is committed."""
    key = distilled_current_key(shard)
    return json.loads(store.read_bytes(key)) if store.exists(key) else None


def current_build(store: ObjectStore, shard: str) -> str | None:
    """The id of the shard's current dataset build (None before the first one is committed)."""
    current = read_current(store, shard)
    return current["build_id"] if current else None


def dead_letter_key(stage: str, shard: str) -> str:
    return f"dead_letter/{stage}/{shard}.parquet"


def read_dead_letters(store: ObjectStore, stage: str, shard: str) -> pa.Table:
    """The stage's dead-letter table for a shard (empty when none)."""
    return read_table(store, dead_letter_key(stage, shard), DEAD_LETTER_SCHEMA)


def append_dead_letters(store: ObjectStore, stage: str, shard: str, rows: Sequence[DeadLetterRow]) -> None:
    """Adds failures to the stage's dead-letter table (one row per item: a retried item replaces its old row)."""
    if not rows:
        return
    old = read_dead_letters(store, stage, shard)
    new_ids = pa.array([r.item_id for r in rows])
    kept = old.filter(pc.invert(pc.is_in(old["item_id"], value_set=new_ids)))
    write_table(store, dead_letter_key(stage, shard), pa.concat_tables([kept, to_table(rows, DEAD_LETTER_SCHEMA)]))


def remove_dead_letters(store: ObjectStore, stage: str, shard: str, item_ids: set[str]) -> None:
    """Drops the dead-letter rows of items retried with success. Called after their results are written: a crash in
    between leaves a stale row beside a result, which the stage's next run removes (results win)."""
    if not item_ids:
        return  # the common case (nothing was retried): no read
    old = read_dead_letters(store, stage, shard)
    gone = pc.is_in(old["item_id"], value_set=pa.array(sorted(item_ids), pa.string()))
    if not pc.any(gone).as_py():
        return
    write_table(store, dead_letter_key(stage, shard), old.filter(pc.invert(gone)))


def dead_letter(item_id: str, uri: str, stage: str, error_class: str, message: str, attempt: int = 1) -> DeadLetterRow:
    """A dead-letter row stamped now."""
    return DeadLetterRow(item_id, uri, stage, error_class, message, attempt, datetime.now(UTC))


# Top-level output folder of each asset (for sweeping a killed step's unfinished writes).
FOLDERS = {
    "media_index": "index",
    "audio_wav": "audio_wav",
    "vad_segments": "vad_segments",
    "segment_features": "segment_features",
    "transcripts": "transcripts",
    "distilled_dataset": "distilled",
}


@contextlib.contextmanager
def step_output(storage: StorageResource, asset: str, shard: str, run_id: str = "") -> Iterator[ObjectStore]:
    """The output store for one asset's step on one shard, written by this step alone.

    The step holds the lease of (shard, asset) while it runs (``asr_assets.lease``; a second writer fails fast or
    waits, per ``ASR_LEASE_WAIT_S``), and every write through the store it gets first checks that it still does.
    Before the step: unfinished writes and scratch folders a killed earlier step left are removed (they were never
    visible to readers: hidden names). During the step: a write that fails because the disk is full fails the step
    with a message that says so (libsndfile, for one, reports only "System error"), instead of dead-lettering items.
    After it: its scratch folder is removed.

    Args:
        storage: the storage resource.
        asset: the asset's name.
        shard: the partition key.
        run_id: the Dagster run, named to a second writer that finds the lease held.
    """
    out = dataset_output(storage)
    held = lease.take(out, shard, asset, run_id)
    try:
        # Under the lease: a run that is about to be refused must not touch what the holder is writing.
        top = FOLDERS[asset]
        for folder in (top, f"{top}/{shard}", "dead_letter/" + asset):
            out.sweep_stale_temp(folder)
        out.sweep_stale_scratch()
    except BaseException:
        held.release()
        raise
    try:
        yield lease.GuardedStore(out, held.check)
    except StorageFull as exc:
        raise StorageFull(errno.ENOSPC, f"{asset} on {shard}: {exc.strerror or exc}") from exc
    except Exception as exc:
        if is_out_of_space(exc, out.scratch_dir()):
            raise StorageFull(
                errno.ENOSPC,
                f"{asset} on {shard}: no space left on the device of {out.scratch_dir()} "
                f"({type(exc).__name__}: {exc}); nothing half-written was published. Free space and re-run the "
                "partition",
            ) from exc
        raise
    finally:
        out.discard_scratch()
        held.release()


def dataset_output(storage: StorageResource) -> ObjectStore:
    """The output store, refusing a shard count other than the one the output root was built with."""
    out = storage.output()
    check_dataset(out, NUM_SHARDS)
    return out


def check_dataset(store: ObjectStore, num_shards: int) -> None:
    """Records the shard count and the media id scheme on first use and refuses different ones later (another count
    would move media between shards; ids of another scheme would make every object look new)."""
    if store.exists(DATASET_KEY):
        dataset = json.loads(store.read_bytes(DATASET_KEY))
        recorded = dataset["num_shards"]
        if recorded != num_shards:
            raise ValueError(
                f"ASR_NUM_SHARDS={num_shards} but the output root {store.root_uri} was built with {recorded} shards; "
                f"set ASR_NUM_SHARDS={recorded} or use a new ASR_OUTPUT_ROOT"
            )
        scheme = dataset.get("media_id_scheme")
        if scheme != MEDIA_ID_SCHEME:
            built = scheme or "64-bit media ids (blake2b of the uri alone)"
            raise ValueError(
                f"the output root {store.root_uri} was built with {built}; this version names media by "
                f"{MEDIA_ID_SCHEME} (128-bit ids that change when an object is replaced), and the two cannot be mixed "
                "in one index. Set ASR_OUTPUT_ROOT to a new folder (or bucket prefix) and run the pipeline there"
            )
        return
    store.put_bytes(DATASET_KEY, json.dumps({"num_shards": num_shards, "media_id_scheme": MEDIA_ID_SCHEME}).encode())
