"""Audio fingerprints for deduplication: an exact hash of the decoded PCM and a robust spectral-peak landmark hash.

Runs inside pool workers (import-light: numpy and hashlib only). Written here rather than taken from a library:
Chromaprint (the maintained one) is not installed on the workers and fingerprints whole files from their start, so it
does not find a 5-30 s clip inside a longer recording; landmark hashing (peak pairs with their time offset, matched by
voting on a consistent offset) does, and survives re-encoding, gain and resampling (bench/dedup.py measures it).

The landmark fingerprint of 16 kHz audio: a 1024-point STFT every 32 ms, its log magnitude between 250 Hz and
3.75 kHz (so an 8 kHz copy, which lost everything above 4 kHz, keeps every peak used), local maxima of that
spectrogram within 35 dB of the loudest bin around them (a level relative to its surroundings: a gain change moves
none, and a clip keeps the peaks it had inside the longer file), and for each peak a hash of it and two of its next
four neighbours (its frequency, and each neighbour's frequency step and time step): 34 bits, mixed into 64 so that a
consistent sample of the hash space can be stored and indexed.

Why two neighbours, not one (the classic peak pair): a pair carries 21 bits, about 1.1 million values, and speech
favours some of them, so at ten million indexed segments every value has thousands of postings and a lookup reads
hundreds of thousands of them (bench/RESULTS.md measured 180 ms at one million segments). A triplet's 34 bits make
postings short, so a lookup stays a few binary searches. It costs some robustness (all three peaks must survive the
re-encode), which the six triplets of each anchor's four neighbours make up for: a copy that lost one neighbour still
shares three of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 1024
HOP = 512  # one fingerprint frame = 32 ms
FRAME_S = HOP / SAMPLE_RATE
LOW_BIN, HIGH_BIN = 16, 240  # 250 Hz .. 3.75 kHz at 15.6 Hz per bin
PEAK_DT, PEAK_DF = 4, 8  # a peak is the maximum of its (2*4+1) frames x (2*8+1) bins neighbourhood
LOUD_REACH = 31  # frames (1 s) either side whose loudest bin sets the floor for a peak
FAN_OUT = 4  # pairs per anchor peak
MAX_DT = 40  # target peaks at most this many frames (1.28 s) after the anchor
MAX_DF = 63
FLOOR_DB = 35.0  # peaks more than this below the loudest bin around them are noise
# An absolute floor too: in digital silence every bin ties with its neighbours and would be a "peak", giving every
# file with silence the same landmarks. A full-scale sine peaks at ~48 dB here, 16-bit quantization noise at ~-75 dB.
ABS_FLOOR_DB = -60.0
HASH_MIX = 0x9E3779B97F4A7C15  # Fibonacci hashing: spreads the 34 landmark bits over 64 so a range sample is uniform
CODE_BITS = 13  # one neighbour: frequency step (7 bits) and time step (6 bits)
PAIRS = tuple((a, b) for a in range(FAN_OUT) for b in range(a + 1, FAN_OUT))  # the six neighbour pairs of an anchor
# Stored fingerprints and index parts from another version cannot be compared with these (dedup refuses to mix them).
VERSION = "triplet-v1"

QUERY_SHIFTS = 4
SAMPLE_DENOMINATOR = 12
# Hashes below this are stored and indexed: a twelfth of the (well-mixed) 64-bit space. An anchor has six triplets
# where a pair fingerprint had four, so a twelfth keeps as many rows as an eighth of pairs did.
SAMPLE_LIMIT = (1 << 64) // SAMPLE_DENOMINATOR


@dataclass(frozen=True)
class Fingerprint:
    """Landmark hashes and the frame (32 ms) where each one's anchor peak lies."""

    hashes: np.ndarray  # uint64
    times: np.ndarray  # uint32, frames from the start of the audio fingerprinted (plus any offset given)

    def __len__(self) -> int:
        return int(self.hashes.shape[0])

    def to_bytes(self) -> tuple[bytes, bytes]:
        """The compact form stored in tables: little-endian uint64 hashes, little-endian uint32 times."""
        return self.hashes.astype("<u8").tobytes(), self.times.astype("<u4").tobytes()

    @classmethod
    def from_bytes(cls, hashes: bytes, times: bytes) -> Fingerprint:
        return cls(np.frombuffer(hashes, "<u8").astype(np.uint64), np.frombuffer(times, "<u4").astype(np.uint32))


