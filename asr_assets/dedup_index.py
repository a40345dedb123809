"""The fingerprint index: landmark hashes of every indexed segment, sorted by hash, searched by binary search.

Three parallel arrays sorted by hash (uint64 hash, uint32 reference ordinal, uint32 frame on the reference media's
timeline) answer "which indexed audio holds these landmarks at a consistent time offset" with one ``searchsorted``
per query hash and a vote over the postings found. Only a consistent sample of the hash space is indexed (hashes
below ``fingerprint.SAMPLE_LIMIT``, a twelfth): both copies of a recording keep the same sample, so matching needs no
more, and the index holds a twelfth of the rows. Arrays are stored as ``.npy`` files so a large index is
memory-mapped, not loaded: a lookup touches ~30 pages per query hash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asr_assets import fingerprint as fp

MAX_POSTINGS = 20_000  # a hash this common says nothing about which recording it came from (a stop word)
# Postings one query (one grid) reads at most: its hashes are consulted rarest first (a rare landmark says most about
# which recording it came from) until the next one would pass this. It bounds a lookup's cost whatever the landmark
# distribution of the corpus, at the price of votes when the query's hashes are all common (bench/RESULTS.md).
POSTING_BUDGET = 120_000
MIN_VOTES = 6  # agreeing landmarks, in the indexed sample
MIN_SIMILARITY = 0.05  # share of the query's sampled landmarks that agree
PLANTED, PLANTED_SHARES = 40, (0.25, 0.33, 0.5)  # synthetic_index's planted copies per share of the query


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
        return np.empty(0, np.uint64), np.empty(0, np.uint32), np.empty(0, np.uint32)
    hashes = np.concatenate([p.hashes for p in chosen]).astype(np.uint64)
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

    def postings(self, query: fp.Fingerprint) -> tuple[np.ndarray, np.ndarray, int]:
        """(refs, time offsets) of the indexed landmarks equal to the query's consulted hashes, and how many hashes
        were consulted: rarest first, skipping stop words (over ``MAX_POSTINGS``), within ``POSTING_BUDGET``."""
        bounds = [
            (np.searchsorted(h, query.hashes, side="left"), np.searchsorted(h, query.hashes, side="right"))
            for h, _, _ in self.parts
        ]
        total = np.zeros(len(query), np.int64)
        for lo, hi in bounds:
            total += hi - lo
        order = np.argsort(total, kind="stable")
        spent = np.cumsum(np.where(total[order] > MAX_POSTINGS, 0, total[order]))
        chosen = np.zeros(len(query), bool)
        chosen[order[(total[order] <= MAX_POSTINGS) & (spent <= POSTING_BUDGET)]] = True
        refs, deltas = [], []
        for (lo, hi), (_, part_refs, part_times) in zip(bounds, self.parts, strict=True):
            counts = np.where(chosen, hi - lo, 0)
            n = int(counts.sum())
            if not n:
                continue
            # Positions lo[i] .. hi[i] for every chosen query hash i, without a Python loop.
            starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
            where = starts + np.arange(n)
            refs.append(np.asarray(part_refs[where]))
            deltas.append(
                np.asarray(part_times[where]).astype(np.int64) - np.repeat(query.times.astype(np.int64), counts)
            )
        consulted = int(chosen.sum())
        if not refs:
            return np.empty(0, np.uint32), np.empty(0, np.int64), consulted
        return np.concatenate(refs), np.concatenate(deltas), consulted

    def hits(self, query: fp.Fingerprint, limit: int = 8) -> list[Hit]:
        """The references whose landmarks agree most with the query at one time offset (best first), whether or not
        they pass the match thresholds."""
        q = fp.sampled(query)
        refs, deltas, _ = self.postings(q)
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
            # The share of the query's sampled landmarks (whether or not the budget let all be consulted): a number
            # that means the same whatever the index's size.
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


def synthetic_hashes(values: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` landmark hashes drawn uniformly from ``values`` distinct values of the sampled hash space."""
    k = rng.integers(0, values, count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return (k * np.uint64(fp.HASH_MIX)) % np.uint64(fp.SAMPLE_LIMIT)  # distinct k: distinct values (a.s.)


def between_recordings_collision_rate(prints: list[np.ndarray]) -> float:
    """The chance that two landmarks of two different recordings are equal (each of ``prints``: one recording's
    sampled hashes)."""

    def pairs(h: np.ndarray) -> int:
        _, c = np.unique(h, return_counts=True)
        return int((c * (c - 1)).sum())

    everything = np.concatenate(prints)
    n = len(everything)
    across = n * (n - 1) - sum(len(p) * (len(p) - 1) for p in prints)
    return (pairs(everything) - sum(pairs(p) for p in prints)) / across if across else 0.0


def synthetic_index(
    segments: int, folder: Path, real: list[np.ndarray], seed: int = 0, rows_per_segment: int = 50
) -> tuple[int, float, dict]:
    """Lookup time and recall at scale: an index of ``segments`` synthetic segments (``rows_per_segment`` sampled
    landmarks each) in memory-mapped .npy files, queried with segment-sized fingerprints; copies planted at several
    shares of a query's landmarks must be found and nothing else. Returns (rows, mean milliseconds per lookup,
    statistics: posting lists, recall by share, false matches).

    The cost of a lookup is set by how long its hashes' posting lists are: the chance that landmarks of two different
    recordings are equal (the collision rate) times the rows. The synthetic landmarks are spread evenly over
    ``1 / rate`` values, ``rate`` measured between the ``real`` recordings (each: one recording's sampled landmark
    hashes), so every query hash meets the mean posting list a real corpus with that rate would give, and none is a
    stop word to skip. Real speech is more skewed (a few very common values, which ``MAX_POSTINGS`` skips, and many rare
    ones), so this is the costly end for its rate. The statistics give the rate, the values, and what a lookup read."""
    import time

    folder.mkdir(parents=True, exist_ok=True)
    rows = segments * rows_per_segment
    rng = np.random.default_rng(seed)
    rate = between_recordings_collision_rate(real)
    values = max(1, round(1 / rate)) if rate > 0 else 1 << 40
    paths = {name: folder / f"{name}.npy" for name in ("hashes", "refs", "times")}
    dtypes = {"hashes": np.uint64, "refs": np.uint32, "times": np.uint32}
    arrays = {
        name: np.lib.format.open_memmap(path, mode="w+", dtype=dtypes[name], shape=(rows,))
        for name, path in paths.items()
    }
    # Hashes first, sorted (an index part is sorted by hash); references and times are independent of the hash, so
    # they are drawn in sorted order afterwards. Bounded memory: 8 bytes a row for the sort (4 GB at 500 million).
    hashes = np.empty(rows, np.uint64)
    chunk = 20_000_000
    for a in range(0, rows, chunk):
        b = min(rows, a + chunk)
        hashes[a:b] = synthetic_hashes(values, b - a, rng)
    stats = {
        "real_collision_rate": float(f"{rate:.3g}"),
        "synthetic_values": values,
        "mean_postings_per_hash": round(rows / values, 1),
    }
    hashes.sort()
    arrays["hashes"][:] = hashes
    del hashes
    for a in range(0, rows, chunk):
        b = min(rows, a + chunk)
        arrays["refs"][a:b] = rng.integers(0, segments, b - a, dtype=np.uint32)
        arrays["times"][a:b] = rng.integers(0, 1 << 20, b - a, dtype=np.uint32)
    # Planted copies: for each share of a 70-landmark query, PLANTED references whose landmarks agree with that share
    # of the query at one time offset, scattered through the index with posting lists as long as every other's.
    planted: dict[float, list[tuple[int, np.ndarray]]] = {}
    ref = segments
    for share in PLANTED_SHARES:
        k = round(share * 70)
        for _ in range(PLANTED):
            where = np.sort(rng.choice(rows, k, replace=False))
            arrays["refs"][where] = ref
            arrays["times"][where] = 1000 + np.arange(k, dtype=np.uint32)
            planted.setdefault(share, []).append((ref, np.asarray(arrays["hashes"][where])))
            ref += 1
    for a in arrays.values():
        a.flush()
    del arrays
    parts = [tuple(np.load(paths[n], mmap_mode="r") for n in ("hashes", "refs", "times"))]
    index = FingerprintIndex(parts)  # type: ignore[arg-type]
    # Queries: an 8 s segment on four frame grids (~70 sampled landmarks each).
    queries = [
        [fp.Fingerprint(synthetic_hashes(values, 70, rng), np.arange(70, dtype=np.uint32)) for _ in range(4)]
        for _ in range(200)
    ]
    index.lookup(queries[0])  # warm the pages the first binary searches touch
    read = [index.postings(g) for q in queries[:50] for g in q]
    stats["mean_postings_read_per_grid"] = round(float(np.mean([len(r[0]) for r in read])), 1)
    stats["mean_hashes_consulted_per_grid"] = round(float(np.mean([r[2] for r in read])), 1)
    started = time.perf_counter()
    for q in queries:
        index.lookup(q)
    elapsed = time.perf_counter() - started
    # Recall at this size: each planted copy's landmarks among the rest of a 70-landmark query (one grid).
    recall = {}
    false = 0
    for share, copies in planted.items():
        found = 0
        for ref_id, hashes in copies:
            query = fp.Fingerprint(
                np.concatenate([hashes, synthetic_hashes(values, 70 - len(hashes), rng)]),
                np.concatenate([np.arange(len(hashes)), 200 + np.arange(70 - len(hashes))]).astype(np.uint32),
            )
            hit = index.lookup(query)
            found += hit is not None and hit.ref == ref_id
            false += hit is not None and hit.ref != ref_id
        recall[str(share)] = round(found / len(copies), 3)
    stats["recall_at_scale_by_share"] = recall
    stats["false_matches_at_scale"] = false + sum(index.lookup(q) is not None for q in queries)
    stats["posting_budget"] = POSTING_BUDGET
    return rows, elapsed * 1000 / (len(queries) + 1), stats
