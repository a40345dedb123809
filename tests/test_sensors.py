"""The arrival sensor, the full rescan and the pending-work sensor, evaluated as the daemon does
(build_sensor_context)."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asr_assets import layout, sensors
from asr_assets.definitions import defs
from asr_assets.records import AUDIO_SCHEMA, MEDIA_SCHEMA
from asr_assets.sample_corpus import Corpus
from asr_assets.stages import index_objects
from partitions import NUM_SHARDS, shard_key, shard_of
from resources.storage import LocalStore, StorageResource, write_table


@pytest.fixture
def source(corpus: Corpus, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(corpus.media_dir, src)
    return src


def _storage(src: Path, tmp_path: Path) -> StorageResource:
    return StorageResource(source_uri=str(src), output_root=str(tmp_path / "out"))


def _tick(src: Path, tmp_path: Path, cursor: str | None):
    context = dg.build_sensor_context(
        instance=dg.DagsterInstance.ephemeral(),
        cursor=cursor,
        resources={"storage": _storage(src, tmp_path)},
        definitions=defs,
    )
    result = defs.resolve_sensor_def("media_arrivals")(context)
    return result, context.cursor


def _indexed(tmp_path: Path) -> set[str]:
    return {
        row["key"]
        for path in (tmp_path / "out" / "index").glob("*/*.parquet")
        for row in pq.read_table(path).to_pylist()
    }


def _shards_of(src: Path, keys: list[str]) -> list[str]:
    store = LocalStore(src)
    return sorted({shard_of(store.uri_of(k), NUM_SHARDS) for k in keys})


def test_ticks_index_new_objects_once_and_the_cursor_survives_a_restart(source: Path, tmp_path: Path) -> None:
    every = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    requests, cursor = _tick(source, tmp_path, None)
    assert _indexed(tmp_path) == set(every)
    assert sorted(r.partition_key for r in requests) == _shards_of(source, every)
    assert json.loads(cursor) == {"after": every[-1]}

    # New arrivals after the cursor (names with spaces and unicode); the cursor string is all that survives a restart.
    new = ["zz new/ünïcödé 名前.wav", "zz new/with space.mp3"]
    for key, sample in zip(new, ["en_000_wav.wav", "en_001_mp3.mp3"], strict=True):
        (source / key).parent.mkdir(exist_ok=True)
        shutil.copy(source / sample, source / key)
    requests, cursor2 = _tick(source, tmp_path, cursor)
    assert _indexed(tmp_path) == set(every) | set(new)
    assert sorted(r.partition_key for r in requests) == _shards_of(source, new)
    last = max(new)  # "zz new/ünïcödé 名前.wav": keys sort by code point, as OSS sorts by UTF-8 bytes
    assert all(r.run_key.startswith(f"arrivals:{last}:") for r in requests)
    assert json.loads(cursor2) == {"after": last}

    repeated, cursor3 = _tick(source, tmp_path, cursor2)
    assert isinstance(repeated, dg.SkipReason) and cursor3 == cursor2


def test_work_per_tick_is_bounded(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sensors, "MAX_OBJECTS_PER_TICK", 4)
    every = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    cursor, ticks = None, 0
    while True:
        result, cursor = _tick(source, tmp_path, cursor)
        if isinstance(result, dg.SkipReason) and "nothing after" in str(result.skip_message):
            break
        ticks += 1
        assert len(_indexed(tmp_path)) == min(4 * ticks, len(every))
    assert ticks == -(-len(every) // 4) and _indexed(tmp_path) == set(every)


def test_full_rescan_catches_what_the_cursor_missed(source: Path, tmp_path: Path) -> None:
    _, cursor = _tick(source, tmp_path, None)
    early = "aaa early/arrived late.flac"  # sorts before the cursor: the sensor never sees it
    (source / early).parent.mkdir()
    shutil.copy(next(source.rglob("*.flac")), source / early)
    assert isinstance(_tick(source, tmp_path, cursor)[0], dg.SkipReason)
    context = dg.build_schedule_context(
        instance=dg.DagsterInstance.ephemeral(),
        resources={"storage": _storage(source, tmp_path)},
        scheduled_execution_time=datetime(2026, 11, 27, 3, 0, tzinfo=UTC),
        repository_def=defs.get_repository_def(),
    )
    requests = list(defs.resolve_schedule_def("full_rescan").evaluate_tick(context).run_requests)
    assert early in _indexed(tmp_path)
    assert [r.partition_key for r in requests] == _shards_of(source, [early])
    assert requests[0].run_key.startswith("rescan:2026-11-27T03:00:00+00:00:")
    again = defs.resolve_schedule_def("full_rescan").evaluate_tick(context)
    assert not again.run_requests


def _out(src: Path, tmp_path: Path) -> LocalStore:
    return layout.dataset_output(_storage(src, tmp_path))


def _processed(out: LocalStore, shard: str, media: list[dict]) -> None:
    """Writes an audio_wav outcome for each index row given, as a finished decode would."""
    rows = [{"media_id": r["media_id"], "uri": r["uri"], "status": "decoded", "seconds": 0.0} for r in media]
    write_table(out, layout.audio_manifest_key(shard), pa.Table.from_pylist(rows, schema=AUDIO_SCHEMA))


def test_a_tick_that_died_between_indexing_and_its_requests_still_gets_its_runs(source: Path, tmp_path: Path) -> None:
    every = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    # The dead tick: it indexed its batch, then died before its run requests (and its new cursor) were stored.
    store = LocalStore(source)
    index_objects(store, _out(source, tmp_path), list(store.list()), NUM_SHARDS)
    requests, cursor = _tick(source, tmp_path, None)  # the daemon evaluates the same tick again
    assert sorted(r.partition_key for r in requests) == _shards_of(source, every)
    assert {r.tags["asr/new_objects"] for r in requests} == {"0"}
    assert sum(int(r.tags["asr/pending_objects"]) for r in requests) == len(every)
    # Idempotent: evaluated once more, the same run keys (the daemon launches a run key once).
    again, _ = _tick(source, tmp_path, None)
    assert [r.run_key for r in again] == [r.run_key for r in requests]
    assert all(r.run_key.startswith(f"arrivals:{every[-1]}:") for r in requests)

    # Once the shards' objects have outcomes, the same listing needs no run (a sensor started over a finished dataset).
    out = _out(source, tmp_path)
    for shard in _shards_of(source, every):
        _processed(out, shard, layout.read_index(out, shard).to_pylist())
    skipped, _ = _tick(source, tmp_path, None)
    assert isinstance(skipped, dg.SkipReason)


def _pending_tick(src: Path, tmp_path: Path, instance: dg.DagsterInstance, cursor: str | None = None):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"storage": _storage(src, tmp_path)}, definitions=defs
    )
    return defs.resolve_sensor_def("pending_work")(context), context.cursor


def test_pending_work_counts_items_without_an_outcome_at_each_stage(tmp_path: Path) -> None:
    out, shard = LocalStore(tmp_path / "out"), "shard-00000"
    assert sensors.pending_work(out, shard) == {}
    at = datetime(2026, 1, 1, tzinfo=UTC)
    media = [
        {"media_id": m, "uri": f"file:///{m}", "key": m, "size": 1, "mtime": 0.0, "extension": "", "discovered_at": at}
        for m in ("m1", "m2", "m3", "m4")
    ]
    write_table(out, layout.index_part_key(shard, 0), pa.Table.from_pylist(media, schema=MEDIA_SCHEMA))
    assert sensors.pending_work(out, shard) == {"audio_wav": 4}
    _processed(out, shard, media[:2])  # m1, m2 decoded
    layout.append_dead_letters(out, "audio_wav", shard, [layout.dead_letter("m3", "u", "audio_wav", "X", "x")])
    assert sensors.pending_work(out, shard) == {"audio_wav": 1, "vad_segments": 2}
    write_table(out, layout.vad_media_key(shard), pa.table({"media_id": ["m1"]}))
    layout.append_dead_letters(out, "vad_segments", shard, [layout.dead_letter("m2", "u", "vad_segments", "X", "x")])
    segments = ["m1-00000", "m1-00001", "m1-00002"]
    write_table(out, layout.segments_key(shard), pa.table({"segment_id": segments}))
    write_table(out, layout.features_key(shard), pa.table({"segment_id": segments[:1]}))
    assert sensors.pending_work(out, shard) == {"audio_wav": 1, "segment_features": 2, "transcripts": 1}
    layout.append_dead_letters(
        out, "segment_features", shard, [layout.dead_letter(s, "u", "segment_features", "X", "x") for s in segments[1:]]
    )
    write_table(out, layout.transcript_part_key(shard, 0), pa.table({"segment_id": segments[:1]}))
    layout.append_dead_letters(out, "audio_wav", shard, [layout.dead_letter("m4", "u", "audio_wav", "X", "x")])
    # Every stage has its outcomes; the labels have no dataset build yet.
    assert sensors.pending_work(out, shard) == {"distilled_dataset": 1}
    current = {"build_id": "b1", "fingerprint": "f", "counts": {"transcribed": 1}}
    out.put_bytes(layout.distilled_current_key(shard), json.dumps(current).encode())
    assert sensors.pending_work(out, shard) == {}
    # A retryable dead letter is work to do, not an outcome: a transient kind, or a suspect one with attempts left.
    layout.append_dead_letters(out, "audio_wav", shard, [layout.dead_letter("m4", "u", "audio_wav", "FetchError", "x")])
    assert sensors.pending_work(out, shard) == {"audio_wav": 1}
    layout.append_dead_letters(out, "audio_wav", shard, [layout.dead_letter("m4", "u", "audio_wav", "Timeout", "x", 2)])
    assert sensors.pending_work(out, shard) == {"audio_wav": 1}
    layout.append_dead_letters(out, "audio_wav", shard, [layout.dead_letter("m4", "u", "audio_wav", "Timeout", "x", 3)])
    assert sensors.pending_work(out, shard) == {}


def test_pending_work_requests_a_run_per_idle_shard_and_again_after_a_failed_run(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    every = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    shards = _shards_of(source, every)
    instance = dg.DagsterInstance.ephemeral()
    monkeypatch.setattr(sensors, "now", lambda: 10 * sensors.PENDING_RETRY_S + 1)
    assert isinstance(_pending_tick(source, tmp_path, instance)[0], dg.SkipReason)  # nothing indexed yet
    store = LocalStore(source)
    index_objects(store, _out(source, tmp_path), list(store.list()), NUM_SHARDS)  # and no run ever requested

    requests, _ = _pending_tick(source, tmp_path, instance)
    assert [r.partition_key for r in requests] == shards
    assert sum(int(r.tags["asr/pending_audio_wav"]) for r in requests) == len(every)
    assert all(r.run_key == f"pending:10:{r.partition_key}" for r in requests)

    # A running run of the shard (here one a backfill or the arrival sensor made): no second request.
    busy = shards[0]
    run = instance.add_run(
        dg.DagsterRun(job_name="distill_job", status=dg.DagsterRunStatus.STARTED, tags={"dagster/partition": busy})
    )
    requests, _ = _pending_tick(source, tmp_path, instance)
    assert [r.partition_key for r in requests] == shards[1:]

    # The run fails and leaves the work pending: in the same period the request is the one already made (the daemon
    # launches a run key once); in the next period a new one.
    instance.report_run_failed(run)
    requests, _ = _pending_tick(source, tmp_path, instance)
    assert [r.run_key for r in requests if r.partition_key == busy] == [f"pending:10:{busy}"]
    monkeypatch.setattr(sensors, "now", lambda: 11 * sensors.PENDING_RETRY_S + 1)
    requests, _ = _pending_tick(source, tmp_path, instance)
    assert [r.run_key for r in requests if r.partition_key == busy] == [f"pending:11:{busy}"]

    # Every item has its outcome (here: dead-lettered by audio_wav): nothing to request.
    out = _out(source, tmp_path)
    for shard in shards:
        rows = layout.read_index(out, shard).to_pylist()
        letters = [layout.dead_letter(r["media_id"], r["uri"], "audio_wav", "DecodeError", "x") for r in rows]
        layout.append_dead_letters(out, "audio_wav", shard, letters)
    assert isinstance(_pending_tick(source, tmp_path, instance)[0], dg.SkipReason)


def test_pending_work_reads_a_bounded_number_of_shards_per_tick(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sensors, "PENDING_SHARDS_PER_TICK", 3)
    store = LocalStore(source)
    index_objects(store, _out(source, tmp_path), list(store.list()), NUM_SHARDS)
    instance = dg.DagsterInstance.ephemeral()
    seen, cursor = [], None
    for _ in range(4):
        result, cursor = _pending_tick(source, tmp_path, instance, cursor)
        seen.append(sorted(r.partition_key for r in result) if isinstance(result, list) else [])
    expected = _shards_of(source, [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()])
    window = [shard_key(i % NUM_SHARDS) for i in range(12)]
    for tick, requested in enumerate(seen):
        assert requested == sorted(s for s in set(window[3 * tick : 3 * tick + 3]) if s in expected)
