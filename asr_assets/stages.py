"""The per-shard work of each CPU and teacher stage, as plain functions (the assets only wrap them).

Every stage is incremental: it reads its upstream table and its own outcomes (results + dead letters), processes only
the items without an outcome, and checkpoints as it goes, so a re-run after new arrivals or a crash does only the
missing work and a re-run with nothing new writes nothing.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from hashlib import blake2b
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import soundfile as sf

from asr_assets import dnsmos, layout
from asr_assets.media import DecodeJob, DecodeResult, decode_media, read_audio
from asr_assets.pool import PoolOutcome, run_pool
from asr_assets.records import (
    AUDIO_SCHEMA,
    FEATURE_SCHEMA,
    MEDIA_SCHEMA,
    MEL_SCHEMA,
    SAMPLE_RATE,
    SEGMENT_SCHEMA,
    TRANSCRIPT_SCHEMA,
    VAD_MEDIA_SCHEMA,
    AudioRow,
    DeadLetterRow,
    FeatureRow,
    TranscriptRow,
    VadMediaRow,
    to_table,
)
from asr_assets.second_opinion import SecondOpinion, SecondOpinionStats, disagreement, is_sampled
from asr_assets.segments import CutJob, Measured, SegmentSpan, cut_and_measure
from asr_assets.vad import VadItem, VadJob, VadParams, detect_speech, model_sha256
from partitions import shard_key, uri_digest
from resources.storage import (
    ObjectInfo,
    ObjectStore,
    StorageAuthError,
    UnsafeKeyError,
    is_out_of_space,
    read_table,
    write_table,
)
from resources.teachers.base import (
    EngineCallFailed,
    TeacherBroken,
    TeacherEngine,
    TeacherError,
    TeacherInput,
    TeacherOutput,
)

log = logging.getLogger(__name__)


@dataclass
class StageReport:
    """What one stage run did on one shard; the asset turns it into Dagster metadata.

    Attributes:
        processed: items this run gave an outcome to.
        succeeded: of those, how many succeeded.
        failed: of those, how many were dead-lettered.
        errors: failures by error kind.
        audio_s: seconds of audio this run handled.
        seconds: wall time of the run.
        totals: whole-shard counts after the run (what the shard holds now).
        outputs: keys written.
    """

    processed: int = 0
    succeeded: int = 0
    failed: int = 0
    errors: Counter = field(default_factory=Counter)
    audio_s: float = 0.0
    seconds: float = 0.0
    totals: dict[str, float | int | str] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    def merge(self, other: StageReport) -> None:
        """Adds another shard's report (a run over several shards); totals stay per shard, so they are dropped."""
        self.processed += other.processed
        self.succeeded += other.succeeded
        self.failed += other.failed
        self.errors.update(other.errors)
        self.audio_s += other.audio_s
        self.seconds += other.seconds
        self.outputs.extend(other.outputs)

    def fail(self, kind: str) -> None:
        self.processed += 1
        self.failed += 1
        self.errors[kind] += 1

    def ok(self, audio_s: float = 0.0) -> None:
        self.processed += 1
        self.succeeded += 1
        self.audio_s += audio_s


@dataclass(frozen=True)
class PoolSettings:
    """Worker processes and per-item limits for a CPU stage."""

    workers: int
    timeout_s: float
    checkpoint_every: int = 200


def _ids(table: pa.Table, column: str) -> set[str]:
    return set(table.column(column).to_pylist())


def _error_of(outcome: PoolOutcome) -> tuple[str, str]:
    exc = outcome.error
    assert exc is not None
    return getattr(exc, "kind", type(exc).__name__), str(exc)


# --------------------------------------------------------------------------------------------------------- media_index


INDEX_CHUNK_ROWS = 1_000_000


