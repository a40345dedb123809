"""Deduplication across shards and the evaluation-set guard.

``segment_features`` stores each segment's sampled landmark fingerprints
(``segment_features/{shard}.fingerprints.parquet``). The
``audio_fingerprints`` asset adds every shard's new segments to one global index (a generation per run: sorted
``.npy`` parts under ``dedup/index/``, recomputing nothing already indexed) and decides which copy of a recording is
kept: the first indexed (lowest generation), then the smallest uri (then the earliest start), so the decision does not
depend on which shard ran first, and a copy once kept stays kept; a replaced object's older version
(``layout.retired_media``) is never kept. A later copy is recorded in
``dedup/duplicates-{generation}.parquet`` with the segment it duplicates, the similarity and the kind (``exact``: the
decoded audio is identical; ``contained_clip``: its file is a shorter piece of the other's; ``re_encode``: the same
audio otherwise: another codec, bitrate, gain or sample rate). Segments that match an evaluation set registered by
``eval_sets`` are recorded in ``dedup/eval_matches-{revision}.parquet`` (the one ``state.json`` names).

``transcripts`` skips segments already recorded there (no teacher time) and ``distilled_dataset`` drops them with
reason ``duplicate`` or ``eval_contamination``.
"""

from __future__ import annotations

import io
import json
import secrets
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asr_assets import fingerprint as fp
from asr_assets import layout, lease
from asr_assets.dedup_index import MIN_SIMILARITY, MIN_VOTES, FingerprintIndex, Hit, build_index_arrays, is_match
from asr_assets.records import AUDIO_SCHEMA, FEATURE_SCHEMA
from resources.storage import ObjectStore, read_table, write_table

DUPLICATE = "duplicate"
EVAL_CONTAMINATION = "eval_contamination"
KINDS = ("exact", "re_encode", "contained_clip")
CLIP_RATIO = 0.9  # a file under this share of the kept copy's duration is a clip of it
SKIPPED_FINISH = "skipped:"  # a transcript row's finish_reason prefix for segments never given to the teacher

INDEX_PREFIX = "dedup/index/"
# The global index's lease (``asr_assets.lease``) is kept under this pseudo-shard: one audio_fingerprints writer.
INDEX_LEASE_SHARD = "global"
STATE_KEY = "dedup/index/state.json"
EVAL_INDEX_KEY = "dedup/eval/index.parquet"
EVAL_MATCHES_KEY = "dedup/eval_matches.parquet"  # before matches were written per revision

