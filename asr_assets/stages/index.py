"""media_index: listing (or a user's manifest) to per-shard index parts, one row per media object."""

from __future__ import annotations

import binascii
import contextlib
import functools
import gc
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
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
from partitions import media_id, shard_key, shard_of
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
    is vectorized over its media ids. Memory is one chunk's worth plus 25 bytes for each row the touched shards hold
    (its id and a fingerprint of its uri and version: see ``KNOWN_SCHEMA``), about 250 MB for 10 million.

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
    # Per shard touched, loaded once: what it holds (KNOWN_SCHEMA), in pieces joined when next looked up (once per
    # chunk, not once per part).
    known: dict[str, list[pa.RecordBatch]] = {}
    guarded: dict[str, ObjectStore] = {}  # per shard touched: the output store, every write checked against its lease
    added: Counter = Counter()
    iterator = iter(objects)
    leases: list[lease.Lease] = []
    deadline = time.monotonic() + (lease.index_wait_s() if lease_wait_s is None else lease_wait_s)
    writer = _BackgroundWriter()

    def load(shard: str) -> None:
        if shard not in known:
            held = lease.take(out, shard, "media_index", run_id, max(0.0, deadline - time.monotonic()))
            leases.append(held)
            # Every write to the shard first checks that its lease is still held (a stalled tick must not write after
            # a takeover); the leases themselves are kept through the plain store.
            guarded[shard] = lease.GuardedStore(out, held.check)
            known[shard] = [_known_of(out, shard)]

    def holds(shard: str) -> pa.RecordBatch:
        if len(known[shard]) > 1:
            known[shard] = [pa.concat_batches(known[shard])]
        return known[shard][0]

    def holders(shard: str, ids: list[str]) -> dict[str, tuple[str, str | None]]:
        writer.flush()  # the rows this run added are looked up in the index too
        return _holders(out, shard, ids)

    try:
        while True:
            # Building a chunk allocates millions of small objects and no reference cycles: pausing the collector saves
            # the repeated full passes it would make over them (measured about 20% of the index build).
            with _gc_paused():
                chunk = list(itertools.islice(iterator, chunk_rows))
                if not chunk:
                    break
                table, keys, shard_ids, dead = _chunk_table(source, chunk, now, num_shards)
            # Every lease of the chunk before any write (in shard order, as every indexer takes them): a shard held
            # elsewhere fails the chunk (a sensor's tick) before it has written anything.
            touched = set(dead) | ({shard_key(int(i)) for i in np.unique(shard_ids)} if table is not None else set())
            for shard in sorted(touched):
                if only_shard is None or shard == only_shard:
                    load(shard)
            if table is not None:
                order = np.argsort(shard_ids, kind="stable")
                sorted_ids = shard_ids[order]
                table, keys = table.take(pa.array(order)), keys.take(pa.array(order))
                bounds = np.flatnonzero(np.diff(sorted_ids)) + 1
                for start, end in zip(np.r_[0, bounds], np.r_[bounds, len(sorted_ids)], strict=True):
                    shard = shard_key(int(sorted_ids[start]))
                    if only_shard is not None and shard != only_shard:
                        continue
                    rows, new, collisions = _new_rows(
                        table.slice(start, end - start),
                        keys.slice(start, end - start),
                        holds(shard),
                        functools.partial(holders, shard),
                    )
                    if collisions:
                        dead.setdefault(shard, []).extend(collisions)
                    if rows.num_rows:
                        writer.write(guarded[shard], layout.index_part_key(shard, rows["media_id"][0].as_py()), rows)
                        known[shard].append(new)
                        added[shard] += rows.num_rows
            for shard, letters in sorted(dead.items()):
                if only_shard is None or shard == only_shard:
                    recorded = _dead_letter(guarded[shard], shard, letters, holds(shard))
                    if recorded is not None:
                        known[shard].append(recorded)
    finally:
        try:
            writer.wait()
        finally:
            _release(leases)
    return dict(added)


def _release(leases: list[lease.Lease]) -> None:
    """Releases leases on a few threads: each is a few small writes with fsyncs (1000 shards one after another took
    seconds), and releasing, unlike taking, needs no order."""
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="index-lease") as pool:
        for future in [pool.submit(held.release) for held in leases]:
            future.result()