def index_objects(
    source: ObjectStore,
    out: ObjectStore,
    objects: Iterable[ObjectInfo],
    num_shards: int,
    only_shard: str | None = None,
    chunk_rows: int = INDEX_CHUNK_ROWS,
) -> dict[str, int]:
    """Appends listed objects that are not indexed yet to their shards' index; returns new rows per shard.

    Every object is indexed whatever its extension (``audio_wav`` decides by content and dead-letters what is not
    media), except hidden files, which listings skip. An object whose name cannot be a safe key (control characters)
    is dead-lettered under ``media_index``, so it too ends with a recorded outcome.

    Scales to tens of millions of objects: the listing is consumed in chunks of ``chunk_rows``, each chunk adds one
    Parquet part per shard it touches (nothing is rewritten), and deduplication against what a shard already holds
    is vectorized over its media ids, so memory stays flat whatever the listing's size.

    Args:
        source: the store the objects were listed from.
        out: the output store.
        objects: listed objects (a full listing, the part after a sensor's cursor, or a manifest's rows).
        num_shards: the dataset's shard count.
        only_shard: index only this shard's objects (the asset works shard by shard).
        chunk_rows: objects per chunk.
    """
    now = datetime.now(UTC)
    known: dict[str, pa.Array] = {}  # media ids per shard touched, loaded once
    parts: dict[str, int] = {}  # next part number per shard
    added: Counter = Counter()
    iterator = iter(objects)
    writer = _BackgroundWriter(out)

    def load(shard: str) -> None:
        if shard not in known:
            index = layout.read_index(out, shard)
            dead_ids = layout.read_dead_letters(out, "media_index", shard)["item_id"]
            known[shard] = pa.concat_arrays([index["media_id"].combine_chunks(), dead_ids.combine_chunks()])
            parts[shard] = sum(1 for _ in out.list(layout.index_prefix(shard)))

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
                    writer.write(layout.index_part_key(shard, parts[shard]), rows)
                    parts[shard] += 1
                    known[shard] = pa.concat_arrays([known[shard], rows["media_id"].combine_chunks()])
                    added[shard] += rows.num_rows
    finally:
        writer.wait()
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


# ----------------------------------------------------------------------------------------------------------- audio_wav


@dataclass(frozen=True)
class DecodeSettings:
    """Limits for decoding. Files over ``max_bytes`` or ``max_duration_s`` are dead-lettered, not decoded."""

    max_bytes: int
    max_duration_s: float


def decode_shard(
    source: ObjectStore, out: ObjectStore, shard: str, settings: DecodeSettings, pool: PoolSettings
) -> StageReport:
    """Decodes every indexed media object without an outcome to ``audio_wav/{shard}/{media_id}.flac``."""
    started = time.perf_counter()
    report = StageReport()
    index = layout.read_index(out, shard)
    manifest = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    # Dead letters count as outcomes too: they are written first, so a crash between the two writes must not make an
    # item run again (and perhaps end both decoded and dead-lettered).
    done = _ids(manifest, "media_id") | _ids(layout.read_dead_letters(out, "audio_wav", shard), "item_id")
    todo = [r for r in index.to_pylist() if r["media_id"] not in done]
    scratch = out.scratch_dir()
    rows: list[AudioRow] = []
    dead: list[DeadLetterRow] = []

    def jobs() -> Iterator[DecodeJob]:
        for row in todo:
            try:
                src = source.local_path(row["key"])
            except Exception as exc:  # unreadable object (missing, refused, unsafe): this item's outcome only
                if is_out_of_space(exc) or isinstance(exc, StorageAuthError):
                    raise  # a full cache disk or refused credentials: the step's failure, not the file's
                message = f"audio_wav: media {row['media_id']} ({row['uri']}): cannot fetch it: {exc}"
                rows.append(_audio_row_failed(row, "FetchError", message))
                dead.append(layout.dead_letter(row["media_id"], row["uri"], "audio_wav", "FetchError", message))
                report.fail("FetchError")
                continue
            yield DecodeJob(
                media_id=row["media_id"],
                uri=row["uri"],
                src=src,
                dst=scratch / f"{shard}-{row['media_id']}.flac",
                max_bytes=settings.max_bytes,
                max_duration_s=settings.max_duration_s,
            )

    def flush() -> None:
        nonlocal manifest
        if rows:
            manifest = pa.concat_tables([manifest, to_table(rows, AUDIO_SCHEMA)])
            layout.append_dead_letters(out, "audio_wav", shard, dead)
            write_table(out, layout.audio_manifest_key(shard), manifest)
            rows.clear()
            dead.clear()

    for outcome in run_pool(decode_media, jobs(), workers=pool.workers, timeout_s=pool.timeout_s):
        job: DecodeJob = outcome.job
        result: DecodeResult | None = outcome.result
        if result is not None and result.error_class is None:
            key = layout.audio_key(shard, job.media_id)
            out.put_file(key, job.dst)
            rows.append(_audio_row(job, result, "decoded", key))
            report.ok(result.duration_s or 0.0)
        else:
            job.dst.unlink(missing_ok=True)
            if result is None:
                kind, message = _error_of(outcome)
                message = f"audio_wav: media {job.media_id} ({job.uri}): {message}"
                result = DecodeResult(job.media_id, "unknown", kind, message)
            rows.append(_audio_row(job, result, "failed", None))
            dead.append(layout.dead_letter(job.media_id, job.uri, "audio_wav", result.error_class, result.error))
            report.fail(result.error_class)
        if len(rows) >= pool.checkpoint_every:
            flush()
    flush()
    if report.processed:
        report.outputs.append(layout.audio_manifest_key(shard))
    statuses = Counter(manifest["status"].to_pylist())
    report.totals = {
        "media": index.num_rows,
        "decoded": statuses["decoded"],
        "failed": statuses["failed"],
        "hours": (pc.sum(manifest["duration_s"]).as_py() or 0.0) / 3600,
    }
    report.seconds = time.perf_counter() - started
    return report


