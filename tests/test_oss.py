"""OSS through oss2 against the local OSS-protocol server: the store, its failure handling, and the whole graph."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from asr_assets import layout
from asr_assets.checks import reconcile_audio, reconcile_distilled, reconcile_transcripts
from asr_assets.definitions import all_assets, all_checks
from asr_assets.sample_corpus import Corpus
from partitions import NUM_SHARDS, shard_of
from resources.storage import (
    LocalCache,
    OssSettings,
    OssStore,
    RetryPolicy,
    StorageAuthError,
    StorageConfigError,
    StorageResource,
    open_store,
)
from resources.teachers import TeacherResource
from tests.oss_server import OssServer

KEY_ID, SECRET, BUCKET = "LTAI5tTestKeyId", "Sup3r-Secret-Value-42", "media-bucket"


@pytest.fixture
def server():
    with OssServer(KEY_ID, SECRET, BUCKET) as srv:
        yield srv


def settings(srv: OssServer, tmp_path: Path, secret: str = SECRET, **retry) -> OssSettings:
    return OssSettings(srv.endpoint, KEY_ID, secret, tmp_path / "cache", 1 << 30, RetryPolicy(**retry))


def test_round_trip_listing_and_odd_keys(server: OssServer, tmp_path: Path) -> None:
    store = open_store(f"oss://{BUCKET}/root", must_exist=True, what="ASR_SOURCE_URI", oss=settings(server, tmp_path))
    keys = ["a b/ünïcödé 名前.wav", "a b/quote's.mp3", "-dash.flac", "../../etc/passwd", "z.bin"]
    for i, key in enumerate(keys):
        store.put_bytes(key, f"data {i}".encode())
    server.objects["elsewhere/x.wav"] = server.objects[f"root/{keys[0]}"]  # outside the prefix: never listed
    assert [o.key for o in store.list()] == sorted(keys)
    assert [o.key for o in store.list("a b/")] == ["a b/quote's.mp3", "a b/ünïcödé 名前.wav"]
    assert store.read_bytes("z.bin") == b"data 4" and store.exists("z.bin") and not store.exists("nope")
    assert store.read_range("z.bin", 1, 4) == b"ata" and store.read_range("z.bin", 4, 100) == b" 4"
    # The cache names files by hash: a hostile key cannot escape it.
    path = store.local_path("../../etc/passwd")
    assert path.read_bytes() == b"data 3" and path.resolve().is_relative_to((tmp_path / "cache").resolve())
    with pytest.raises(FileNotFoundError, match="no such object"):
        store.read_bytes("missing")
    store.delete("z.bin")
    assert not store.exists("z.bin")


def test_listing_pages_past_a_thousand_keys(server: OssServer, tmp_path: Path) -> None:
    store = open_store(f"oss://{BUCKET}", must_exist=True, what="x", oss=settings(server, tmp_path))
    for i in range(1005):
        server.objects[f"k/{i:05d}"] = server.objects.get("seed") or _stored(b"x")
    assert [o.key for o in store.list("k/")] == [f"k/{i:05d}" for i in range(1005)]


def _stored(data: bytes):
    import hashlib
    from datetime import UTC, datetime

    from tests.oss_server import Stored

    return Stored(data, hashlib.md5(data).hexdigest().upper(), datetime.now(UTC))


def test_large_files_upload_in_parts_and_appear_whole(server: OssServer, tmp_path: Path) -> None:
    store = OssStore(BUCKET, "out", settings(server, tmp_path))
    store.MULTIPART_THRESHOLD, store.PART_SIZE = 100_000, 40_000
    src = tmp_path / "big.bin"
    data = bytes(range(256)) * 1000
    src.write_bytes(data)
    store.put_file("big.bin", src)
    assert server.objects["out/big.bin"].data == data and server.objects["out/big.bin"].etag.endswith("-7")
    assert not src.exists() and not server.uploads


def test_refused_credentials_fail_fast_and_never_show_the_secret(server: OssServer, tmp_path: Path) -> None:
    wrong = "Wr0ng-Secret-Value-99"
    with pytest.raises(StorageAuthError) as caught:
        open_store(f"oss://{BUCKET}/x", must_exist=True, what="ASR_SOURCE_URI", oss=settings(server, tmp_path, wrong))
    message = str(caught.value)
    assert BUCKET in message and server.endpoint in message and "SignatureDoesNotMatch" in message
    assert wrong not in message and SECRET not in message and wrong not in repr(settings(server, tmp_path, wrong))
    assert server.counts["rejected"] == 1  # no retries on a refused signature
    with pytest.raises(StorageConfigError, match="does not exist"):
        open_store("oss://other-bucket/x", must_exist=True, what="ASR_SOURCE_URI", oss=settings(server, tmp_path))
    with pytest.raises(StorageConfigError, match="needs OSS_ENDPOINT"):
        open_store(f"oss://{BUCKET}/x", must_exist=True, what="ASR_SOURCE_URI", oss=None)


def test_transient_errors_are_retried_and_then_given_up(server: OssServer, tmp_path: Path) -> None:
    store = OssStore(BUCKET, "", settings(server, tmp_path, attempts=30, base_delay_s=0.001, max_delay_s=0.01))
    server.faults.error_rate, server.faults.drop_rate = 0.3, 0.2
    for i in range(30):
        store.put_bytes(f"f{i}", b"%d" % i)
    assert all(store.read_bytes(f"f{i}") == b"%d" % i for i in range(30))
    assert server.counts["errors_503"] > 0 and server.counts["dropped"] > 0
    server.faults.error_rate = 1.0
    hopeless = OssStore(BUCKET, "", settings(server, tmp_path, attempts=3, base_delay_s=0.001))
    with pytest.raises(OSError, match="answered 503 ServiceUnavailable"):
        hopeless.read_bytes("f1")


def test_cache_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = LocalCache(tmp_path / "c", max_bytes=2500)
    for name in ("a", "b", "c"):
        cache.fetch(f"oss://b/{name}.wav", lambda dst: dst.write_bytes(b"x" * 1000))
    assert not cache.path_for("oss://b/a.wav").exists()
    assert cache.path_for("oss://b/b.wav").exists() and cache.path_for("oss://b/c.wav").exists()


def _upload_corpus(server: OssServer, corpus: Corpus, tmp_path: Path) -> None:
    store = OssStore(BUCKET, "in", settings(server, tmp_path))
    for path in sorted(corpus.media_dir.rglob("*")):
        if path.is_file():
            store.put_bytes(path.relative_to(corpus.media_dir).as_posix(), path.read_bytes())


def _run_on_oss(server: OssServer, shard: str, out_prefix: str, tmp_path: Path):
    storage = StorageResource(
        source_uri=f"oss://{BUCKET}/in",
        output_root=f"oss://{BUCKET}/{out_prefix}",
        oss_endpoint=server.endpoint,
        oss_access_key_id=KEY_ID,
        oss_access_key_secret=SECRET,
        cache_dir=str(tmp_path / f"cache-{out_prefix}"),
    )
    per_shard = [a for a in all_assets if a.partitions_def is not None]
    result = dg.materialize(
        [*per_shard, *all_checks], resources={"storage": storage, "teacher": TeacherResource()}, partition_key=shard
    )
    store = OssStore(BUCKET, out_prefix, settings(server, tmp_path))
    return result, store


def _outputs(server: OssServer, prefix: str) -> dict[str, bytes]:
    """Every dataset output under a prefix (tars, manifests, per-file transcripts), by relative key."""
    return {
        k[len(prefix) + 1 :]: server.objects[k].data
        for k in sorted(server.objects)
        # The current pointer aside: it says when its build was committed.
        if k.startswith(f"{prefix}/distilled/") and not k.endswith(".current.json")
    }


def test_whole_graph_on_oss_in_and_out_also_under_faults(server: OssServer, corpus: Corpus, tmp_path: Path) -> None:
    _upload_corpus(server, corpus, tmp_path)
    # The shard holding the most files: shards hash the uri, and these are oss:// uris.
    shards = Counter(shard_of(f"oss://{BUCKET}/in/{item.path}", NUM_SHARDS) for item in corpus.items)
    busiest_shard = shards.most_common(1)[0][0]
    clean, store = _run_on_oss(server, busiest_shard, "out-clean", tmp_path)
    assert clean.success and all(c.passed for c in clean.get_asset_check_evaluations())
    for reconcile in (reconcile_audio, reconcile_transcripts, reconcile_distilled):
        assert reconcile(store, busiest_shard).passed
    manifest = pq.read_table(store.local_path(layout.distilled_manifest_key(busiest_shard))).to_pylist()
    assert manifest and all(r["source_uri"].startswith(f"oss://{BUCKET}/in/") for r in manifest)

    server.faults.error_rate, server.faults.drop_rate = 0.2, 0.05
    faulty, faulty_store = _run_on_oss(server, busiest_shard, "out-faulty", tmp_path)
    assert faulty.success and all(c.passed for c in faulty.get_asset_check_evaluations())
    assert server.counts["errors_503"] > 20 and server.counts["dropped"] > 3
    assert _outputs(server, "out-faulty") == _outputs(server, "out-clean")  # same bytes: nothing lost or doubled
    server.faults.error_rate = server.faults.drop_rate = 0.0

    # The secret appears in no event, log message or metadata value of either run, nor in any stored object.
    for result in (clean, faulty):
        assert SECRET not in "\n".join(str(event) for event in result.all_events)
    assert not any(SECRET.encode() in obj.data for obj in server.objects.values())


def test_downloads_resume_a_dropped_body_retry_a_bad_crc_and_refuse_oversized_objects(
    server: OssServer, tmp_path: Path
) -> None:
    from resources.storage import ObjectTooLarge

    store = OssStore(BUCKET, "", settings(server, tmp_path, attempts=5, base_delay_s=0.001, max_delay_s=0.01))
    data = bytes(range(256)) * 4000  # 1 MB
    server.objects["a.wav"] = _stored(data)
    server.faults.cut_bodies, server.faults.cut_after = 3, 300_000  # three connections dropped mid-body
    assert store.local_path("a.wav").read_bytes() == data
    assert server.faults.cut_bodies == 0  # each drop resumed from the bytes already written
    server.objects["b.wav"] = _stored(data)
    server.faults.corrupt_bodies = 1  # a flipped byte: the CRC-64 differs, the object is fetched again
    assert store.local_path("b.wav").read_bytes() == data and server.faults.corrupt_bodies == 0
    server.objects["big.wav"] = _stored(data)
    requests = server.counts["requests"]
    with pytest.raises(ObjectTooLarge, match="over the 1000-byte limit; not downloaded"):
        store.local_path("big.wav", max_bytes=1000)
    assert server.counts["requests"] == requests + 1  # the HEAD only
    with pytest.raises(FileNotFoundError):
        store.local_path("nope.wav")
