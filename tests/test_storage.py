"""The local object store: safe keys, atomic writes, object-store listing semantics, clear configuration errors."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from resources.storage import (
    LocalStore,
    StorageConfigError,
    UnsafeKeyError,
    check_key,
    open_store,
    read_table,
    write_table,
)


@pytest.mark.parametrize(
    "key", ["../../etc/passwd", "/etc/passwd", "a/../../b", "a//b", "./a", "", "a\x00b", "a/\nb", "a/.."]
)
def test_unsafe_keys_are_refused(key: str, tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "root"
    root.mkdir(parents=True)
    with pytest.raises(UnsafeKeyError):
        check_key(key)
    with pytest.raises(UnsafeKeyError):
        LocalStore(root).put_bytes(key, b"x")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing written anywhere, inside or out


def test_symlink_out_of_the_root_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(UnsafeKeyError):
        LocalStore(root).put_bytes("link/file", b"x")
    assert not (outside / "file").exists()


def test_symlinks_out_of_the_root_are_not_listed(tmp_path: Path) -> None:
    (tmp_path / "secret.wav").write_bytes(b"outside")
    root = tmp_path / "root"
    root.mkdir()
    (root / "in.wav").write_bytes(b"inside")
    (root / "alias.wav").symlink_to(root / "in.wav")
    (root / "escape.wav").symlink_to(tmp_path / "secret.wav")
    assert [o.key for o in LocalStore(root).list()] == ["alias.wav", "in.wav"]


def test_unicode_and_spaces_are_fine(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("dir with space/ünïcødé 名前.txt", b"ok")
    assert store.read_bytes("dir with space/ünïcødé 名前.txt") == b"ok"
    assert store.uri_of("a b.wav") == f"file://{tmp_path.resolve()}/a b.wav"


def test_listing_is_sorted_recursive_prefix_based_and_hides_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for key in ["b/2.wav", "a.wav", "b/1.wav", "bb/3.wav", "c/.hidden.wav"]:
        store.put_bytes(key, b"x")
    (tmp_path / "b" / ".1.wav.123-abcd.tmp").write_bytes(b"partial")
    assert [o.key for o in store.list()] == ["a.wav", "b/1.wav", "b/2.wav", "bb/3.wav"]
    assert [o.key for o in store.list("b/")] == ["b/1.wav", "b/2.wav"]
    assert [o.key for o in store.list("b")] == ["b/1.wav", "b/2.wav", "bb/3.wav"]
    assert list(store.list("missing/")) == []


def test_put_replaces_atomically_and_leaves_no_temp(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("x/y.bin", b"old")
    store.put_bytes("x/y.bin", b"new")
    assert store.read_bytes("x/y.bin") == b"new"
    assert store.read_range("x/y.bin", 1, 3) == b"ew" and store.read_range("x/y.bin", 2, 99) == b"w"
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["y.bin"]
    src = store.scratch_dir() / "built.bin"
    src.write_bytes(b"built")
    store.put_file("x/z.bin", src)
    assert store.read_bytes("x/z.bin") == b"built" and not src.exists()


def test_parquet_round_trip_and_missing_table_is_empty(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    schema = pa.schema([("id", pa.string()), ("n", pa.int64())])
    assert read_table(store, "t.parquet", schema).num_rows == 0
    write_table(store, "t.parquet", pa.table({"id": ["a"], "n": [1]}, schema=schema))
    assert read_table(store, "t.parquet", schema).to_pylist() == [{"id": "a", "n": 1}]


def test_missing_source_fails_with_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(StorageConfigError, match=r"ASR_SOURCE_URI=.*does not exist"):
        open_store(str(tmp_path / "nope"), must_exist=True, what="ASR_SOURCE_URI")
    with pytest.raises(StorageConfigError, match="unsupported scheme"):
        open_store("s3://bucket/x", must_exist=True, what="ASR_SOURCE_URI")
    assert isinstance(open_store(f"file://{tmp_path}/new", must_exist=False, what="ASR_OUTPUT_ROOT"), LocalStore)
    assert (tmp_path / "new").is_dir()


def test_tables_from_an_earlier_version_read_new_nullable_columns_as_null(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    write_table(store, "t.parquet", pa.table({"id": ["a", "b"]}))
    schema = pa.schema([("id", pa.string()), ("added", pa.string())])
    assert read_table(store, "t.parquet", schema).to_pylist() == [
        {"id": "a", "added": None},
        {"id": "b", "added": None},
    ]
    strict = pa.schema([("id", pa.string()), pa.field("required", pa.int64(), nullable=False)])
    with pytest.raises(ValueError, match="column 'required' is missing"):
        read_table(store, "t.parquet", strict)


KEYS = [
    "a.wav",
    "dir/a b.wav",
    "ünïcödé/名前.mp3",
    "-dash.wav",
    "a..b.wav",
    ".hidden",
    "dir/.x/y",
    "...",
    "",
    "/abs",
    "a//b",
    "a/",
    "./a",
    "a/./b",
    "../a",
    "a/..",
    "tab\tname.wav",
    "nl\nname",
    "del\x7f",
    "c1\x85",
]


def test_vectorized_key_check_agrees_with_check_key(tmp_path: Path) -> None:
    def refused(key: str) -> bool:
        try:
            check_key(key)
        except UnsafeKeyError:
            return True
        return False

    assert LocalStore(tmp_path).unsafe_keys(pa.array(KEYS)).to_pylist() == [refused(k) for k in KEYS]