def _audio_row_failed(row: dict, kind: str, message: str) -> AudioRow:
    return AudioRow(
        row["media_id"], row["uri"], "failed", None, None, "unknown", None, None, None, None, kind, message, 0.0
    )


def _audio_row(job: DecodeJob, result: DecodeResult, status: str, key: str | None) -> AudioRow:
    return AudioRow(
        media_id=job.media_id,
        uri=job.uri,
        status=status,
        audio_key=key,
        duration_s=result.duration_s if status == "decoded" else None,
        detected_format=result.detected_format,
        container=result.container,
        codec=result.codec,
        source_sample_rate=result.source_sample_rate,
        source_channels=result.source_channels,
        error_class=result.error_class,
        error=result.error,
        seconds=result.seconds,
    )


# -------------------------------------------------------------------------------------------------------- vad_segments


@dataclass(frozen=True)
class GroupSettings:
    """Small files are grouped into one worker job (fewer round trips); a group holds at most ``max_items`` files and
    ``max_audio_s`` seconds of audio (bounding a worker's memory); a longer file forms a group of its own."""

    max_items: int = 8
    max_audio_s: float = 1800.0


def _groups(rows: list[dict], settings: GroupSettings) -> Iterator[list[dict]]:
    group: list[dict] = []
    audio_s = 0.0
    for row in rows:
        duration = row["duration_s"] or 0.0
        if group and (len(group) >= settings.max_items or audio_s + duration > settings.max_audio_s):
            yield group
            group, audio_s = [], 0.0
        group.append(row)
        audio_s += duration
    if group:
        yield group