# What index_objects knows a shard holds: the ids of its index rows and of its media_index dead letters (16 bytes,
# not 32 hex chars), each with a fingerprint of what it identifies (``_fingerprints``): an index row's uri and
# version, or a dead letter's uri alone (``uri_only``: a dead letter has no version). The strings themselves are read
# back only to word an IdCollision (``_holders``).
KNOWN_SCHEMA = pa.schema([("media_id", pa.binary(16)), ("fingerprint", pa.uint64()), ("uri_only", pa.bool_())])
MEDIA_ID_PATTERN = "^[0-9a-f]{32}$"


def _known_of(out: ObjectStore, shard: str) -> pa.RecordBatch:
    """What a shard holds (KNOWN_SCHEMA), from its index and its media_index dead letters.

    An id that is not 32 lower-case hex chars is left out: no id the index computes or records can equal it.
    """
    index = layout.read_index(out, shard)
    dead = layout.read_dead_letters(out, "media_index", shard)
    sources = (
        (index["media_id"], index["uri"], pc.fill_null(index["version"], "")),
        (dead["item_id"], dead["uri"], None),
    )
    batches = [pa.RecordBatch.from_pylist([], schema=KNOWN_SCHEMA)]
    for ids, uris, versions in sources:
        if not len(ids):
            continue  # most shards, on a first run: their reads are all this costs
        ids, uris = ids.combine_chunks(), uris.combine_chunks()
        well_formed = pc.fill_null(pc.match_substring_regex(ids, MEDIA_ID_PATTERN), False)
        if not pc.all(well_formed).as_py():
            ids, uris = ids.filter(well_formed), uris.filter(well_formed)
            versions = None if versions is None else versions.filter(well_formed)
        batches.append(_known(_id_bytes(ids), uris, versions))
    return pa.concat_batches(batches)


def _known(ids: pa.Array, uris: pa.Array, versions: pa.Array | None) -> pa.RecordBatch:
    """KNOWN_SCHEMA rows for ids (16 bytes each) with their uris and versions (None: dead letters, by uri alone)."""
    return pa.RecordBatch.from_arrays(
        [ids, pa.array(_fingerprints(uris, versions)), pa.repeat(pa.scalar(versions is None), len(ids))],
        schema=KNOWN_SCHEMA,
    )


def _fingerprints(uris: pa.Array | pa.ChunkedArray, versions: pa.Array | pa.ChunkedArray | None) -> np.ndarray:
    """64-bit hashes of (uri, version) pairs, or of uris alone (``versions`` None), vectorized.

    Equal inputs give equal fingerprints, so a known id whose fingerprint differs from a listed object's names another
    object: a collision, found without keeping every uri in memory. Never stored: they are compared within this process
    only (polars promises the same hashes only within one of its versions).
    """
    # Imported here: every process importing the stages package (pool workers too) would otherwise load polars.
    import polars as pl

    if versions is None:
        return pl.Series("uri", uris).hash(seed=_SEED).to_numpy()
    return pl.DataFrame({"uri": uris, "version": versions}).hash_rows(seed=_SEED).to_numpy()


_SEED = 0x5EED
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
_NIBBLES = np.full(256, 16, np.uint8)  # the value of each lower-case hex digit; 16 for any other byte
_NIBBLES[_HEX_DIGITS] = np.arange(16, dtype=np.uint8)


def _id_bytes(ids: pa.Array) -> pa.Array:
    """Media ids (32 lower-case hex chars each) as their 16 bytes: the form ``known`` holds them in (half the size)."""
    n = len(ids)
    if n == 0:
        return pa.array([], pa.binary(16))
    offsets = np.frombuffer(ids.buffers()[1], np.int32)[ids.offset : ids.offset + n + 1]
    nibbles = _NIBBLES[np.frombuffer(ids.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]]
    if ids.null_count or not (np.diff(offsets) == 32).all() or (nibbles > 15).any():
        raise ValueError("media ids must be 32 lower-case hex chars")
    raw = nibbles[0::2] << 4 | nibbles[1::2]
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n, [None, pa.py_buffer(raw)])


def _hex(digests: pa.Array) -> pa.Array:
    """16-byte digests as 32 lower-case hex chars each (``hexdigest`` for a whole chunk at once)."""
    chars = binascii.hexlify(digests.buffers()[1][digests.offset * 16 : (digests.offset + len(digests)) * 16])
    offsets = np.arange(0, len(chars) + 1, 32, dtype=np.int32)
    return pa.StringArray.from_buffers(len(digests), pa.py_buffer(offsets), pa.py_buffer(chars))


