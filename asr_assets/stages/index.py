"""media_index: listing (or a user's manifest) to per-shard index parts, one row per media object."""

from __future__ import annotations

import contextlib
import gc
import itertools
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from hashlib import blake2b

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asr_assets import layout, lease
from asr_assets.records import (
    MEDIA_SCHEMA,
)
from asr_assets.stages.common import StageReport
from partitions import shard_key, uri_digest
from resources.storage import (
    ObjectInfo,
    ObjectStore,
    UnsafeKeyError,
    write_table,
)

INDEX_CHUNK_ROWS = 1_000_000


def index_objects(
    source: ObjectStore,
    out: ObjectStore,
    objects: Iterable[ObjectInfo],
    num_shards: int,
    only_shard: str | None = None,
    chunk_rows: int = INDEX_CHUNK_ROWS,
    run_id: str = "",
    lease_wait_s: float | None = None,
) -> dict[str, int]:
    """Appends listed objects that are not indexed yet to their shards' index; returns new rows per shard.

    Every object is indexed whatever its extension (``audio_wav`` decides by content and dead-letters what is not
    media), except hidden files, which listings skip. An object whose name cannot be a safe key (control characters)
    is dead-lettered under ``media_index``, so it too ends with a recorded outcome.

    Scales to tens of millions of objects: the listing is consumed in chunks of ``chunk_rows``, each chunk adds one
    Parquet part per shard it touches (nothing is rewritten), and deduplication against what a shard already holds
    is vectorized over its media ids, so memory stays flat whatever the listing's size.

    Each shard's index is written under its ``media_index`` lease, taken when the shard is first touched and held to
    the end (re-entered inside the media_index step; outside a step, e.g. a sensor tick, waited for up to
    ``lease_wait_s`` in all).

    Args:
        source: the store the objects were listed from.
        out: the output store.
        objects: listed objects (a full listing, the part after a sensor's cursor, or a manifest's rows).
        num_shards: the dataset's shard count.
        only_shard: index only this shard's objects (the asset works shard by shard).
        chunk_rows: objects per chunk.
        run_id: the Dagster run indexing (named to a writer that finds a lease held).
        lease_wait_s: how long to wait for leases held by others, in all (default ``ASR_INDEX_LEASE_WAIT_S``).
    """
    now = datetime.now(UTC)
    known: dict[str, pa.Array] = {}  # media ids per shard touched, loaded once
    added: Counter = Counter()
    iterator = iter(objects)
    leases: dict[str, lease.Lease] = {}
    released = contextlib.ExitStack()
    deadline = time.monotonic() + (lease.index_wait_s() if lease_wait_s is None else lease_wait_s)

    def check_leases() -> None:
        # A copy: the writer threads check while this thread takes more leases.
        for held in tuple(leases.values()):
            held.check()

    # Every write checks that each lease taken is still held (a stalled tick must not write after a takeover); the
    # leases themselves are kept through the plain store.
    store, out = out, lease.GuardedStore(out, check_leases)
    writer = _BackgroundWriter(out)

    def load(shard: str) -> None:
        if shard not in known:
            leases[shard] = lease.take(store, shard, "media_index", run_id, max(0.0, deadline - time.monotonic()))
            released.callback(leases[shard].release)
            index = layout.read_index(out, shard)
            dead_ids = layout.read_dead_letters(out, "media_index", shard)["item_id"]
            known[shard] = pa.concat_arrays([index["media_id"].combine_chunks(), dead_ids.combine_chunks()])

    try:
        while True:
            # Building a chunk allocates millions of small objects and no reference cycles: pausing the collector saves
            # the repeated full passes it would make over them (measured about 20% of the index build).
            with _gc_paused():
                chunk = list(itertools.islice(iterator, chunk_rows))
                if not chunk:
                    break
                table, shard_ids = _chunk_table(source, out, chunk, now, num_shards, only_shard, load, known)
            if table is None:
                continue
            order = np.argsort(shard_ids, kind="stable")
            sorted_ids = shard_ids[order]
            table = table.take(pa.array(order))
            bounds = np.flatnonzero(np.diff(sorted_ids)) + 1
            # Every lease of the chunk before any write (in shard order, as every indexer takes them): a shard held
            # elsewhere fails the chunk (a sensor's tick) before it has written anything.
            for shard in sorted(shard_key(int(i)) for i in np.unique(sorted_ids)):
                if only_shard is None or shard == only_shard:
                    load(shard)
            for start, end in zip(np.r_[0, bounds], np.r_[bounds, len(sorted_ids)], strict=True):
                shard = shard_key(int(sorted_ids[start]))
                if only_shard is not None and shard != only_shard:
                    continue
                load(shard)
                rows = table.slice(start, end - start)
                # New to the shard, and first occurrence only (a manifest may repeat a uri).
                rows = rows.filter(pc.invert(pc.is_in(rows["media_id"], value_set=known[shard])))
                rows = rows.filter(
                    pc.equal(pa.array(np.arange(rows.num_rows)), pc.index_in(rows["media_id"], rows["media_id"]))
                )
                if rows.num_rows:
                    writer.write(layout.index_part_key(shard, rows["media_id"][0].as_py()), rows)
                    known[shard] = pa.concat_arrays([known[shard], rows["media_id"].combine_chunks()])
                    added[shard] += rows.num_rows
    finally:
        try:
            writer.wait()
        finally:
            released.close()
    return dict(added)