def vad_shard(
    out: ObjectStore,
    shard: str,
    params: VadParams,
    model_path: Path,
    pool: PoolSettings,
    grouping: GroupSettings | None = None,
) -> StageReport:
    """Runs Silero VAD on every decoded media object without a VAD outcome and appends its segments.

    When a whole group fails (a worker timed out or died), its files are run again one per job, so only the file that
    caused it is dead-lettered.
    """
    started = time.perf_counter()
    report = StageReport()
    audio = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    decoded = audio.filter(pc.equal(audio["status"], "decoded"))
    media = read_table(out, layout.vad_media_key(shard), VAD_MEDIA_SCHEMA)
    segments = read_table(out, layout.segments_key(shard), SEGMENT_SCHEMA)
    # Segments are written before the media outcomes that vouch for them: segments of media without an outcome are
    # left over from a crash between the two writes, and their media runs again.
    segments = segments.filter(pc.is_in(segments["media_id"], value_set=media["media_id"]))
    done = _ids(media, "media_id") | _ids(layout.read_dead_letters(out, "vad_segments", shard), "item_id")
    columns = ["media_id", "uri", "audio_key", "duration_s"]
    todo = [r for r in decoded.select(columns).to_pylist() if r["media_id"] not in done]
    uris = {r["media_id"]: r["uri"] for r in todo}

    def job(rows: list[dict]) -> VadJob:
        items = tuple(VadItem(r["media_id"], out.local_path(r["audio_key"])) for r in rows)
        return VadJob(items, params, model_path)

    media_rows: list[VadMediaRow] = []
    segment_rows: list = []
    dead: list[DeadLetterRow] = []

    def flush() -> None:
        nonlocal media, segments
        if media_rows or dead:
            segments = pa.concat_tables([segments, to_table(segment_rows, SEGMENT_SCHEMA)])
            media = pa.concat_tables([media, to_table(media_rows, VAD_MEDIA_SCHEMA)])
            layout.append_dead_letters(out, "vad_segments", shard, dead)
            write_table(out, layout.segments_key(shard), segments)  # segments before the media outcomes that vouch
            write_table(out, layout.vad_media_key(shard), media)
            media_rows.clear()
            segment_rows.clear()
            dead.clear()

    def record(outcome: PoolOutcome, retry: list[VadJob]) -> None:
        batch: VadJob = outcome.job
        if outcome.result is None:
            if len(batch.items) > 1:
                retry.extend(VadJob((item,), params, model_path) for item in batch.items)
                return
            kind, message = _error_of(outcome)
            media_id = batch.items[0].media_id
            message = f"vad_segments: media {media_id} ({uris[media_id]}): {message}"
            dead.append(layout.dead_letter(media_id, uris[media_id], "vad_segments", kind, message))
            report.fail(kind)
            return
        for result in outcome.result:
            if result.error_class is not None:
                dead.append(
                    layout.dead_letter(
                        result.media_id, uris[result.media_id], "vad_segments", result.error_class, result.error
                    )
                )
                report.fail(result.error_class)
                continue
            speech_s = sum(s.end_s - s.start_s for s in result.segments)
            media_rows.append(VadMediaRow(result.media_id, result.duration_s, speech_s, len(result.segments)))
            segment_rows.extend(result.segments)
            report.ok(result.duration_s)

    jobs: Iterable[VadJob] = (job(rows) for rows in _groups(todo, grouping or GroupSettings()))
    while True:
        retry: list[VadJob] = []
        for outcome in run_pool(detect_speech, jobs, workers=pool.workers, timeout_s=pool.timeout_s):
            record(outcome, retry)
            if len(media_rows) + len(dead) >= pool.checkpoint_every:
                flush()
        if not retry:
            break
        jobs = retry
    flush()
    if report.processed:
        report.outputs += [layout.segments_key(shard), layout.vad_media_key(shard)]
    report.totals = {
        "media": media.num_rows,
        "segments": segments.num_rows,
        "speech_hours": (pc.sum(media["speech_s"]).as_py() or 0.0) / 3600,
        "audio_hours": (pc.sum(media["duration_s"]).as_py() or 0.0) / 3600,
        "vad_model_sha256": model_sha256(model_path),
    }
    report.seconds = time.perf_counter() - started
    return report


# ---------------------------------------------------------------------------------------------------- segment_features


@dataclass(frozen=True)
class PackSettings:
    """Packed segment audio: a new FLAC part starts once the current one holds ``part_max_s`` seconds."""

    part_max_s: float = 4 * 3600.0


