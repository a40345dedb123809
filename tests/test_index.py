"""The index: chunked appends (one part per shard per append), deduplication, and a user's manifest."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from asr_assets import layout
from asr_assets.stages import build_index, index_objects, media_id_of, read_manifest
from partitions import shard_of
from resources.storage import LocalStore, ObjectInfo


def _source(tmp_path: Path, n: int) -> LocalStore:
    src = tmp_path / "src"
    for i in range(n):
        path = src / f"d{i % 3}" / f"{i:04d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * i)
    return LocalStore(src)


def _all_rows(out: LocalStore) -> list[dict]:
    return [r for p in sorted(out.root.glob("index/*/*.parquet")) for r in pq.read_table(p).to_pylist()]


def test_chunks_append_parts_and_never_duplicate(tmp_path: Path) -> None:
    source, out = _source(tmp_path, 50), LocalStore(tmp_path / "out")
    added = index_objects(source, out, source.list(), 4, chunk_rows=7)
    assert sum(added.values()) == 50
    rows = _all_rows(out)
    assert sorted(r["key"] for r in rows) == sorted(o.key for o in source.list())
    # Appended in parts, each named after its first media id (nothing counts existing files).
    parts = sorted(out.root.glob("index/*/*.parquet"))
    assert len(parts) > len({p.parent for p in parts})
    for part in parts:
        assert part.stem == f"part-{pq.read_table(part)['media_id'][0].as_py()}"
    assert index_objects(source, out, source.list(), 4, chunk_rows=7) == {}
    # A listing that repeats objects (or overlaps what is indexed) adds each object once.
    repeated = list(source.list())[:10] * 3
    assert index_objects(source, out, repeated, 4) == {}
    assert len(_all_rows(out)) == 50
    for shard in ("shard-00000", "shard-00001", "shard-00002", "shard-00003"):
        rows = layout.read_index(out, shard).to_pylist()
        assert len({r["media_id"] for r in rows}) == len(rows)
        # Ids and shards are the partition code's, whatever the index computes inline.
        assert all(r["media_id"] == media_id_of(r["uri"]) and shard_of(r["uri"], 4) == shard for r in rows)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_a_users_manifest_replaces_the_listing(tmp_path: Path, fmt: str) -> None:
    source, out = _source(tmp_path, 12), LocalStore(tmp_path / "out")
    chosen = [o for o in source.list()][:5]
    table = pa.table({"uri": [source.uri_of(o.key) for o in chosen], "size": [o.size for o in chosen]})
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)
    total = sum(build_index(source, out, s, 4, str(path)).processed for s in [f"shard-0000{i}" for i in range(4)])
    assert total == 5
    assert sorted(r["key"] for r in _all_rows(out)) == sorted(o.key for o in chosen)
    assert {r["key"]: r["size"] for r in _all_rows(out)} == {o.key: o.size for o in chosen}


def test_manifest_errors_name_the_problem(tmp_path: Path) -> None:
    source = _source(tmp_path, 2)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"path": ["a.wav"]}), wrong)
    with pytest.raises(ValueError, match="needs a 'uri' or a 'key' column"):
        list(read_manifest(source, str(wrong)))
    outside = tmp_path / "outside.csv"
    pacsv.write_csv(pa.table({"uri": ["file:///elsewhere/a.wav"]}), outside)
    with pytest.raises(ValueError, match="is not under ASR_SOURCE_URI"):
        list(read_manifest(source, str(outside)))
    keys = tmp_path / "keys.csv"
    pacsv.write_csv(pa.table({"key": ["d0/0000.wav"]}), keys)
    assert list(read_manifest(source, str(keys))) == [ObjectInfo("d0/0000.wav", 0, 0.0)]