class _BackgroundWriter:
    """Writes Parquet parts on two threads (encoding, upload and fsync release the GIL), so they overlap the next
    chunk's Python work (10M objects: 122 s -> 95 s); at most ``max_pending`` parts wait in memory, and the first
    failure is raised."""

    def __init__(self, out: ObjectStore, max_pending: int = 256) -> None:
        self._out, self._max = out, max_pending
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="index-writer")
        self._pending: set[Future] = set()

    def write(self, key: str, table: pa.Table) -> None:
        if len(self._pending) >= self._max:
            done, self._pending = wait(self._pending, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()
        self._pending.add(self._pool.submit(write_table, self._out, key, table))

    def wait(self) -> None:
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pool.shutdown(wait=True)


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _chunk_table(
    source: ObjectStore, out: ObjectStore, chunk: list, now: datetime, num_shards: int, only_shard, load, known
) -> tuple[pa.Table | None, np.ndarray | None]:
    """One chunk of listed objects as an index table, with each row's shard number (unsafe names dead-lettered)."""
    keys = [info.key for info in chunk]
    unsafe = source.unsafe_keys(pa.array(keys, pa.string())).to_numpy(zero_copy_only=False)
    prefix = source.root_uri.rstrip("/") + "/"
    if unsafe.any():
        for i in np.flatnonzero(unsafe):
            _dead_letter_name(out, prefix + keys[i], source, keys[i], num_shards, only_shard, load, known)
        chunk = [info for info, bad in zip(chunk, unsafe, strict=True) if not bad]
        keys = [info.key for info in chunk]
    if not keys:
        return None, None
    # The only per-object Python: the uri and its hash (partitions.uri_digest, inlined: a call per object costs).
    uris = [prefix + key for key in keys]
    digests = [blake2b(uri.encode("utf-8"), digest_size=8).digest() for uri in uris]
    shard_ids = np.frombuffer(b"".join(digests), dtype=">u8") % num_shards
    table = pa.table(
        {
            "media_id": [d.hex() for d in digests],
            "uri": uris,
            "key": keys,
            "size": [info.size for info in chunk],
            "mtime": [info.mtime for info in chunk],
            "extension": _extensions(keys),
            "discovered_at": pa.repeat(pa.scalar(now, MEDIA_SCHEMA.field("discovered_at").type), len(keys)),
        },
        schema=MEDIA_SCHEMA,
    )
    return table, shard_ids


def _extensions(keys: list[str]) -> pa.Array:
    """Lower-case extension of each key's file name ("" when it has none), in one vectorized pass."""
    found = pc.extract_regex(pa.array(keys, pa.string()), r"\.(?P<ext>[^./]+)$")
    return pc.fill_null(pc.utf8_lower(pc.struct_field(found, "ext")), "")


def _dead_letter_name(out, uri: str, source: ObjectStore, key: str, num_shards: int, only_shard, load, known) -> None:
    """Records an object whose name cannot be a safe key (once), with the reason ``uri_of`` gives."""
    try:
        source.uri_of(key)
    except UnsafeKeyError as error:
        exc = error
    else:
        raise AssertionError(f"unsafe_keys and uri_of disagree on {key!r}")
    digest = uri_digest(uri)
    shard = shard_key(int.from_bytes(digest, "big") % num_shards)
    if only_shard is not None and shard != only_shard:
        return
    load(shard)
    if digest.hex() in set(known[shard].to_pylist()):
        return
    message = f"media_index: {uri!r}: {exc}"
    layout.append_dead_letters(
        out, "media_index", shard, [layout.dead_letter(digest.hex(), uri, "media_index", "UnsafeName", message)]
    )
    known[shard] = pa.concat_arrays([known[shard], pa.array([digest.hex()], pa.string())])


def read_manifest(source: ObjectStore, path: str) -> Iterator[ObjectInfo]:
    """Objects named by a user's manifest (Parquet or CSV) instead of a listing.

    The manifest has a ``uri`` column (full uris under the source root) or a ``key`` column (relative to it), and
    optionally ``size`` (bytes) and ``mtime`` (seconds since the epoch). Rows are read in batches.

    Raises:
        ValueError: no ``uri``/``key`` column, or a uri outside the source root (named in the message).
    """
    import pyarrow.csv as pacsv
    import pyarrow.dataset as ds

    fmt = "csv" if path.lower().endswith((".csv", ".csv.gz")) else "parquet"
    dataset = ds.dataset(
        path,
        format=ds.CsvFileFormat(
            convert_options=pacsv.ConvertOptions(column_types={"uri": pa.string(), "key": pa.string()})
        )
        if fmt == "csv"
        else "parquet",
    )
    names = dataset.schema.names
    if "uri" not in names and "key" not in names:
        raise ValueError(f"manifest {path}: needs a 'uri' or a 'key' column, has {names}")
    root = source.root_uri.rstrip("/") + "/"
    columns = [c for c in ("uri", "key", "size", "mtime") if c in names]
    for batch in dataset.to_batches(columns=columns, batch_size=100_000):
        rows = batch.to_pydict()
        for i in range(batch.num_rows):
            key = rows["key"][i] if "key" in rows else None
            if key is None:
                uri = rows["uri"][i]
                if not uri.startswith(root):
                    raise ValueError(f"manifest {path}: {uri!r} is not under ASR_SOURCE_URI ({root})")
                key = uri[len(root) :]
            size = rows["size"][i] if "size" in rows and rows["size"][i] is not None else 0
            mtime = rows["mtime"][i] if "mtime" in rows and rows["mtime"][i] is not None else 0.0
            yield ObjectInfo(key, int(size), float(mtime))


def build_index(
    source: ObjectStore, out: ObjectStore, shard: str, num_shards: int, manifest: str | None = None
) -> StageReport:
    """Appends the shard's objects that the index does not have yet, from a listing of the source or from a user's
    manifest (see ``index_objects`` and ``read_manifest``)."""
    started = time.perf_counter()
    report = StageReport()
    listed = 0

    def counted(objects: Iterable[ObjectInfo]) -> Iterator[ObjectInfo]:
        nonlocal listed
        for info in objects:
            listed += 1
            yield info

    objects = read_manifest(source, manifest) if manifest else source.list()
    added = index_objects(source, out, counted(objects), num_shards, only_shard=shard).get(shard, 0)
    index = layout.read_index(out, shard)
    report.processed = report.succeeded = added
    if added:
        report.outputs.append(layout.index_prefix(shard))
    report.totals = {
        "objects_read": listed,
        "media": index.num_rows,
        "unsafe_names": layout.read_dead_letters(out, "media_index", shard).num_rows,
        "bytes": pc.sum(index["size"]).as_py() or 0,
    }
    report.seconds = time.perf_counter() - started
    return report


def media_id_of(uri: str) -> str:
    """16 hex chars of blake2b over the uri (the digest that also picks its shard)."""
    return uri_digest(uri).hex()