class _PackWriter:
    """Appends segments to packed FLAC parts (and their log-mel features to a Parquet part beside each) in scratch
    space, and moves each finished part into the store."""

    def __init__(self, out: ObjectStore, shard: str, first_part: int, settings: PackSettings) -> None:
        self._out, self._shard, self._settings = out, shard, settings
        self._part = first_part
        self._file: sf.SoundFile | None = None
        self._mel: pq.ParquetWriter | None = None
        self._frames = 0
        self.written: list[str] = []

    def _scratch(self, key: str) -> Path:
        return self._out.scratch_dir() / key.replace("/", "-")

    @property
    def open_part_key(self) -> str | None:
        """The audio part being written (not yet in the store), if any."""
        return layout.packed_audio_key(self._shard, self._part) if self._file is not None else None

    def append(self, pcm, mel=None, segment_id: str = "") -> tuple[str, int, str | None]:
        """Appends one segment; returns its audio part key, frame offset and log-mel part key."""
        audio_key = layout.packed_audio_key(self._shard, self._part)
        mel_key = layout.mel_part_key(self._shard, self._part)
        if self._file is None:
            self._file = sf.SoundFile(
                self._scratch(audio_key), "w", samplerate=SAMPLE_RATE, channels=1, format="FLAC", subtype="PCM_16"
            )
            self._frames = 0
        offset = self._frames
        self._file.write(pcm)
        self._frames += pcm.shape[0]
        if mel is not None:
            if self._mel is None:
                self._mel = pq.ParquetWriter(self._scratch(mel_key), MEL_SCHEMA, compression="zstd")
            row = {
                "segment_id": [segment_id],
                "n_mels": [mel.shape[0]],
                "frames": [mel.shape[1]],
                "mel": [mel.astype("<f2").tobytes()],
            }
            self._mel.write_table(pa.table(row, schema=MEL_SCHEMA))
        if self._frames >= self._settings.part_max_s * SAMPLE_RATE:
            self.close()
        return audio_key, offset, mel_key if mel is not None else None

    def close(self) -> None:
        """Finishes the open part (if any) and moves it into the store."""
        if self._file is None:
            return
        self._file.close()
        audio_key = layout.packed_audio_key(self._shard, self._part)
        self._out.put_file(audio_key, self._scratch(audio_key))
        self.written.append(audio_key)
        if self._mel is not None:
            self._mel.close()
            mel_key = layout.mel_part_key(self._shard, self._part)
            self._out.put_file(mel_key, self._scratch(mel_key))
            self.written.append(mel_key)
        self._file, self._mel = None, None
        self._part += 1

    def abort(self) -> None:
        for handle in (self._file, self._mel):
            if handle is not None:
                handle.close()
        for key in (layout.packed_audio_key(self._shard, self._part), layout.mel_part_key(self._shard, self._part)):
            self._scratch(key).unlink(missing_ok=True)
        self._file, self._mel = None, None


