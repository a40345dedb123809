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
    DeadLetterRow,
)
from asr_assets.stages.common import StageReport
from partitions import media_id, media_id_bytes, shard_key, shard_of
from resources.storage import (
    LISTING_PROBLEMS,
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
    media), except hidden files, which listings skip. Everything else a listing yields ends with a recorded outcome
    too, as a dead letter under ``media_index``: a name that cannot be a safe key (``UnsafeName``), an entry that is
    not a readable object (``ObjectInfo.problem``: ``InvalidName``, ``NotAFile``, ``OutsideRoot``,
    ``DirectoryObject``), and an object whose id the shard already gives to another uri or version (``IdCollision``).

    An object is identified by its uri and version (``partitions.media_id``): one replaced under the same key is a
    new row, and the older row is retired (``layout.retired_media``).

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
    known: dict[str, pa.Table] = {}  # per shard touched, loaded once: the ids it holds (KNOWN_SCHEMA)
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

    def load(shard: str) -> pa.Table:
        if shard not in known:
            leases[shard] = lease.take(store, shard, "media_index", run_id, max(0.0, deadline - time.monotonic()))
            released.callback(leases[shard].release)
            index = layout.read_index(out, shard)
            dead = layout.read_dead_letters(out, "media_index", shard)
            known[shard] = pa.concat_tables(
                [
                    pa.table(
                        [index["media_id"], index["uri"], pc.fill_null(index["version"], "")], schema=KNOWN_SCHEMA
                    ),
                    # A dead letter has no version column: its id alone says it was recorded.
                    pa.table([dead["item_id"], dead["uri"], pa.nulls(dead.num_rows, pa.string())], schema=KNOWN_SCHEMA),
                ]
            ).combine_chunks()
        return known[shard]

    def remember(shard: str, ids: pa.Array, uris: pa.Array, versions: pa.Array) -> None:
        known[shard] = pa.concat_tables(
            [known[shard], pa.table([ids, uris, versions], schema=KNOWN_SCHEMA)]
        ).combine_chunks()

    try:
        while True:
            # Building a chunk allocates millions of small objects and no reference cycles: pausing the collector saves
            # the repeated full passes it would make over them (measured about 20% of the index build).
            with _gc_paused():
                chunk = list(itertools.islice(iterator, chunk_rows))
                if not chunk:
                    break
                table, shard_ids, dead = _chunk_table(source, chunk, now, num_shards)
            # Every lease of the chunk before any write (in shard order, as every indexer takes them): a shard held
            # elsewhere fails the chunk (a sensor's tick) before it has written anything.
            touched = set(dead) | ({shard_key(int(i)) for i in np.unique(shard_ids)} if table is not None else set())
            for shard in sorted(touched):
                if only_shard is None or shard == only_shard:
                    load(shard)
            if table is not None:
                order = np.argsort(shard_ids, kind="stable")
                sorted_ids = shard_ids[order]
                table = table.take(pa.array(order))
                bounds = np.flatnonzero(np.diff(sorted_ids)) + 1
                for start, end in zip(np.r_[0, bounds], np.r_[bounds, len(sorted_ids)], strict=True):
                    shard = shard_key(int(sorted_ids[start]))
                    if only_shard is not None and shard != only_shard:
                        continue
                    rows, collisions = _new_rows(table.slice(start, end - start), load(shard))
                    dead.setdefault(shard, []).extend(collisions)
                    if rows.num_rows:
                        writer.write(layout.index_part_key(shard, rows["media_id"][0].as_py()), rows)
                        remember(shard, rows["media_id"], rows["uri"], rows["version"])
                        added[shard] += rows.num_rows
            for shard, letters in sorted(dead.items()):
                if only_shard is None or shard == only_shard:
                    _dead_letter(out, shard, letters, load(shard), remember)
    finally:
        try:
            writer.wait()
        finally:
            released.close()
    return dict(added)


# What index_objects knows a shard holds: the ids of its index rows and of its media_index dead letters.
KNOWN_SCHEMA = pa.schema([("media_id", pa.string()), ("uri", pa.string()), ("version", pa.string())])