def _new_rows(
    rows: pa.Table, keys: pa.RecordBatch, known: pa.RecordBatch, holders: Callable[[list[str]], dict]
) -> tuple[pa.Table, pa.RecordBatch, list[DeadLetterRow]]:
    """The rows of one shard's slice that the shard does not hold yet (first occurrence of each id only: a manifest
    may repeat a uri) with their KNOWN_SCHEMA ``keys``, and dead letters for rows whose id the shard (or an earlier
    row of the slice) gives to another uri or version. ``holders`` reads back the uri and version the shard gives
    ids, to word a collision."""
    n = rows.num_rows
    ids, uris, versions = rows["media_id"], rows["uri"], rows["version"]  # read only where a row is not new
    at = pc.fill_null(pc.index_in(keys.column("media_id"), value_set=known.column("media_id")), -1).to_numpy()
    seen = at >= 0
    collides_known = np.zeros(n, dtype=bool)
    if seen.any():
        holder = pa.array(at[seen])
        fingerprints = keys.column("fingerprint").to_numpy()[seen]
        # A dead letter matches on its uri alone.
        uri_only = known.column("uri_only").take(holder).to_numpy(zero_copy_only=False)
        if uri_only.any():
            fingerprints = np.where(uri_only, _fingerprints(uris.filter(pa.array(seen)), None), fingerprints)
        collides_known[seen] = known.column("fingerprint").take(holder).to_numpy() != fingerprints
    first = pc.index_in(keys.column("media_id"), value_set=keys.column("media_id")).to_numpy()
    is_first = first == np.arange(n)
    collides_first = np.zeros(n, dtype=bool)
    if not is_first.all():
        same_as_first = pc.and_(
            pc.equal(uris, uris.take(pa.array(first))), pc.equal(versions, versions.take(pa.array(first)))
        )
        collides_first = ~seen & ~same_as_first.to_numpy(zero_copy_only=False)
    collisions = []
    colliding = np.flatnonzero(collides_known | collides_first)
    taken = holders([ids[i].as_py() for i in colliding if collides_known[i]]) if collides_known.any() else {}
    for i in colliding:
        uri, version, media = uris[i].as_py(), versions[i].as_py(), ids[i].as_py()
        other_uri, other_version = (
            taken[media] if collides_known[i] else (uris[first[i]].as_py(), versions[first[i]].as_py())
        )
        message = (
            f"media_index: {uri!r} (version {version!r}) has media id {media}, which the shard already gives to "
            f"{other_uri!r} (version {other_version!r}); it is not indexed. Two objects with one 128-bit id cannot "
            "happen by chance: report it"
        )
        # Its own id (the colliding one is taken), from another hash domain: recorded once however often it is listed.
        raw = uri.encode("utf-8") + b"\0" + version.encode("utf-8")
        item = blake2b(raw, digest_size=16, person=b"IdCollision").hexdigest()
        collisions.append(layout.dead_letter(item, uri, "media_index", "IdCollision", message))
    fresh = ~seen & is_first
    if fresh.all():  # a first listing: no copy
        return rows, keys, collisions
    return rows.filter(pa.array(fresh)), keys.filter(pa.array(fresh)), collisions