FINGERPRINT_SCHEMA = pa.schema(
    [
        ("segment_id", pa.string()),
        ("media_id", pa.string()),
        ("start_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("hashes", pa.binary()),  # uint32 LE, the sampled landmarks of every query grid, grid by grid
        ("times", pa.binary()),  # uint32 LE frames (32 ms) on the media's timeline
        ("grid_sizes", pa.list_(pa.int32())),
    ]
)
# One row per indexed segment; its row number over all generations is its reference number in the index parts.
INDEXED_SCHEMA = pa.schema(
    [
        ("segment_id", pa.string()),
        ("media_id", pa.string()),
        ("shard", pa.string()),
        ("uri", pa.string()),
        ("start_s", pa.float64()),
        ("duration_s", pa.float64()),
        ("media_duration_s", pa.float64()),
        ("pcm_sha256", pa.string()),
        ("generation", pa.int32()),
    ]
)
DUPLICATES_SCHEMA = pa.schema(
    [
        ("segment_id", pa.string()),
        ("media_id", pa.string()),
        ("shard", pa.string()),
        ("duration_s", pa.float64()),
        ("duplicate_of", pa.string()),  # the kept segment
        ("duplicate_of_uri", pa.string()),
        ("similarity", pa.float32()),
        ("kind", pa.string()),
    ]
)
# The registered evaluation recordings: the sampled landmarks of each whole file on every query grid (the first grid
# is what segments are matched against; all of them look the file up in the global index), and their version.
EVAL_INDEX_SCHEMA = pa.schema(
    [
        ("eval_set", pa.string()),
        ("uri", pa.string()),
        ("duration_s", pa.float64()),
        ("hashes", pa.binary()),
        ("times", pa.binary()),
        ("grid_sizes", pa.list_(pa.int32())),
        ("fingerprint_version", pa.string()),
    ]
)
CANDIDATE_VOTES = 3  # an evaluation file's lookup in the index: fewer than MIN_VOTES, each candidate is verified
EVAL_MATCHES_SCHEMA = pa.schema(
    [
        ("segment_id", pa.string()),
        ("media_id", pa.string()),
        ("shard", pa.string()),
        ("uri", pa.string()),
        ("duration_s", pa.float64()),
        ("eval_set", pa.string()),
        ("eval_uri", pa.string()),
        ("similarity", pa.float32()),
    ]
)


def fingerprints_key(shard: str) -> str:
    return f"segment_features/{shard}.fingerprints.parquet"


def duplicates_key(generation: int) -> str:
    return f"{INDEX_PREFIX}duplicates-{generation:06d}.parquet"


def eval_matches_key(revision: int) -> str:
    """Written under the revision that changed it; ``state.json`` names the current one (its commit, like the rest)."""
    return f"dedup/eval_matches-{revision:06d}.parquet"


def read_eval_matches(out: ObjectStore, state: dict | None = None) -> pa.Table:
    """The training segments that match an evaluation set, as of the index's last committed run."""
    state = state or read_state(out)
    return read_table(out, state.get("eval_matches", EVAL_MATCHES_KEY), EVAL_MATCHES_SCHEMA)


def indexed_key(generation: int) -> str:
    return f"{INDEX_PREFIX}segments-{generation:06d}.parquet"


def part_key(generation: int, column: str) -> str:
    return f"{INDEX_PREFIX}part-{generation:06d}.{column}.npy"


def fingerprint_rows(measured: list, media_id: str) -> pa.Table:
    """The fingerprint rows of a worker's measured segments (``segments.Measured``)."""
    rows = [
        {
            "segment_id": m.span.segment_id,
            "media_id": media_id,
            "start_s": m.span.start_s,
            "duration_s": m.frames / fp.SAMPLE_RATE,
            "hashes": m.prints[0],
            "times": m.prints[1],
            "grid_sizes": m.prints[2],
        }
        for m in measured
        if m.prints is not None
    ]
    return pa.Table.from_pylist(rows, schema=FINGERPRINT_SCHEMA)


def append_fingerprints(out: ObjectStore, shard: str, new: pa.Table) -> None:
    """Adds rows to the shard's fingerprint table (a segment cut again replaces its row)."""
    if not new.num_rows:
        return
    table = read_table(out, fingerprints_key(shard), FINGERPRINT_SCHEMA)
    table = table.filter(pc.invert(pc.is_in(table["segment_id"], value_set=new["segment_id"])))
    write_table(out, fingerprints_key(shard), pa.concat_tables([table, new]))


def read_state(out: ObjectStore) -> dict:
    if not out.exists(STATE_KEY):
        return {"generations": 0, "eval_checked": [], "fingerprint_version": fp.VERSION, "fingerprints_seen": {}}
    return json.loads(out.read_bytes(STATE_KEY))


def _check_version(state: dict) -> None:
    """Landmarks of another fingerprint version never match these: an index built with them must be rebuilt."""
    version = state.get("fingerprint_version", "pair-v0")
    if state["generations"] and version != fp.VERSION:
        raise ValueError(
            f"the dedup index under {INDEX_PREFIX} holds {version} fingerprints, this code makes {fp.VERSION}: remove "
            "dedup/ (the index, the evaluation registry and its matches) and each shard's segment_features/{shard}"
            ".parquet with its .fingerprints.parquet (segments are fingerprinted when they are featured), then "
            "materialize segment_features, eval_sets and audio_fingerprints again"
        )


def _save_npy(out: ObjectStore, key: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    out.put_bytes(key, buf.getvalue())


def _load_part(out: ObjectStore, generation: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Memory-mapped from the local file (or the download cache): a large index is paged in, not loaded.
    return tuple(  # type: ignore[return-value]
        np.load(out.local_path(part_key(generation, c)), mmap_mode="r") for c in ("hashes", "refs", "times")
    )


def _concat(out: ObjectStore, keys: list[str], schema: pa.Schema) -> pa.Table:
    tables = [read_table(out, k, schema) for k in keys]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_indexed(out: ObjectStore, state: dict | None = None) -> pa.Table:
    state = state or read_state(out)
    return _concat(out, [indexed_key(g) for g in range(1, state["generations"] + 1)], INDEXED_SCHEMA)


def read_duplicates(out: ObjectStore, state: dict | None = None) -> pa.Table:
    state = state or read_state(out)
    return _concat(out, [duplicates_key(g) for g in range(1, state["generations"] + 1)], DUPLICATES_SCHEMA)


@dataclass
class IndexReport:
    """What one ``audio_fingerprints`` run did."""

    new_segments: int = 0
    generation: int = 0
    index_rows: int = 0
    duplicates: Counter = field(default_factory=Counter)
    duplicate_hours: Counter = field(default_factory=Counter)
    eval_matches: Counter = field(default_factory=Counter)  # matches this run added, by set
    touched_shards: list[str] = field(default_factory=list)  # shards whose dedup outcomes changed


def _media_info(out: ObjectStore, shard: str) -> dict[str, dict]:
    audio = read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    return {r["media_id"]: r for r in audio.select(["media_id", "uri", "duration_s", "pcm_sha256"]).to_pylist()}


def _new_rows(out: ObjectStore, shards: list[str], known: pa.Array) -> tuple[pa.Table, list[list[fp.Fingerprint]]]:
    """This run's segments (not indexed yet: not in ``known``) in keep-rule order (uri, then media, then start: two
    versions of one replaced object do not interleave), and their per-grid prints. Only the new rows become Python
    objects: the index may hold millions."""
    rows = []
    for shard in shards:
        table = read_table(out, fingerprints_key(shard), FINGERPRINT_SCHEMA)
        table = table.filter(pc.invert(pc.is_in(table["segment_id"], value_set=known)))
        if not table.num_rows:
            continue
        media = _media_info(out, shard)
        for r in table.to_pylist():
            if r["media_id"] not in media:
                continue
            m = media[r["media_id"]]
            rows.append((m["uri"], r["start_s"], shard, r, m))
    rows.sort(key=lambda x: (x[0], x[3]["media_id"], x[1], x[3]["segment_id"]))
    table = pa.Table.from_pylist(
        [
            {
                "segment_id": r["segment_id"],
                "media_id": r["media_id"],
                "shard": shard,
                "uri": uri,
                "start_s": start,
                "duration_s": r["duration_s"],
                "media_duration_s": m["duration_s"],
                "pcm_sha256": m["pcm_sha256"],
                "generation": 0,
            }
            for uri, start, shard, r, m in rows
        ],
        schema=INDEXED_SCHEMA,
    )
    prints = [fp.unpack_prints(r["hashes"], r["times"], r["grid_sizes"]) for _, _, _, r, _ in rows]
    return table, prints


def _ranked(index: FingerprintIndex, grids: list[fp.Fingerprint], allowed) -> list[Hit]:
    """The matching groups over the query's grids among those ``allowed`` accepts, best first."""
    found = [h for q in grids for h in index.hits(q, limit=16) if is_match(h) and allowed(h.ref)]
    return sorted(found, key=lambda h: (-h.votes, h.ref))


def _best(index: FingerprintIndex, grids: list[fp.Fingerprint], allowed) -> Hit | None:
    """The best matching group over the query's grids among those ``allowed`` accepts."""
    return next(iter(_ranked(index, grids, allowed)), None)


def _retired(out: ObjectStore, shards: list[str]) -> set[str]:
    """Media ids of replaced object versions (``layout.retired_media``) on these shards: never a kept copy."""
    return set().union(*(layout.retired_media(layout.read_index(out, shard)) for shard in shards))


def update_index(out: ObjectStore, shards: list[str], eval_sets: pa.Table | None = None) -> IndexReport:
    """Adds every shard's not-yet-indexed segments to the global index as a new generation, records which of them
    duplicate an earlier copy, and (re)checks segments against the evaluation sets. The state file is the commit:
    a run killed before it leaves files the next run overwrites."""
    report = IndexReport()
    state = read_state(out)
    _check_version(state)
    # Only shards whose fingerprint table changed since the last run are read (one listing says which): the work of a
    # run follows what is new, not how many shards there are.
    versions = {
        info.key: info.version
        for info in out.list("segment_features/")
        if info.key.endswith(".fingerprints.parquet") and not info.problem
    }
    seen = state.get("fingerprints_seen", {})
    changed = [
        s for s in shards if (v := versions.get(fingerprints_key(s))) is not None and (not v or v != seen.get(s))
    ]
    registered = [] if eval_sets is None else sorted([e["eval_set"], e["uri"]] for e in eval_sets.to_pylist())
    if not changed and registered == state.get("eval_checked", []) and state["generations"]:
        # Nothing new since the last run: no segment, no evaluation file registered or removed. Nothing more is read
        # (a transcripts step asks before every labelling run, on a GPU pod).
        report.generation, report.index_rows = state["generations"], state.get("index_rows", 0)
        return report
    indexed = read_indexed(out, state)
    duplicates = read_duplicates(out, state)
    new, prints = _new_rows(out, changed, indexed["segment_id"].combine_chunks())
    generation = state["generations"] + (1 if new.num_rows else 0)
    report.generation, report.new_segments = generation, new.num_rows
    parts = [_load_part(out, g) for g in range(1, state["generations"] + 1)]
    if new.num_rows:
        new = new.set_column(
            new.schema.get_field_index("generation"), "generation", pa.array([generation] * new.num_rows, pa.int32())
        )
        part = build_index_arrays([p[0] for p in prints], first_ref=indexed.num_rows)
        parts.append(part)
        for column, array in zip(("hashes", "refs", "times"), part, strict=True):
            _save_npy(out, part_key(generation, column), array)
    everything = pa.concat_tables([indexed, new])
    # Columns, not rows: the index may hold millions of segments; only this run's new ones become Python objects.
    # Votes are counted per media file on its timeline, so a query segment that straddles two of the other copy's
    # segments (VAD cut them elsewhere) still collects all its votes.
    encoded = pc.dictionary_encode(everything["media_id"]).combine_chunks()
    group = encoded.indices.to_numpy().astype(np.int64)
    # A replaced version is never kept: its newer version (same uri, another media id) would become its duplicate.
    retired = _retired(out, sorted(set(shards) | set(everything["shard"].to_pylist())))
    keepable = ~pc.is_in(encoded.dictionary, value_set=pa.array(sorted(retired), pa.string())).to_numpy(False)
    _, first_of_group = np.unique(group, return_index=True)  # first appearance = keep-rule order of the files
    members = np.argsort(group, kind="stable")
    bounds = np.searchsorted(group[members], np.arange(len(first_of_group) + 1))
    index = FingerprintIndex(parts, group=group)
    report.index_rows = index.rows
    # A kept segment's own root (when it is itself a copy of something earlier): chains resolve to the first copy.
    root = _roots(everything, duplicates)
    files = _Files(everything, members, bounds)
    new_dups = []
    for k, (mine, grids) in enumerate(zip(new.to_pylist(), prints, strict=True)):
        me = indexed.num_rows + k
        # Only earlier copies can be kept over this one: every segment of a live earlier file in keep-rule order.
        allowed = lambda g, me=me, own=group[me]: g != own and keepable[g] and first_of_group[g] < me  # noqa: E731
        found = _kept_copy(files, _ranked(index, grids, allowed), root, retired, mine)
        if found is None:
            continue
        hit, kept, kept_root = found
        kept_id, kept_uri, _ = root[mine["segment_id"]] = kept_root
        kind = _kind(mine, everything["pcm_sha256"][kept].as_py(), everything["media_duration_s"][kept].as_py())
        new_dups.append(
            {
                "segment_id": mine["segment_id"],
                "media_id": mine["media_id"],
                "shard": mine["shard"],
                "duration_s": mine["duration_s"],
                "duplicate_of": kept_id,
                "duplicate_of_uri": kept_uri,
                "similarity": min(1.0, hit.similarity),
                "kind": kind,
            }
        )
        report.duplicates[kind] += 1
        report.duplicate_hours[kind] += mine["duration_s"] / 3600
    if new.num_rows:
        write_table(out, indexed_key(generation), new)
        write_table(out, duplicates_key(generation), pa.Table.from_pylist(new_dups, schema=DUPLICATES_SCHEMA))
    checked, eval_touched, matches_key = _check_eval(
        out, state, everything, new, prints, index, files, eval_sets, report
    )
    # Shards whose dedup outcomes this run changed, at which revision: pending_work rebuilds a dataset built before.
    touched = {d["shard"] for d in new_dups} | eval_touched
    revision = state.get("revision", 0) + (1 if touched else 0)
    report.touched_shards = sorted(touched)
    before = state
    state = {
        "generations": generation,
        "index_rows": report.index_rows,
        "eval_checked": checked,
        "fingerprint_version": fp.VERSION,
        "fingerprints_seen": {**seen, **{s: versions[fingerprints_key(s)] for s in changed}},
        "revision": revision,
        "outcomes_changed": {**state.get("outcomes_changed", {}), **dict.fromkeys(touched, revision)},
        "index_id": state.get("index_id") or secrets.token_hex(8),
    }
    if matches_key is not None:
        state["eval_matches"] = matches_key
    if state != before:  # a run that found nothing new writes nothing
        out.put_bytes(STATE_KEY, json.dumps(state, sort_keys=True).encode())
    return report


def refresh(
    store: ObjectStore, shards: list[str], run_id: str = "", wait_s: float | None = None, raise_held: bool = False
) -> IndexReport | None:
    """:func:`update_index` over ``shards`` with the registered evaluation sets, under the index's lease (one writer:
    two runs would both write generation N+1), waiting up to ``wait_s`` (default ``ASR_LEASE_WAIT_S``) for another
    holder. When it was held that long: ``LeaseHeld`` (naming the holder) with ``raise_held``, else None. Every write
    checks the lease is still ours."""
    try:
        with lease.hold(store, INDEX_LEASE_SHARD, "audio_fingerprints", run_id, wait_s) as held:
            return update_index(lease.GuardedStore(store, held.check), shards, read_eval_sets(store))
    except lease.LeaseHeld:
        if raise_held:
            raise
        return None


def outcomes_revision(shard: str, state: dict) -> tuple[str, int]:
    """(the index's id, the revision at which the shard's dedup outcomes last changed) in ``state``: a dataset built
    at a lower revision of the same index misses some of them, and one built from another index (removed and
    rebuilt, its revisions counted anew) may miss any."""
    return state.get("index_id", ""), state.get("outcomes_changed", {}).get(shard, 0)


def dataset_is_stale(current: dict | None, shard: str, state: dict) -> bool:
    """Whether the shard's current build (its pointer) predates the dedup outcomes the index holds now."""
    if current is None:
        return False
    index_id, changed_at = outcomes_revision(shard, state)
    built_at = current.get("dedup_revision", 0) if current.get("dedup_index_id", "") == index_id else 0
    return changed_at > built_at


@dataclass
class _Files:
    """The indexed segments grouped by media file (a group's rows: ``members[bounds[g] : bounds[g + 1]]``)."""

    everything: pa.Table
    members: np.ndarray
    bounds: np.ndarray

    def __post_init__(self) -> None:
        self.starts = self.everything["start_s"].to_numpy()
        self.durations = self.everything["duration_s"].to_numpy()

    def overlapping_segment(self, hit: Hit, mine: dict) -> int:
        """Of the matched file's segments, the row of the one that overlaps most with the query segment placed on
        that file's timeline (its start moved by the matched offset)."""
        segs = self.members[self.bounds[hit.ref] : self.bounds[hit.ref + 1]]
        start = mine["start_s"] + hit.offset * fp.FRAME_S
        end = start + mine["duration_s"]
        overlap = np.minimum(end, self.starts[segs] + self.durations[segs]) - np.maximum(start, self.starts[segs])
        return int(segs[int(np.argmax(overlap))])


def _roots(everything: pa.Table, duplicates: pa.Table) -> dict[str, tuple[str, str, str]]:
    """Each recorded duplicate's kept segment, ``(segment id, uri, media id)``: chains resolve to the first copy."""
    kept = pa.array(sorted(set(duplicates["duplicate_of"].to_pylist())), pa.string())
    chosen = everything.filter(pc.is_in(everything["segment_id"], value_set=kept))
    media_of = dict(zip(chosen["segment_id"].to_pylist(), chosen["media_id"].to_pylist(), strict=True))
    return {
        r["segment_id"]: (r["duplicate_of"], r["duplicate_of_uri"], media_of.get(r["duplicate_of"]))
        for r in duplicates.select(["segment_id", "duplicate_of", "duplicate_of_uri"]).to_pylist()
    }


def _kept_copy(
    files: _Files, hits: list[Hit], root: dict, retired: set[str], mine: dict
) -> tuple[Hit, int, tuple[str, str, str]] | None:
    """The best hit whose kept segment (followed to the first copy of a chain) is live and not in the query's own
    file: ``(hit, matched row, (kept segment id, uri, media id))``, or None. A chain can end at a version replaced
    since it was kept, or come back to the query's file; such a hit is passed over."""
    for hit in hits:
        row = files.overlapping_segment(hit, mine)
        matched = files.everything["segment_id"][row].as_py()
        own = (matched, files.everything["uri"][row].as_py(), files.everything["media_id"][row].as_py())
        kept = root.get(matched, own)
        if kept[0] != mine["segment_id"] and kept[2] != mine["media_id"] and kept[2] not in retired:
            return hit, row, kept
    return None


def _kind(mine: dict, kept_pcm: str | None, kept_media_s: float | None) -> str:
    if mine["pcm_sha256"] and mine["pcm_sha256"] == kept_pcm:
        return "exact"
    if (mine["media_duration_s"] or 0) < CLIP_RATIO * (kept_media_s or 0):
        return "contained_clip"
    return "re_encode"


def _eval_hit(index: FingerprintIndex, grids: list[fp.Fingerprint], eval_sizes: np.ndarray) -> Hit | None:
    """The evaluation file a segment matches best, if any: enough agreeing landmarks (``MIN_VOTES``) making up enough
    of the shorter of the two (``MIN_SIMILARITY``), so that a short evaluation clip inside a long segment counts as
    much as a segment inside a long evaluation file."""
    best = None
    for q in grids:
        landmarks = len(fp.sampled(q))
        for h in index.hits(q, limit=16):
            share = h.votes / max(1.0, min(landmarks, float(eval_sizes[h.ref])))
            if h.votes >= MIN_VOTES and share >= MIN_SIMILARITY and (best is None or h.votes > best.votes):
                best = Hit(h.ref, h.name, h.votes, min(1.0, share), h.offset)
    return best


def _check_eval(
    out: ObjectStore,
    state: dict,
    everything: pa.Table,
    new: pa.Table,
    prints: list[list[fp.Fingerprint]],
    index: FingerprintIndex,
    files: _Files,
    eval_sets: pa.Table | None,
    report: IndexReport,
) -> tuple[list[list[str]], set[str], str | None]:
    """Brings the evaluation matches up to date without going over the whole index again: this run's new
    segments are checked against every registered evaluation file, and evaluation files registered since the last run
    are looked up in the global index (one lookup each: the files holding them, then each overlapping segment verified
    as a new one is). Matches of evaluation sets no longer registered are dropped. Returns the (set, uri) pairs now
    checked against the whole index, the shards whose matches changed, and the key of the matches table (a new one,
    ``eval_matches_key`` of the next revision, when they changed: the state names it when it commits)."""
    registered = [] if eval_sets is None else eval_sets.to_pylist()
    keys = [[e["eval_set"], e["uri"]] for e in registered]
    old = read_eval_matches(out, state)  # contaminations: few rows
    new_key = eval_matches_key(state.get("revision", 0) + 1)
    still = {tuple(k) for k in keys}
    mask = [(s, u) in still for s, u in zip(old["eval_set"].to_pylist(), old["eval_uri"].to_pylist(), strict=True)]
    kept = old.filter(pa.array(mask, pa.bool_()))
    dropped_shards = set(old.filter(pa.array([not m for m in mask], pa.bool_()))["shard"].to_pylist())
    if not registered:
        if old.num_rows:
            write_table(out, new_key, kept)
            return [], dropped_shards, new_key
        return [], dropped_shards, state.get("eval_matches")
    stale = sorted({e["uri"] for e in registered if e["fingerprint_version"] != fp.VERSION})
    if stale:
        raise ValueError(
            f"{len(stale)} registered evaluation files were fingerprinted by another version than {fp.VERSION} (e.g. "
            f"{stale[:3]}): materialize eval_sets again, which fingerprints them anew"
        )
    eval_grids = [fp.unpack_prints(e["hashes"], e["times"], e["grid_sizes"]) for e in registered]
    eval_prints = [grids[0] for grids in eval_grids]  # what segments are matched against
    sizes = np.array([len(p) for p in eval_prints])
    eval_index = FingerprintIndex([build_index_arrays(eval_prints)])
    matches: dict[tuple[str, str, str], dict] = {}

    def verify(row: dict, grids: list[fp.Fingerprint]) -> None:
        hit = _eval_hit(eval_index, grids, sizes)
        if hit is None:
            return
        e = registered[hit.ref]
        matches[(row["segment_id"], e["eval_set"], e["uri"])] = {
            "segment_id": row["segment_id"],
            "media_id": row["media_id"],
            "shard": row["shard"],
            "uri": row["uri"],
            "duration_s": row["duration_s"],
            "eval_set": e["eval_set"],
            "eval_uri": e["uri"],
            "similarity": hit.similarity,
        }

    for row, grids in zip(new.to_pylist(), prints, strict=True):
        verify(row, grids)
    done = {tuple(k) for k in state.get("eval_checked", [])}
    fresh = [i for i, k in enumerate(keys) if tuple(k) not in done]
    if fresh and new.num_rows < everything.num_rows:
        # Candidates among the earlier segments: every segment overlapping where a fresh evaluation file sits in a
        # file the index holds. The new segments were all checked above.
        first_new = everything.num_rows - new.num_rows
        candidates: set[int] = set()
        for i in fresh:
            duration = registered[i]["duration_s"]
            # Every grid of the file: the indexed segments are on their own first grid, which a copy rarely shares.
            for hit in (h for grid in eval_grids[i] for h in index.hits(grid, limit=64)):
                if hit.votes < CANDIDATE_VOTES:
                    continue
                segs = files.members[files.bounds[hit.ref] : files.bounds[hit.ref + 1]]
                start = hit.offset * fp.FRAME_S
                ends = files.starts[segs] + files.durations[segs]
                near = segs[(files.starts[segs] < start + duration) & (ends > start) & (segs < first_new)]
                candidates.update(int(r) for r in near)
        if candidates:
            rows = everything.take(pa.array(sorted(candidates))).to_pylist()
            for shard in sorted({r["shard"] for r in rows}):
                wanted = {r["segment_id"]: r for r in rows if r["shard"] == shard}
                table = read_table(out, fingerprints_key(shard), FINGERPRINT_SCHEMA)
                table = table.filter(pc.is_in(table["segment_id"], value_set=pa.array(sorted(wanted), pa.string())))
                for r in table.to_pylist():
                    verify(wanted[r["segment_id"]], fp.unpack_prints(r["hashes"], r["times"], r["grid_sizes"]))
    columns = (kept["segment_id"].to_pylist(), kept["eval_set"].to_pylist(), kept["eval_uri"].to_pylist())
    have = set(zip(*columns, strict=True))
    added = [m for k, m in sorted(matches.items()) if k not in have]
    for m in added:
        report.eval_matches[m["eval_set"]] += 1
    key = state.get("eval_matches")
    if added or kept.num_rows != old.num_rows:
        table = pa.concat_tables([kept, pa.Table.from_pylist(added, schema=EVAL_MATCHES_SCHEMA)])
        write_table(out, new_key, table.sort_by([("segment_id", "ascending"), ("eval_set", "ascending")]))
        key = new_key
    return sorted(keys), dropped_shards | {m["shard"] for m in added}, key


def eval_match_counts(out: ObjectStore) -> dict[str, int]:
    """Training segments matching each evaluation set, all runs together."""
    table = read_eval_matches(out)
    return dict(sorted(Counter(table["eval_set"].to_pylist()).items()))


def shard_outcomes(out: ObjectStore, shard: str) -> dict[str, dict]:
    """Segment id -> what dedup decided for it on this shard: ``reason`` (``eval_contamination`` first, then
    ``duplicate``), ``duplicate_of``, ``duplicate_of_uri``, ``similarity``, ``duplicate_kind``, ``eval_set``,
    ``eval_uri``. Empty before the first ``audio_fingerprints`` run."""
    state = read_state(out)
    decided: dict[str, dict] = {}
    dups = read_duplicates(out, state)
    for r in dups.filter(pc.equal(dups["shard"], shard)).to_pylist():
        decided[r["segment_id"]] = {
            "reason": DUPLICATE,
            "duplicate_of": r["duplicate_of"],
            "duplicate_of_uri": r["duplicate_of_uri"],
            "similarity": round(float(r["similarity"]), 4),
            "duplicate_kind": r["kind"],
        }
    evals = read_eval_matches(out, state)
    for r in evals.filter(pc.equal(evals["shard"], shard)).to_pylist():
        # Contamination wins: a copy of an evaluation recording must go even where it is also a duplicate.
        decided[r["segment_id"]] = {
            **decided.get(r["segment_id"], {}),
            "reason": EVAL_CONTAMINATION,
            "eval_set": r["eval_set"],
            "eval_uri": r["eval_uri"],
            "similarity": round(float(r["similarity"]), 4),
        }
    return decided


def parse_eval_sets(spec: str) -> dict[str, str]:
    """``name=uri;name=uri`` (a folder, ``file://`` or ``oss://`` uri, or a ``.txt`` manifest of keys under its
    folder) as a dict; names must be unique."""
    sets: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        name, sep, uri = item.partition("=")
        if not sep or not name.strip() or not uri.strip():
            raise ValueError(f"ASR_EVAL_SETS: {item!r} is not name=uri")
        if name.strip() in sets:
            raise ValueError(f"ASR_EVAL_SETS: evaluation set {name.strip()!r} is named twice")
        sets[name.strip()] = uri.strip()
    return sets


def eval_keys(store: ObjectStore, manifest: str | None) -> list[str]:
    """The audio keys of an evaluation set: every non-hidden file of its store, or the keys a manifest lists."""
    if manifest:
        lines = store.read_bytes(manifest).decode().splitlines()
        return sorted({line.strip() for line in lines if line.strip() and not line.startswith("#")})
    return sorted(i.key for i in store.list() if not i.key.rsplit("/", 1)[-1].startswith("."))


def fingerprint_file(path, scratch) -> tuple[float, tuple[bytes, bytes, list[int]]]:
    """Decodes a file as the pipeline does (16 kHz mono) and returns its duration and its sampled landmarks on every
    query grid (:func:`fingerprint.stored_prints`).

    Raises:
        ValueError: the file does not decode (the message names the reason).
    """
    from asr_assets.media import DecodeJob, decode_media, read_audio

    dst = scratch / "eval.flac"
    result = decode_media(DecodeJob("eval", str(path), path, dst, 1 << 40, 24 * 3600.0))
    if result.error_class is not None:
        raise ValueError(f"{result.error_class}: {result.error}")
    try:
        x = read_audio(dst)
    finally:
        dst.unlink(missing_ok=True)
    return len(x) / fp.SAMPLE_RATE, fp.stored_prints(x)


def write_eval_sets(out: ObjectStore, table: pa.Table) -> None:
    write_table(out, EVAL_INDEX_KEY, table)


def fingerprint_eval_sets(
    out: ObjectStore, sets: dict[str, tuple[ObjectStore, list[str]]]
) -> tuple[pa.Table, list[str]]:
    """The registry for ``sets``: every evaluation file not registered yet (set, uri) fingerprinted, the others taken
    from the current registry; sets no longer configured left out. Returns it and the files that could not be decoded
    (with the reason): an evaluation file that cannot be checked is reported, never silently skipped."""
    old = read_table(out, EVAL_INDEX_KEY, EVAL_INDEX_SCHEMA)
    # Rows of another fingerprint version (or none: written before versions) are fingerprinted again.
    have = {(r["eval_set"], r["uri"]): r for r in old.to_pylist() if r["fingerprint_version"] == fp.VERSION}
    rows, problems = [], []
    scratch = out.scratch_dir()
    for name, (store, keys) in sorted(sets.items()):
        for key in keys:
            uri = store.uri_of(key)
            if (name, uri) in have:
                rows.append(have[(name, uri)])
                continue
            try:
                duration, (hashes, times, sizes) = fingerprint_file(store.local_path(key), scratch)
            except (ValueError, OSError) as exc:
                problems.append(f"{name}: {uri}: {exc}")
                continue
            rows.append(
                {
                    "eval_set": name,
                    "uri": uri,
                    "duration_s": duration,
                    "hashes": hashes,
                    "times": times,
                    "grid_sizes": sizes,
                    "fingerprint_version": fp.VERSION,
                }
            )
    return pa.Table.from_pylist(rows, schema=EVAL_INDEX_SCHEMA), problems


def read_eval_sets(out: ObjectStore) -> pa.Table | None:
    return read_table(out, EVAL_INDEX_KEY, EVAL_INDEX_SCHEMA) if out.exists(EVAL_INDEX_KEY) else None


def summary(out: ObjectStore, shards: list[str], examples: int = 20) -> dict:
    """For the distillation report: duplicate segments and hours by kind, teacher hours saved (segments skipped before
    the teacher), and per evaluation set the matching segments (count, hours, a few examples)."""
    from asr_assets.stages import read_transcripts

    dups = read_duplicates(out)
    by_kind = {
        kind: {
            "segments": int(pc.sum(pc.equal(dups["kind"], kind)).as_py() or 0),
            "hours": round((pc.sum(dups.filter(pc.equal(dups["kind"], kind))["duration_s"]).as_py() or 0.0) / 3600, 6),
        }
        for kind in KINDS
    }
    saved_s = 0.0
    for shard in shards:
        table = read_transcripts(out, shard)
        skipped = table.filter(pc.starts_with(table["finish_reason"], SKIPPED_FINISH))["segment_id"]
        if len(skipped):
            features = read_table(out, layout.features_key(shard), FEATURE_SCHEMA)
            chosen = features.filter(pc.is_in(features["segment_id"], value_set=skipped))
            saved_s += pc.sum(chosen["duration_s"]).as_py() or 0.0
    evals = read_eval_matches(out)
    per_set: dict[str, dict] = {}
    for r in evals.sort_by([("eval_set", "ascending"), ("uri", "ascending")]).to_pylist():
        entry = per_set.setdefault(r["eval_set"], {"segments": 0, "hours": 0.0, "examples": []})
        entry["segments"] += 1
        entry["hours"] += r["duration_s"] / 3600
        if len(entry["examples"]) < examples:
            entry["examples"].append(
                {
                    "segment_id": r["segment_id"],
                    "uri": r["uri"],
                    "eval_uri": r["eval_uri"],
                    "similarity": round(float(r["similarity"]), 4),
                }
            )
    for entry in per_set.values():
        entry["hours"] = round(entry["hours"], 6)
    return {
        "duplicates_by_kind": by_kind,
        "duplicate_hours": round(sum(v["hours"] for v in by_kind.values()), 6),
        "teacher_hours_saved": round(saved_s / 3600, 6),
        "eval_matches": per_set,
    }