def _new_rows(rows: pa.Table, known: pa.Table) -> tuple[pa.Table, list[DeadLetterRow]]:
    """The rows of one shard's slice that the shard does not hold yet (first occurrence of each id only: a manifest
    may repeat a uri), and dead letters for rows whose id the shard (or an earlier row of the slice) gives to another
    uri or version."""
    n = rows.num_rows
    positions = pa.array(np.arange(n))
    ids, uris, versions = (rows[name].combine_chunks() for name in ("media_id", "uri", "version"))
    at = pc.index_in(ids, value_set=known["media_id"].combine_chunks())
    seen = pc.is_valid(at)
    known_uri, known_version = known["uri"].combine_chunks().take(at), known["version"].combine_chunks().take(at)
    # A dead letter (version null) matches on its uri alone.
    same_as_known = pc.and_(
        pc.equal(uris, known_uri), pc.or_(pc.is_null(known_version), pc.equal(versions, known_version))
    )
    first = pc.index_in(ids, value_set=ids)
    first_uri, first_version = uris.take(first), versions.take(first)
    is_first = pc.equal(first, positions)
    same_as_first = pc.and_(pc.equal(uris, first_uri), pc.equal(versions, first_version))
    collides_known = pc.and_(seen, pc.invert(pc.fill_null(same_as_known, False)))
    collides_first = pc.and_(pc.invert(seen), pc.invert(same_as_first))
    collisions = []
    for i in np.flatnonzero(pc.or_(collides_known, collides_first).to_numpy(zero_copy_only=False)):
        taken = collides_known[i].as_py()
        other_uri = (known_uri if taken else first_uri)[i].as_py()
        other_version = (known_version if taken else first_version)[i].as_py()
        uri, version, media = uris[i].as_py(), versions[i].as_py(), ids[i].as_py()
        message = (
            f"media_index: {uri!r} (version {version!r}) has media id {media}, which the shard already gives to "
            f"{other_uri!r} (version {other_version!r}); it is not indexed. Two objects with one 128-bit id cannot "
            "happen by chance: report it"
        )
        # Its own id (the colliding one is taken), from another hash domain: recorded once however often it is listed.
        raw = uri.encode("utf-8") + b"\0" + version.encode("utf-8")
        item = blake2b(raw, digest_size=16, person=b"IdCollision").hexdigest()
        collisions.append(layout.dead_letter(item, uri, "media_index", "IdCollision", message))
    fresh = pc.and_(pc.invert(seen), is_first)
    return rows.filter(fresh), collisions


def _dead_letter(out: ObjectStore, shard: str, letters: list[DeadLetterRow], known: pa.Table, remember) -> None:
    """Records a shard's dead letters of one chunk in one append, each item once (a re-listing adds nothing)."""
    ids_given = pa.array([row.item_id for row in letters], pa.string())
    recorded = pc.is_in(ids_given, value_set=known["media_id"].combine_chunks()).to_pylist()
    new, ids = [], set()
    for row, already in zip(letters, recorded, strict=True):
        if not already and row.item_id not in ids:
            new.append(row)
            ids.add(row.item_id)
    if new:
        layout.append_dead_letters(out, "media_index", shard, new)
        remember(
            shard,
            pa.array([r.item_id for r in new], pa.string()),
            pa.array([r.uri for r in new], pa.string()),
            pa.nulls(len(new), pa.string()),
        )


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
    source: ObjectStore, chunk: list[ObjectInfo], now: datetime, num_shards: int
) -> tuple[pa.Table | None, np.ndarray | None, dict[str, list[DeadLetterRow]]]:
    """One chunk of listed objects as an index table with each row's shard number, and dead letters by shard for the
    entries that cannot be indexed (unsafe names, listing problems)."""
    keys = [info.key for info in chunk]
    unsafe = source.unsafe_keys(pa.array(keys, pa.string())).to_numpy(zero_copy_only=False)
    prefix = source.root_uri.rstrip("/") + "/"
    dead: dict[str, list[DeadLetterRow]] = {}
    bad = [bool(u or info.problem) for u, info in zip(unsafe, chunk, strict=True)]
    if any(bad):
        for info, is_bad in zip(chunk, bad, strict=True):
            if is_bad:
                uri = prefix + info.key
                row = _name_dead_letter(source, uri, info)
                dead.setdefault(shard_of(uri, num_shards), []).append(row)
        chunk = [info for info, is_bad in zip(chunk, bad, strict=True) if not is_bad]
        keys = [info.key for info in chunk]
    if not keys:
        return None, None, dead
    # The only per-object Python: the uri, its shard's hash (partitions.uri_digest, inlined: a call per object costs)
    # and its id.
    uris = [prefix + key for key in keys]
    encoded = [uri.encode("utf-8") for uri in uris]
    versions = [info.version for info in chunk]
    digests = b"".join(blake2b(uri, digest_size=8).digest() for uri in encoded)
    shard_ids = np.frombuffer(digests, dtype=">u8") % num_shards
    table = pa.table(
        {
            "media_id": [media_id_bytes(uri, v.encode("utf-8")) for uri, v in zip(encoded, versions, strict=True)],
            "uri": uris,
            "key": keys,
            "size": [info.size for info in chunk],
            "mtime": [info.mtime for info in chunk],
            "extension": _extensions(keys),
            "discovered_at": pa.repeat(pa.scalar(now, MEDIA_SCHEMA.field("discovered_at").type), len(keys)),
            "version": versions,
        },
        schema=MEDIA_SCHEMA,
    )
    return table, shard_ids, dead