def features_shard(
    out: ObjectStore,
    shard: str,
    pack: PackSettings,
    pool: PoolSettings,
    mel_bins: int = 0,
    dnsmos_fraction: float = 0.0,
) -> StageReport:
    """Cuts and measures every segment without a feature row, packing its audio into the shard's FLAC parts (and,
    with ``mel_bins`` 80 or 128, its Whisper log-mel features into Parquet parts beside them). A ``dnsmos_fraction``
    of the segments, chosen by a hash of their id, is scored with DNSMOS; rows already written keep their scores.

    Checkpoints as each part is finished: feature rows are written only after the part they point into is in the
    store, so a crash loses at most the open part's work and leaves an unreferenced part that the re-run overwrites.
    """
    started = time.perf_counter()
    report = StageReport()
    # Checked here, not in the workers: a missing model is a broken install, not a reason to dead-letter every item.
    dnsmos_sha = dnsmos.model_sha256() if dnsmos_fraction > 0 else None
    segments = read_table(out, layout.segments_key(shard), SEGMENT_SCHEMA)
    features = read_table(out, layout.features_key(shard), FEATURE_SCHEMA)
    dead_table = layout.read_dead_letters(out, "segment_features", shard)
    done = _ids(features, "segment_id") | _ids(dead_table, "item_id")
    audio = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    audio_keys = dict(zip(audio["media_id"].to_pylist(), audio["audio_key"].to_pylist(), strict=True))
    uris = dict(zip(audio["media_id"].to_pylist(), audio["uri"].to_pylist(), strict=True))

    by_media: dict[str, list[SegmentSpan]] = {}
    for row in segments.to_pylist():
        if row["segment_id"] not in done:
            by_media.setdefault(row["media_id"], []).append(
                SegmentSpan(row["segment_id"], row["start_s"], row["end_s"], row["prob_mean"], row["prob_min"])
            )
    jobs = (
        CutJob(mid, out.local_path(audio_keys[mid]), tuple(spans), mel_bins, dnsmos_fraction)
        for mid, spans in by_media.items()
    )
    parts = set(features["audio_key"].to_pylist())
    writer = _PackWriter(out, shard, first_part=len(parts), settings=pack)
    rows: list[FeatureRow] = []
    dead: list[DeadLetterRow] = []

    def flush(final: bool) -> None:
        """Checkpoint: dead letters, then the feature rows whose packed part is already in the store."""
        nonlocal features
        still_open = None if final else writer.open_part_key
        ready = [r for r in rows if r.audio_key != still_open]
        if not ready and not dead:
            return
        layout.append_dead_letters(out, "segment_features", shard, dead)
        dead.clear()
        features = pa.concat_tables([features, to_table(ready, FEATURE_SCHEMA)])
        write_table(out, layout.features_key(shard), features)
        rows[:] = [r for r in rows if r.audio_key == still_open]

    closed_parts = 0
    try:
        for outcome in run_pool(cut_and_measure, jobs, workers=pool.workers, timeout_s=pool.timeout_s):
            job: CutJob = outcome.job
            measured: list[Measured] | None = outcome.result
            if measured is None:
                kind, message = _error_of(outcome)
                message = f"segment_features: media {job.media_id} ({uris[job.media_id]}): {message}"
                for span in job.spans:
                    dead.append(
                        layout.dead_letter(span.segment_id, uris[job.media_id], "segment_features", kind, message)
                    )
                    report.fail(kind)
                continue
            for m in measured:
                key, offset, mel_key = writer.append(m.pcm, m.mel, m.span.segment_id)
                rows.append(_feature_row(job.media_id, m, key, offset, mel_key))
                report.ok(m.pcm.shape[0] / SAMPLE_RATE)
            if len(writer.written) > closed_parts or len(dead) >= pool.checkpoint_every:
                closed_parts = len(writer.written)
                flush(final=False)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    flush(final=True)
    if report.processed:
        report.outputs += [*writer.written, layout.features_key(shard)]
    report.totals = {
        "segments": segments.num_rows,
        "featured": features.num_rows,
        "hours": (pc.sum(features["duration_s"]).as_py() or 0.0) / 3600,
        "dnsmos_scored": features.num_rows - features["dnsmos_ovrl"].null_count,
    }
    if dnsmos_sha is not None:
        report.totals["dnsmos_model_sha256"] = dnsmos_sha
    report.seconds = time.perf_counter() - started
    return report


def _feature_row(media_id: str, m: Measured, key: str, offset: int, mel_key: str | None) -> FeatureRow:
    return FeatureRow(
        segment_id=m.span.segment_id,
        media_id=media_id,
        start_s=m.span.start_s,
        end_s=m.span.end_s,
        duration_s=m.pcm.shape[0] / SAMPLE_RATE,
        rms_dbfs=m.rms_dbfs,
        peak_dbfs=m.peak_dbfs,
        clip_ratio=m.clip_ratio,
        snr_db=m.snr_db,
        prob_mean=m.span.prob_mean,
        prob_min=m.span.prob_min,
        audio_key=key,
        audio_offset=offset,
        audio_frames=m.pcm.shape[0],
        mel_key=mel_key,
        dnsmos_sig=None if m.dnsmos is None else m.dnsmos.sig,
        dnsmos_bak=None if m.dnsmos is None else m.dnsmos.bak,
        dnsmos_ovrl=None if m.dnsmos is None else m.dnsmos.ovrl,
    )


# --------------------------------------------------------------------------------------------------------- transcripts


@dataclass(frozen=True)
class TranscribeSettings:
    """Feeding the teacher: segments are read in waves (bounded host memory), sorted by duration within a wave, and
    each wave's results are written as one Parquet part (the resume checkpoint)."""

    wave_size: int = 256
    batch_size: int = 16
    language: str = "en"


def read_transcripts(out: ObjectStore, shard: str) -> pa.Table:
    """Every transcript part of a shard, concatenated."""
    tables = [read_table(out, info.key, TRANSCRIPT_SCHEMA) for info in out.list(layout.transcripts_prefix(shard))]
    return pa.concat_tables(tables) if tables else TRANSCRIPT_SCHEMA.empty_table()


