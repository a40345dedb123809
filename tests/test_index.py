"""The index: chunked appends (one part per shard per append), deduplication, a user's manifest, and identity:
128-bit ids over uri and version, replaced objects, id collisions, and an outcome for every listed entry."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from asr_assets import layout
from asr_assets.stages import build_index, index_objects, media_id_of, read_manifest
from asr_assets.stages import index as index_module
from partitions import MEDIA_ID_SCHEME, shard_of
from resources.storage import LocalStore, ObjectInfo

SHARDS = [f"shard-0000{i}" for i in range(4)]


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
        assert all(
            r["media_id"] == media_id_of(r["uri"], r["version"]) and shard_of(r["uri"], 4) == shard for r in rows
        )
        assert all(re.fullmatch("[0-9a-f]{32}", r["media_id"]) for r in rows)


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


def test_a_manifest_gives_versions_from_a_column_or_from_size_and_mtime(tmp_path: Path) -> None:
    source = _source(tmp_path, 1)
    path = tmp_path / "m.parquet"
    table = pa.table(
        {"key": ["a", "b", "c"], "size": [1, 2, None], "mtime": [1.5, 2.0, 3.0], "version": ["e1", None, None]}
    )
    pq.write_table(table, path)
    assert [o.version for o in read_manifest(source, str(path))] == ["e1", "2-2000000000", ""]


def _indexed_everywhere(source: LocalStore, out: LocalStore) -> list[dict]:
    for shard in SHARDS:
        build_index(source, out, shard, 4)
    return [row for shard in SHARDS for row in layout.read_index(out, shard).to_pylist()]


def _dead(out: LocalStore) -> list[dict]:
    return [row for shard in SHARDS for row in layout.read_dead_letters(out, "media_index", shard).to_pylist()]


def test_a_replaced_object_gets_a_new_id_and_retires_the_old_one(tmp_path: Path) -> None:
    source, out = _source(tmp_path, 6), LocalStore(tmp_path / "out")
    first = {r["key"]: r for r in _indexed_everywhere(source, out)}
    replaced = source.root / "d1" / "0001.wav"
    replaced.write_bytes(b"new content, longer than before")
    rows = _indexed_everywhere(source, out)
    assert len(rows) == 7  # both versions are kept
    versions = [r for r in rows if r["key"] == "d1/0001.wav"]
    old, new = sorted(versions, key=lambda r: r["discovered_at"])
    assert old["media_id"] == first["d1/0001.wav"]["media_id"] and new["media_id"] != old["media_id"]
    assert old["uri"] == new["uri"] and new["version"] == f"{replaced.stat().st_size}-{replaced.stat().st_mtime_ns}"
    shard = shard_of(old["uri"], 4)
    index = layout.read_index(out, shard)
    assert layout.retired_media(index) == {old["media_id"]}
    assert len(_indexed_everywhere(source, out)) == 7  # listing again adds nothing
    # The same content at a new mtime is a new version too (a copy over the file): only the newest is live.
    os.utime(replaced, ns=(1, 1))
    rows = _indexed_everywhere(source, out)
    assert len(rows) == 8
    newest = layout.read_index(out, shard).to_pylist()[-1]
    assert newest["version"].endswith("-1")
    assert layout.retired_media(layout.read_index(out, shard)) == {old["media_id"], new["media_id"]}


def test_retired_media_follow_discovery_time_not_part_order() -> None:
    from datetime import UTC, datetime

    from asr_assets.records import MEDIA_SCHEMA

    def row(media_id: str, uri: str, second: int) -> dict:
        at = datetime(2026, 1, 1, 0, 0, second, tzinfo=UTC)
        return dict(media_id=media_id, uri=uri, key="k", size=1, mtime=0.0, extension="", discovered_at=at, version="")

    index = pa.Table.from_pylist(
        [row("new", "u", 5), row("other", "v", 1), row("old", "u", 2), row("older", "u", 1)], schema=MEDIA_SCHEMA
    )
    assert layout.retired_media(index) == {"old", "older"}
    assert layout.retired_media(MEDIA_SCHEMA.empty_table()) == set()


def test_a_forced_id_collision_is_dead_lettered_never_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, out = _source(tmp_path, 12), LocalStore(tmp_path / "out")
    # Every object gets the same id: within a shard only the first can be indexed, every other one collides.
    monkeypatch.setattr(
        index_module,
        "_media_id_digests",
        lambda uris, versions: pa.array([b"\xc0" * 16] * len(uris), pa.binary(16)),
    )
    rows = _indexed_everywhere(source, out)
    dead = _dead(out)
    assert {r["error_class"] for r in dead} == {"IdCollision"}
    assert len(rows) + len(dead) == 12
    assert sorted(r["uri"] for r in rows + dead) == sorted(source.uri_of(o.key) for o in source.list())
    assert len(rows) == len({shard_of(r["uri"], 4) for r in rows})  # one per shard
    taken = {shard_of(r["uri"], 4): r["uri"] for r in rows}
    for letter in dead:
        assert "c0" * 16 in letter["message"] and repr(taken[shard_of(letter["uri"], 4)]) in letter["message"]
        assert re.fullmatch("[0-9a-f]{32}", letter["item_id"]) and letter["item_id"] != "c0" * 16
    # Listing again records nothing twice, and the collisions within one listing (a single chunk) too.
    assert index_objects(source, out, source.list(), 4) == {}
    assert len(_dead(out)) == len(dead)
    fresh = LocalStore(tmp_path / "fresh")
    index_objects(source, fresh, source.list(), 4)
    assert len(_dead(fresh)) == len(dead) and sum(layout.read_index(fresh, s).num_rows for s in SHARDS) == len(rows)
    # One object per chunk: each collision is with a row indexed by an earlier chunk (its uri and version are read
    # back from the index, parts still being written included), and is worded the same.
    chunked = LocalStore(tmp_path / "chunked")
    index_objects(source, chunked, source.list(), 4, chunk_rows=1)
    assert sorted((r["item_id"], r["message"]) for r in _dead(chunked)) == sorted(
        (r["item_id"], r["message"]) for r in dead
    )


def test_a_dead_letters_id_stays_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "src").mkdir()
    source, out = LocalStore(tmp_path / "src"), LocalStore(tmp_path / "out")
    index_objects(source, out, [ObjectInfo("gone.wav", 0, 0.0, "v1", problem="NotAFile")], 1)
    # Listed again as a readable object at the same version: that id is recorded (for its uri), so nothing is added.
    assert index_objects(source, out, [ObjectInfo("gone.wav", 1, 0.0, "v1")], 1) == {}
    # Another object given that id collides with the dead letter, which has no version.
    taken = bytes.fromhex(media_id_of(source.uri_of("gone.wav"), "v1"))
    monkeypatch.setattr(
        index_module, "_media_id_digests", lambda uris, versions: pa.array([taken] * len(uris), pa.binary(16))
    )
    assert index_objects(source, out, [ObjectInfo("other.wav", 1, 0.0, "v2")], 1) == {}
    letters = layout.read_dead_letters(out, "media_index", "shard-00000").to_pylist()
    assert [r["error_class"] for r in letters] == ["NotAFile", "IdCollision"]
    assert f"which the shard already gives to {source.uri_of('gone.wav')!r} (version None)" in letters[1]["message"]


def test_every_listed_entry_gets_an_outcome(tmp_path: Path) -> None:
    source = _source(tmp_path, 8)
    root = source.root
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.wav").write_bytes(b"outside")
    with open(os.path.join(os.fsencode(root), b"caf\xe9 latin-1.wav"), "wb") as f:  # not UTF-8
        f.write(b"x")
    os.mkdir(os.path.join(os.fsencode(root), b"dir-\xff"))
    with open(os.path.join(os.fsencode(root), b"dir-\xff", b"inside.wav"), "wb") as f:
        f.write(b"x")
    (root / "linked folder").symlink_to(root / "d0", target_is_directory=True)
    (root / "escape.wav").symlink_to(outside / "secret.wav")
    (root / "dangling.wav").symlink_to(root / "gone.wav")
    (root / "alias.wav").symlink_to(root / "d0" / "0000.wav")
    os.mkfifo(root / "pipe.wav")
    out = LocalStore(tmp_path / "out")
    rows = _indexed_everywhere(source, out)  # every shard succeeds despite the bad names
    dead = {Path(r["uri"]).name if "dir-" not in r["uri"] else r["uri"].split("/src/")[1]: r for r in _dead(out)}
    assert {name: r["error_class"] for name, r in dead.items()} == {
        "caf%E9 latin-1.wav": "InvalidName",
        "dir-%FF/inside.wav": "InvalidName",
        "linked folder": "NotAFile",
        "escape.wav": "OutsideRoot",
        "dangling.wav": "NotAFile",
        "pipe.wav": "NotAFile",
    }
    for r in dead.values():
        assert r["uri"].isprintable() and r["uri"].startswith(source.root_uri) and r["uri"] in r["message"]
    assert "not valid UTF-8" in dead["caf%E9 latin-1.wav"]["message"]
    assert "outside the source" in dead["escape.wav"]["message"]
    assert sorted(r["key"] for r in rows) == sorted([f"d{i % 3}/{i:04d}.wav" for i in range(8)] + ["alias.wav"])
    assert len(_indexed_everywhere(source, out)) == len(rows) and len(_dead(out)) == 6  # once each


def test_an_output_root_with_old_ids_is_refused(tmp_path: Path) -> None:
    fresh = LocalStore(tmp_path / "fresh")
    layout.check_dataset(fresh, 4)
    assert json.loads(fresh.read_bytes(layout.DATASET_KEY)) == {"num_shards": 4, "media_id_scheme": MEDIA_ID_SCHEME}
    layout.check_dataset(fresh, 4)
    old = LocalStore(tmp_path / "old")
    old.put_bytes(layout.DATASET_KEY, json.dumps({"num_shards": 4}).encode())
    with pytest.raises(ValueError, match="built with 64-bit media ids.*new folder"):
        layout.check_dataset(old, 4)