def _holders(out: ObjectStore, shard: str, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """The uri and version (None for a dead letter, which has none) that the shard gives each of these ids, read
    back from its index and dead letters: only a collision needs them, and 128-bit ids make one all but impossible."""
    wanted = pa.array(ids, pa.string())
    dead = layout.read_dead_letters(out, "media_index", shard)
    found = {
        row["item_id"]: (row["uri"], None)
        for row in dead.filter(pc.is_in(dead["item_id"], value_set=wanted)).select(["item_id", "uri"]).to_pylist()
    }
    index = layout.read_index(out, shard)
    index = index.filter(pc.is_in(index["media_id"], value_set=wanted)).select(["media_id", "uri", "version"])
    found.update({row["media_id"]: (row["uri"], row["version"] or "") for row in index.to_pylist()})
    return found


def _dead_letter(
    out: ObjectStore, shard: str, letters: list[DeadLetterRow], known: pa.RecordBatch
) -> pa.RecordBatch | None:
    """Records a shard's dead letters of one chunk in one append, each item once (a re-listing adds nothing); returns
    what the shard holds now that it did not (KNOWN_SCHEMA), None when nothing was recorded."""
    ids_given = _id_bytes(pa.array([row.item_id for row in letters], pa.string()))
    recorded = pc.is_in(ids_given, value_set=known.column("media_id")).to_pylist()
    new, ids = [], set()
    for row, already in zip(letters, recorded, strict=True):
        if not already and row.item_id not in ids:
            new.append(row)
            ids.add(row.item_id)
    if not new:
        return None
    layout.append_dead_letters(out, "media_index", shard, new)
    new_ids = _id_bytes(pa.array([r.item_id for r in new], pa.string()))
    return _known(new_ids, pa.array([r.uri for r in new], pa.string()), None)


class _BackgroundWriter:
    """Writes Parquet parts on two threads (encoding, upload and fsync release the GIL), so they overlap the next
    chunk's Python work (10M objects: 122 s -> 95 s); at most ``max_pending`` parts wait in memory, and the first
    failure is raised."""

    def __init__(self, max_pending: int = 256) -> None:
        self._max = max_pending
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="index-writer")
        self._pending: set[Future] = set()

    def write(self, out: ObjectStore, key: str, table: pa.Table) -> None:
        if len(self._pending) >= self._max:
            done, self._pending = wait(self._pending, return_when=FIRST_COMPLETED)
            for future in done:
                future.result()
        self._pending.add(self._pool.submit(write_table, out, key, table))

    def flush(self) -> None:
        """Waits until every part submitted is written."""
        done, self._pending = wait(self._pending).done, set()
        for future in done:
            future.result()

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
) -> tuple[pa.Table | None, pa.RecordBatch | None, np.ndarray | None, dict[str, list[DeadLetterRow]]]:
    """One chunk of listed objects as an index table with each row's KNOWN_SCHEMA keys and shard number, and dead
    letters by shard for the entries that cannot be indexed (unsafe names, listing problems)."""
    keys = [info.key for info in chunk]
    key_array = pa.array(keys, pa.string())
    unsafe = source.unsafe_keys(key_array).to_numpy(zero_copy_only=False)
    prefix = source.root_uri.rstrip("/") + "/"
    dead: dict[str, list[DeadLetterRow]] = {}
    if unsafe.any() or any(info.problem for info in chunk):
        bad = [bool(u or info.problem) for u, info in zip(unsafe, chunk, strict=True)]
        for info, is_bad in zip(chunk, bad, strict=True):
            if is_bad:
                uri = prefix + info.key
                row = _name_dead_letter(source, uri, info)
                dead.setdefault(shard_of(uri, num_shards), []).append(row)
        chunk = [info for info, is_bad in zip(chunk, bad, strict=True) if not is_bad]
        keys = [info.key for info in chunk]
        key_array = pa.array(keys, pa.string())
    if not keys:
        return None, None, None, dead
    # The only per-object Python: the uri, its shard's hash (partitions.uri_digest, inlined: a call per object costs)
    # and its id's.
    encoded = [(prefix + key).encode("utf-8") for key in keys]
    versions = [info.version for info in chunk]
    digests = b"".join([blake2b(uri, digest_size=8).digest() for uri in encoded])
    shard_ids = np.frombuffer(digests, dtype=">u8") % num_shards
    ids = _media_id_digests(encoded, versions)
    table = pa.table(
        {
            "media_id": _hex(ids),
            "uri": pc.binary_join_element_wise(prefix, key_array, ""),
            "key": key_array,
            "size": [info.size for info in chunk],
            "mtime": [info.mtime for info in chunk],
            "extension": _extensions(keys),
            "discovered_at": pa.repeat(pa.scalar(now, MEDIA_SCHEMA.field("discovered_at").type), len(keys)),
            "version": versions,
        },
        schema=MEDIA_SCHEMA,
    )
    return table, _known(ids, table["uri"], table["version"]), shard_ids, dead


def _media_id_digests(uris: list[bytes], versions: list[str]) -> pa.Array:
    """The media ids of encoded uris at their versions, as 16 bytes each (``partitions.media_id_bytes``, inlined)."""
    digests = b"".join(
        [
            blake2b(b"%d:%s%s" % (len(uri), uri, version.encode("utf-8")), digest_size=16).digest()
            for uri, version in zip(uris, versions, strict=True)
        ]
    )
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(uris), [None, pa.py_buffer(digests)])


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