def transcribe_shard(
    out: ObjectStore,
    shard: str,
    engine: Callable[[], TeacherEngine],
    settings: TranscribeSettings,
    on_wave: Callable[[StageReport], None] | None = None,
    second: SecondOpinion | None = None,
) -> StageReport:
    """Labels every featured segment without a transcript or dead letter, writing one part per wave.

    With ``second``, an independent engine also labels the sampled segments of each batch the teacher labelled; its
    text and disagreement go into the same rows (so into the same checkpoint part). A segment the second engine fails
    on keeps the teacher's label with null second-opinion columns.

    Args:
        out: output store.
        shard: partition key.
        engine: returns the loaded teacher (called only when there is work, so a no-op run loads nothing).
        settings: wave and batch sizes.
        on_wave: called after each wave is written (progress logging).
        second: the second opinion, if any (its engine is loaded only when a sampled segment has a label).
    """
    started = time.perf_counter()
    report = StageReport()
    features = read_table(out, layout.features_key(shard), FEATURE_SCHEMA)
    existing = read_transcripts(out, shard)
    done = _ids(existing, "segment_id") | _ids(layout.read_dead_letters(out, "transcripts", shard), "item_id")
    todo = features.filter(pc.invert(pc.is_in(features["segment_id"], value_set=pa.array(sorted(done), pa.string()))))
    # Storage order: each packed part is read front to back.
    todo = todo.sort_by([("audio_key", "ascending"), ("audio_offset", "ascending")]).to_pylist()
    index = layout.read_index(out, shard)
    uris = dict(zip(index["media_id"].to_pylist(), index["uri"].to_pylist(), strict=True))
    next_part = sum(1 for _ in out.list(layout.transcripts_prefix(shard)))
    teacher = engine() if todo else None
    second_engine: TeacherEngine | None = None
    stats = SecondOpinionStats()
    for wave in _chunks(todo, settings.wave_size):
        wave = sorted(wave, key=lambda r: r["audio_frames"])  # similar lengths batch together
        rows: list[TranscriptRow] = []
        dead: list[DeadLetterRow] = []
        for batch in _chunks(wave, settings.batch_size):
            inputs, ready = [], []
            for r in batch:
                try:
                    audio = read_audio(out.local_path(r["audio_key"]), r["audio_offset"], r["audio_frames"])
                except Exception as exc:  # a damaged part costs its segments, not the shard
                    if is_out_of_space(exc) or isinstance(exc, StorageAuthError):
                        raise  # the machine's or the credentials' failure, not the segment's
                    message = f"transcripts: segment {r['segment_id']}: cannot read its audio: {exc}"
                    dead.append(
                        layout.dead_letter(
                            r["segment_id"], uris.get(r["media_id"], ""), "transcripts", "UnreadableAudio", message
                        )
                    )
                    report.fail("UnreadableAudio")
                    continue
                inputs.append(TeacherInput(r["segment_id"], audio, settings.language))
                ready.append(r)
            results = _transcribe_checked(teacher, inputs)
            opinions: dict[str, tuple[str, str, float]] = {}
            if second is not None:
                sampled = [
                    (item, result)
                    for item, result in zip(inputs, results, strict=True)
                    if isinstance(result, TeacherOutput) and is_sampled(item.segment_id, second.fraction)
                ]
                if sampled:
                    second_engine = second_engine or second.engine()
                    opinions = _second_opinions(second_engine, sampled, stats)
            for row, result in zip(ready, results, strict=True):
                if isinstance(result, TeacherError):
                    dead.append(
                        layout.dead_letter(
                            row["segment_id"], uris.get(row["media_id"], ""), "transcripts", result.kind, str(result)
                        )
                    )
                    report.fail(result.kind)
                    continue
                rows.append(
                    TranscriptRow(
                        segment_id=row["segment_id"],
                        media_id=row["media_id"],
                        text=result.text,
                        language=result.language,
                        num_tokens=result.num_tokens,
                        avg_logprob=result.avg_logprob,
                        no_speech_prob=result.no_speech_prob,
                        compression_ratio=result.compression_ratio,
                        finish_reason=result.finish_reason,
                        model_id=teacher.model_id,
                        engine=teacher.name,
                        settings_hash=teacher.settings_hash,
                        prompt_version=teacher.prompt_version,
                        **_opinion_columns(opinions.get(row["segment_id"])),
                    )
                )
                report.ok(row["audio_frames"] / SAMPLE_RATE)
        # Dead letters first: a crash between the two writes re-labels nothing twice (the part is the commit).
        layout.append_dead_letters(out, "transcripts", shard, dead)
        if rows:
            key = layout.transcript_part_key(shard, next_part)
            write_table(out, key, to_table(rows, TRANSCRIPT_SCHEMA))
            report.outputs.append(key)
            next_part += 1
        if on_wave is not None:
            report.seconds = time.perf_counter() - started
            report.totals["pending"] = len(todo) - report.processed
            on_wave(report)
    report.totals = {"featured": features.num_rows, "transcribed": existing.num_rows + report.succeeded}
    if teacher is not None:
        report.totals.update({"model_id": teacher.model_id, "settings_hash": teacher.settings_hash})
    if second is not None:
        judged = existing["disagreement"].drop_null()
        count = len(judged) + stats.segments
        report.totals.update(stats.totals())
        report.totals["second_opinions"] = count  # whole shard
        if count:
            report.totals["mean_disagreement"] = ((pc.sum(judged).as_py() or 0.0) + stats.disagreement_sum) / count
    report.seconds = time.perf_counter() - started
    return report