def pcm_sha256(samples: np.ndarray) -> str:
    """SHA-256 of float samples as 16-bit integers (what the decoded FLAC holds: reading it back gives the same
    hash): equal for identical audio."""
    return hashlib.sha256(to_int16(samples).astype("<i2").tobytes()).hexdigest()


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples as the 16-bit integers libsndfile writes to the FLAC (scaled by 32768, rounded, clipped)."""
    return np.clip(np.round(np.asarray(samples, np.float64) * 32768.0), -32768, 32767).astype(np.int16)


class PcmHasher:
    """SHA-256 of a stream of float sample blocks, as :func:`pcm_sha256` of their concatenation."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def update(self, samples: np.ndarray) -> None:
        self._sha.update(to_int16(samples).astype("<i2").tobytes())

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _spectrogram(x: np.ndarray) -> np.ndarray:
    """Log magnitude (dB), frames x bins LOW_BIN..HIGH_BIN."""
    frames = 1 + (len(x) - N_FFT) // HOP
    windows = np.lib.stride_tricks.as_strided(
        x, shape=(frames, N_FFT), strides=(x.strides[0] * HOP, x.strides[0]), writeable=False
    )
    spec = np.fft.rfft(windows * _WINDOW, axis=1)[:, LOW_BIN:HIGH_BIN]
    power = spec.real.astype(np.float32) ** 2 + spec.imag.astype(np.float32) ** 2
    return 10.0 * np.log10(power + 1e-12)


_WINDOW = np.hanning(N_FFT).astype(np.float32)


def _max_filter(a: np.ndarray, reach: int, axis: int) -> np.ndarray:
    """Running maximum over ``2*reach+1`` cells along ``axis`` (edges padded with -inf)."""
    pad = [(0, 0), (0, 0)]
    pad[axis] = (reach, reach)
    padded = np.pad(a, pad, constant_values=-np.inf)
    out = a.copy()
    n = a.shape[axis]
    for shift in range(2 * reach + 1):
        view = padded[shift : shift + n] if axis == 0 else padded[:, shift : shift + n]
        np.maximum(out, view, out=out)
    return out


