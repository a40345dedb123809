"""The fingerprint index: landmark hashes of every indexed segment, sorted by hash, searched by binary search.

Three parallel arrays sorted by hash (uint32 hash, uint32 reference ordinal, uint32 frame on the reference media's
timeline) answer "which indexed audio holds these landmarks at a consistent time offset" with one ``searchsorted``
per query hash and a vote over the postings found. Only a consistent sample of the hash space is indexed (hashes
below ``fingerprint.SAMPLE_LIMIT``, an eighth): both copies of a recording keep the same sample, so matching needs no
more, and the index holds an eighth of the rows. Arrays are stored as ``.npy`` files so a large index is
memory-mapped, not loaded: a lookup touches ~30 pages per query hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asr_assets import fingerprint as fp

MAX_POSTINGS = 20_000  # a hash this common says nothing about which recording it came from (a stop word)
MIN_VOTES = 6  # agreeing landmarks, in the indexed sample
MIN_SIMILARITY = 0.05  # share of the query's sampled landmarks that agree


@dataclass(frozen=True)
class Hit:
    """A reference that holds the query: its ordinal (and name), agreeing landmarks, their share, the time offset."""

    ref: int
    name: str
    votes: int
    similarity: float
    offset: int


def build_index_arrays(prints: list[fp.Fingerprint], first_ref: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted (hashes, refs, times) of ``prints``; reference ``i`` is ``first_ref + i``."""
    chosen = [fp.sampled(p) for p in prints]
    if not chosen:
        return np.empty(0, np.uint32), np.empty(0, np.uint32), np.empty(0, np.uint32)
    hashes = np.concatenate([p.hashes for p in chosen]).astype(np.uint32)
    refs = np.concatenate([np.full(len(p), first_ref + i, np.uint32) for i, p in enumerate(chosen)])
    times = np.concatenate([p.times for p in chosen]).astype(np.uint32)
    order = np.argsort(hashes, kind="stable")
    return hashes[order], refs[order], times[order]


class FingerprintIndex:
    """One or more sorted parts (each a hashes/refs/times triple), searched together."""

    def __init__(
        self,
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
        names: list[str] | None = None,
        group: np.ndarray | None = None,
    ) -> None:
        """``group`` maps a reference to the unit votes are counted for (a segment to its media file, whose timeline
        the times are on); hits then name groups. Without it, each reference is its own group."""
        self.parts = [p for p in parts if len(p[0])]
        self.names = names
        self.group = group

    @property
    def rows(self) -> int:
        return sum(len(p[0]) for p in self.parts)

    def postings(self, query: fp.Fingerprint) -> tuple[np.ndarray, np.ndarray]:
        """(refs, time offsets) of every indexed landmark equal to one of the query's."""
        refs, deltas = [], []
        for hashes, part_refs, part_times in self.parts:
            lo = np.searchsorted(hashes, query.hashes, side="left")
            hi = np.searchsorted(hashes, query.hashes, side="right")
            counts = hi - lo
            counts[counts > MAX_POSTINGS] = 0
            total = int(counts.sum())
            if not total:
                continue
            # Positions lo[i] .. hi[i] for every query hash i, without a Python loop.
            starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
            where = starts + np.arange(total)
            refs.append(np.asarray(part_refs[where]))
            deltas.append(
                np.asarray(part_times[where]).astype(np.int64) - np.repeat(query.times.astype(np.int64), counts)
            )
        if not refs:
            return np.empty(0, np.uint32), np.empty(0, np.int64)
        return np.concatenate(refs), np.concatenate(deltas)

    def hits(self, query: fp.Fingerprint, limit: int = 8) -> list[Hit]:
        """The references whose landmarks agree most with the query at one time offset (best first), whether or not
        they pass the match thresholds."""
        q = fp.sampled(query)
        refs, deltas = self.postings(q)
        if not len(refs):
            return []
        if self.group is not None:
            refs = self.group[refs]
        keys = (refs.astype(np.int64) << 32) | (deltas + (1 << 31))
        values, counts = np.unique(keys, return_counts=True)
        # An offset's votes include its neighbours one frame either side (the STFT grids of two copies differ).
        smoothed = counts.copy()
        for step in (-1, 1):
            pos = np.searchsorted(values, values + step)
            pos = np.minimum(pos, len(values) - 1)
            smoothed += np.where(values[pos] == values + step, counts[pos], 0)
        order = np.lexsort((values, -smoothed))
        seen: set[int] = set()
        best: list[Hit] = []
        for i in order:
            ref = int(values[i] >> 32)
            if ref in seen:
                continue
            seen.add(ref)
            votes = int(smoothed[i])
            name = self.names[ref] if self.names is not None else str(ref)
            best.append(Hit(ref, name, votes, votes / max(len(q), 1), int(values[i] & 0xFFFFFFFF) - (1 << 31)))
            if len(best) >= limit:
                break
        return best

    def best(self, query: fp.Fingerprint) -> Hit | None:
        found = self.hits(query, limit=1)
        return found[0] if found else None

    def lookup(self, query: fp.Fingerprint | list[fp.Fingerprint]) -> Hit | None:
        """The best reference when it passes the match thresholds, else None; given the query on several frame grids
        (:func:`fingerprint.query_prints`), the best over them."""
        found = [h for q in (query if isinstance(query, list) else [query]) if (h := self.best(q)) is not None]
        hit = max(found, key=lambda h: (h.votes, -h.ref), default=None)
        return hit if hit is not None and is_match(hit) else None