def _extensions(keys: list[str]) -> pa.Array:
    """Lower-case extension of each key's file name ("" when it has none), in one vectorized pass."""
    found = pc.extract_regex(pa.array(keys, pa.string()), r"\.(?P<ext>[^./]+)$")
    return pc.fill_null(pc.utf8_lower(pc.struct_field(found, "ext")), "")


def _name_dead_letter(source: ObjectStore, uri: str, info: ObjectInfo) -> DeadLetterRow:
    """The dead letter of a listed entry that cannot be indexed, with its kind and the reason."""
    if info.problem:
        kind, reason = info.problem, LISTING_PROBLEMS.get(info.problem, info.problem)
    else:
        try:
            source.uri_of(info.key)
        except UnsafeKeyError as error:
            kind, reason = "UnsafeName", str(error)
        else:
            raise AssertionError(f"unsafe_keys and uri_of disagree on {info.key!r}")
    return layout.dead_letter(media_id(uri, info.version), uri, "media_index", kind, f"media_index: {uri!r}: {reason}")


def read_manifest(source: ObjectStore, path: str) -> Iterator[ObjectInfo]:
    """Objects named by a user's manifest (Parquet or CSV) instead of a listing.

    The manifest has a ``uri`` column (full uris under the source root) or a ``key`` column (relative to it), and
    optionally ``size`` (bytes), ``mtime`` (seconds since the epoch) and ``version`` (what changes when the object
    is replaced: an ETag, a content hash). Without a ``version``, a row's version is ``{size}-{mtime in ns}`` when it
    has both, else "" (then a replaced object keeps its id: give a version to have it processed again). Rows are read
    in batches.

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
    columns = [c for c in ("uri", "key", "size", "mtime", "version") if c in names]
    for batch in dataset.to_batches(columns=columns, batch_size=100_000):
        rows = batch.to_pydict()
        missing = [None] * batch.num_rows
        sizes, mtimes, versions = (rows.get(name, missing) for name in ("size", "mtime", "version"))
        for i in range(batch.num_rows):
            key = rows["key"][i] if "key" in rows else None
            if key is None:
                uri = rows["uri"][i]
                if not uri.startswith(root):
                    raise ValueError(f"manifest {path}: {uri!r} is not under ASR_SOURCE_URI ({root})")
                key = uri[len(root) :]
            size, mtime, version = sizes[i], mtimes[i], versions[i]
            if version is None:
                version = f"{int(size)}-{round(float(mtime) * 1e9)}" if size is not None and mtime is not None else ""
            yield ObjectInfo(key, int(size or 0), float(mtime or 0.0), str(version))


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
        "retired": len(layout.retired_media(index)),
        "not_indexed": layout.read_dead_letters(out, "media_index", shard).num_rows,
        "bytes": pc.sum(index["size"]).as_py() or 0,
    }
    report.seconds = time.perf_counter() - started
    return report


def media_id_of(uri: str, version: str = "") -> str:
    """The media id of a uri at a version (``partitions.media_id``): 32 hex chars."""
    return media_id(uri, version)
