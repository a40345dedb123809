"""The arrival sensor and the full rescan, evaluated as the daemon does (build_sensor_context)."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from asr_assets import sensors
from asr_assets.definitions import defs
from asr_assets.sample_corpus import Corpus
from partitions import NUM_SHARDS, shard_of
from resources.storage import LocalStore, StorageResource


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