def is_match(hit: Hit) -> bool:
    return hit.votes >= MIN_VOTES and hit.similarity >= MIN_SIMILARITY


def synthetic_index(
    segments: int, folder: Path, hash_values: np.ndarray, seed: int = 0, rows_per_segment: int = 50
) -> tuple[int, float]:
    """Lookup time at scale: an index of ``segments`` synthetic segments (``rows_per_segment`` sampled landmarks each)
    in memory-mapped .npy files, queried with segment-sized fingerprints (one planted copy among them must be found).
    Returns (rows, mean milliseconds per lookup).

    Hashes are drawn from ``hash_values``, the landmark hashes of real fingerprints (with their repetitions): landmarks
    carry ~21 bits and speech favours some, so real posting lists are far longer than a uniform draw over the sampled
    hash space would give, and lookups slower. The index draws from the sampled ones, the queries from all."""
    import time

    folder.mkdir(parents=True, exist_ok=True)
    rows = segments * rows_per_segment
    rng = np.random.default_rng(seed)
    values, freq = np.unique(hash_values[hash_values < fp.SAMPLE_LIMIT], return_counts=True)
    # How many rows each real hash value gets, in proportion to how often it occurs: already in sorted order.
    counts = rng.multinomial(rows, freq / freq.sum())
    paths = {name: folder / f"{name}.npy" for name in ("hashes", "refs", "times")}
    arrays = {
        name: np.lib.format.open_memmap(path, mode="w+", dtype=np.uint32, shape=(rows,)) for name, path in paths.items()
    }
    chunks = 256
    edges = np.linspace(0, len(values), chunks + 1).astype(np.int64)
    ends = np.concatenate([[0], np.cumsum(counts)])
    for c in range(chunks):  # one slice of the hash values at a time (bounded memory at 500 million rows)
        lo, hi = edges[c], edges[c + 1]
        a, b = ends[lo], ends[hi]
        arrays["hashes"][a:b] = np.repeat(values[lo:hi], counts[lo:hi])
        arrays["refs"][a:b] = rng.integers(0, segments, b - a, dtype=np.uint32)
        arrays["times"][a:b] = rng.integers(0, 1 << 20, b - a, dtype=np.uint32)
    # A planted copy: 40 landmarks of reference 7 at consistent times, scattered through the index.
    planted = np.sort(rng.choice(rows, 40, replace=False))
    arrays["refs"][planted] = 7
    arrays["times"][planted] = 1000 + np.arange(40, dtype=np.uint32)
    query_hashes = np.asarray(arrays["hashes"][planted])
    for a in arrays.values():
        a.flush()
    del arrays
    parts = [tuple(np.load(paths[n], mmap_mode="r") for n in ("hashes", "refs", "times"))]
    index = FingerprintIndex(parts)  # type: ignore[arg-type]
    # Queries: an 8 s segment on four frame grids (~70 landmarks a second each, an eighth of them in the sample).
    queries = [
        [fp.Fingerprint(rng.choice(hash_values, 560), np.arange(560, dtype=np.uint32)) for _ in range(4)]
        for _ in range(200)
    ]
    planted_query = fp.Fingerprint(
        np.concatenate([query_hashes, rng.choice(hash_values, 120)]),
        np.concatenate([np.arange(40, dtype=np.uint32), np.arange(200, 320, dtype=np.uint32)]),
    )
    index.lookup(queries[0])  # warm the pages the first binary searches touch
    started = time.perf_counter()
    for q in queries:
        index.lookup(q)
    hit = index.lookup(planted_query)
    elapsed = time.perf_counter() - started
    if hit is None or hit.ref != 7:
        raise AssertionError(f"the planted copy was not found: {hit}")
    return rows, elapsed * 1000 / (len(queries) + 1)