def peaks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spectral peaks of float samples: (frame, bin) arrays in time order."""
    if len(x) < N_FFT:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    db = _spectrogram(np.ascontiguousarray(x, dtype=np.float32))
    local = _max_filter(_max_filter(db, PEAK_DF, axis=1), PEAK_DT, axis=0)
    # Loud enough against what surrounds it (the loudest bin within a second either side), not against the whole
    # file: a clip cut from a recording keeps the same peaks as the recording, and a gain change moves none.
    loudest = _max_filter(db.max(axis=1, keepdims=True), LOUD_REACH, axis=0)
    is_peak = (db == local) & (db > loudest - FLOOR_DB) & (db > ABS_FLOOR_DB)
    t, f = np.nonzero(is_peak)
    return t, f


def fingerprint(x: np.ndarray, offset_frames: int = 0) -> Fingerprint:
    """The landmark fingerprint of 16 kHz float samples; times count frames from ``offset_frames``."""
    t, f = peaks(x)
    n = len(t)
    # Each anchor's neighbours: the next peaks inside its target zone, a vectorised scan over the following peaks.
    codes = []
    for step in range(1, FAN_OUT * 4 + 1):
        if step >= n:
            break
        dt = t[step:] - t[:-step]
        df = f[step:] - f[:-step]
        ok = (dt > 0) & (dt <= MAX_DT) & (np.abs(df) <= MAX_DF)
        codes.append(np.where(ok, ((df + MAX_DF) << 6) | dt, -1))
    if not codes:
        return Fingerprint(np.empty(0, np.uint64), np.empty(0, np.uint32))
    # Per anchor, the first FAN_OUT valid neighbours (in step order, i.e. nearest first) in columns 0..FAN_OUT-1.
    full = np.full((n, len(codes)), -1, dtype=np.int64)
    for i, col in enumerate(codes):
        full[: len(col), i] = col
    valid = full >= 0
    rank = np.cumsum(valid, axis=1)
    chosen = valid & (rank <= FAN_OUT)
    rows, cols = np.nonzero(chosen)
    near = np.full((n, FAN_OUT), -1, dtype=np.int64)
    near[rows, rank[rows, cols] - 1] = full[rows, cols]
    # Every pair of an anchor's neighbours, in a fixed order (anchor by anchor, pair by pair).
    a_idx = np.array([a for a, _ in PAIRS])
    b_idx = np.array([b for _, b in PAIRS])
    first, second = near[:, a_idx], near[:, b_idx]
    ok = (first >= 0) & (second >= 0)
    anchor, pair = np.nonzero(ok)
    raw = (
        (f[anchor].astype(np.uint64) << np.uint64(2 * CODE_BITS))
        | (first[anchor, pair].astype(np.uint64) << np.uint64(CODE_BITS))
        | second[anchor, pair].astype(np.uint64)
    )
    with np.errstate(over="ignore"):  # multiplication modulo 2^64 is the point
        mixed = raw * np.uint64(HASH_MIX)
    return Fingerprint(mixed, (t[anchor] + offset_frames).astype(np.uint32))


def query_prints(x: np.ndarray, offset_frames: int = 0) -> list[Fingerprint]:
    """Fingerprints of ``x`` on QUERY_SHIFTS frame grids, each a quarter hop later than the last.

    Two copies of a recording rarely start on the same sample (a clip cut anywhere, VAD boundaries that differ), and a
    peak pair's time step changes by a frame when the grids are half a hop apart: measured on espeak clips, the matched
    share falls from ~90% to 4-15%. One of four grids is within an eighth of a hop of the reference's, where the share
    is back at 40-100%; the index holds the first grid only, so only lookups pay for the other three.
    """
    step = HOP // QUERY_SHIFTS
    return [fingerprint(x[k * step :], offset_frames) for k in range(QUERY_SHIFTS)]


def sampled(print_: Fingerprint) -> Fingerprint:
    """The landmarks that are stored and indexed: a consistent twelfth of the hash space. Both copies of a recording
    keep the same ones, so matching needs no more, and tables and the index hold a twelfth of the rows."""
    keep = print_.hashes < np.uint64(SAMPLE_LIMIT)
    return Fingerprint(print_.hashes[keep], print_.times[keep])


def stored_prints(x: np.ndarray, offset_frames: int = 0) -> tuple[bytes, bytes, list[int]]:
    """The sampled landmarks of ``x`` on every query grid, packed for a table: hashes (uint64 LE), times (uint32 LE)
    and how many belong to each grid (the first grid's are what the index holds)."""
    prints = [sampled(p) for p in query_prints(x, offset_frames)]
    hashes = np.concatenate([p.hashes for p in prints]).astype("<u8").tobytes()
    times = np.concatenate([p.times for p in prints]).astype("<u4").tobytes()
    return hashes, times, [len(p) for p in prints]


def unpack_prints(hashes: bytes, times: bytes, sizes: list[int]) -> list[Fingerprint]:
    """The per-grid fingerprints of :func:`stored_prints`' output."""
    h, t = np.frombuffer(hashes, "<u8").astype(np.uint64), np.frombuffer(times, "<u4").astype(np.uint32)
    ends = np.cumsum(sizes)
    return [Fingerprint(h[e - n : e], t[e - n : e]) for n, e in zip(sizes, ends, strict=True)]