def _second_opinions(
    engine: TeacherEngine, sampled: list[tuple[TeacherInput, TeacherOutput]], stats: SecondOpinionStats
) -> dict[str, tuple[str, str, float]]:
    """The second engine's text, model id and disagreement per segment id, for the sampled segments it labelled;
    failures are only counted (never raised, never dead-lettered: the teacher's label stands alone)."""
    started = time.perf_counter()
    results = _transcribe(engine, [item for item, _ in sampled])  # never raises: failures come back in their slots
    stats.seconds += time.perf_counter() - started
    opinions = {}
    for (item, label), result in zip(sampled, results, strict=True):
        if not isinstance(result, TeacherOutput):
            stats.failed += 1
            continue
        score = disagreement(label.text, result.text, label.language)
        opinions[item.segment_id] = (result.text, engine.model_id, score)
        stats.segments += 1
        stats.audio_s += len(item.audio) / SAMPLE_RATE
        stats.disagreement_sum += score
    return opinions


def _opinion_columns(opinion: tuple[str, str, float] | None) -> dict[str, str | float | None]:
    if opinion is None:
        return {"second_text": None, "second_model_id": None, "disagreement": None}
    text, model_id, score = opinion
    return {"second_text": text, "second_model_id": model_id, "disagreement": score}


def _transcribe(teacher: TeacherEngine, inputs: list[TeacherInput]) -> list:
    """The engine's results for a batch. When the whole call fails (an engine error, a wrong result count), the batch
    is split in halves and each half tried again, down to single segments: only segments that fail by themselves are
    dead-lettered, at about 2*log2(batch) extra calls per bad segment (vLLM batches of a thousand stay cheap)."""
    if not inputs:
        return []
    try:
        results = teacher.transcribe(inputs)
        if len(results) == len(inputs):
            return results
        problem = f"returned {len(results)} results"
    except Exception as exc:
        problem = f"failed ({type(exc).__name__}: {exc})"
    if len(inputs) == 1:
        return [EngineCallFailed(f"{teacher.name} {problem} on segment {inputs[0].segment_id}")]
    log.warning("teacher %s on a batch of %d; splitting it", problem, len(inputs))
    half = len(inputs) // 2
    return _transcribe(teacher, inputs[:half]) + _transcribe(teacher, inputs[half:])


def _transcribe_checked(teacher: TeacherEngine, inputs: list[TeacherInput]) -> list:
    """``_transcribe``, refusing to dead-letter a whole batch: when every segment of a batch of several failed on its
    own, the engine is what is broken (a dead GPU, a lost engine process), and the step fails instead."""
    results = _transcribe(teacher, inputs)
    if len(inputs) > 1 and all(isinstance(r, EngineCallFailed) for r in results):
        raise TeacherBroken(
            f"{teacher.name} failed on every one of {len(inputs)} segments, each tried alone ({results[0]}); "
            "nothing was dead-lettered: fix the engine and re-run the partition"
        )
    return results


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
