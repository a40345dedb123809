"""The local object store: safe keys, atomic writes, object-store listing semantics, clear configuration errors; and
the identity a listing gives each object (versions, entries that are not objects, the cache keyed by version), locally
and on OSS (the loopback OSS server)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from asr_assets import layout
from asr_assets.stages import index_objects
from partitions import shard_of
from resources.storage import (
    LocalCache,
    LocalStore,
    OssSettings,
    OssStore,
    RetryPolicy,
    StorageConfigError,
    UnsafeKeyError,
    check_key,
    open_store,
    printable_name,
    read_table,
    write_table,
)
from tests.oss_server import OssServer


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


def test_links_out_of_the_root_or_to_folders_are_listed_as_problems_never_followed(tmp_path: Path) -> None:
    (tmp_path / "secret.wav").write_bytes(b"outside")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "x.wav").write_bytes(b"x")
    (root / "in.wav").write_bytes(b"inside")
    (root / "alias.wav").symlink_to(root / "in.wav")
    (root / "escape.wav").symlink_to(tmp_path / "secret.wav")
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "self").symlink_to(root / "self")
    store = LocalStore(root)
    listed = {o.key: o.problem for o in store.list()}
    assert listed == {
        "alias.wav": "",
        "escape.wav": "OutsideRoot",
        "in.wav": "",
        "loop": "NotAFile",
        "self": "NotAFile",
        "sub/x.wav": "",
    }
    with pytest.raises(UnsafeKeyError):
        store.local_path("escape.wav")


def test_versions_change_when_a_file_is_replaced(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("a.wav", b"one")
    os.utime(tmp_path / "a.wav", ns=(10**18, 10**18 + 7))
    assert [tuple(o) for o in store.list()] == [("a.wav", 3, 1e9, "3-1000000000000000007", "")]
    store.put_bytes("a.wav", b"two")  # same size, new mtime
    assert next(store.list()).version != "3-1000000000000000007"


def test_names_that_are_not_utf8_are_listed_percent_escaped(tmp_path: Path) -> None:
    with open(os.path.join(os.fsencode(tmp_path), b"bad\xff\xfe name.wav"), "wb") as f:
        f.write(b"x")
    (tmp_path / "good%FF.wav").write_bytes(b"x")
    listed = [(o.key, o.problem) for o in LocalStore(tmp_path).list()]
    assert listed == [("bad%FF%FE name.wav", "InvalidName"), ("good%FF.wav", "")]
    assert printable_name("ok ünï") == ("ok ünï", False)


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


KEY_ID, SECRET, BUCKET = "LTAI5tTestKeyId", "Sup3r-Secret-Value-42", "media-bucket"


@pytest.fixture
def oss(tmp_path: Path):
    with OssServer(KEY_ID, SECRET, BUCKET) as server:
        settings = OssSettings(server.endpoint, KEY_ID, SECRET, tmp_path / "cache", 1 << 30, RetryPolicy())
        yield server, OssStore(BUCKET, "media", settings)


def test_oss_listing_versions_by_etag_and_reports_folder_keys_with_content(oss, tmp_path: Path) -> None:
    server, store = oss
    store.put_bytes("a.wav", b"first")
    store.put_bytes("folder/", b"")  # a folder placeholder: not an object, nothing to record
    store.put_bytes("data dir/", b"bytes under a folder name")
    listed = {o.key: (o.version, o.problem) for o in store.list()}
    assert listed == {
        "a.wav": (server.objects["media/a.wav"].etag, ""),
        "data dir/": (server.objects["media/data dir/"].etag, "DirectoryObject"),
    }
    out = LocalStore(tmp_path / "out")
    index_objects(store, out, store.list(), 4)
    dead = layout.read_dead_letters(out, "media_index", shard_of(store.uri_of("data dir/"), 4)).to_pylist()
    assert [(r["uri"], r["error_class"]) for r in dead] == [(store.uri_of("data dir/"), "DirectoryObject")]
    assert "ending in '/' that holds data" in dead[0]["message"]


def test_a_replaced_oss_object_is_never_served_from_the_old_cached_bytes(oss, tmp_path: Path) -> None:
    server, store = oss
    store.put_bytes("a.wav", b"first version")
    first = next(store.list())
    assert store.local_path("a.wav", version=first.version).read_bytes() == b"first version"
    store.put_bytes("a.wav", b"second version")
    second = next(store.list())
    assert second.version != first.version
    assert store.local_path("a.wav", version=second.version).read_bytes() == b"second version"
    # Indexed twice: two ids, the first retired.
    out = LocalStore(tmp_path / "out")
    index_objects(store, out, [first], 4)
    index_objects(store, out, [second], 4)
    index = layout.read_index(out, shard_of(store.uri_of("a.wav"), 4))
    assert index["version"].to_pylist() == [first.version, second.version]
    assert layout.retired_media(index) == {index["media_id"][0].as_py()}


def test_cache_files_are_named_by_uri_and_version(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path / "c", max_bytes=1 << 20)
    one = cache.fetch("oss://b/a.wav", lambda dst: dst.write_bytes(b"one"), "etag-1")
    two = cache.fetch("oss://b/a.wav", lambda dst: dst.write_bytes(b"two"), "etag-2")
    assert one != two and one.read_bytes() == b"one" and two.read_bytes() == b"two"
    assert cache.fetch("oss://b/a.wav", lambda dst: dst.write_bytes(b"never"), "etag-1").read_bytes() == b"one"
    assert one.suffix == ".wav" and one.resolve().is_relative_to((tmp_path / "c").resolve())
