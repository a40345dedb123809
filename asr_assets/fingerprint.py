"""Audio fingerprints for deduplication: an exact hash of the decoded PCM and a robust spectral-peak landmark hash.

Runs inside pool workers (import-light: numpy and hashlib only). Written here rather than taken from a library:
Chromaprint (the maintained one) is not installed on the workers and fingerprints whole files from their start, so it
does not find a 5-30 s clip inside a longer recording; landmark hashing (peak pairs with their time offset, matched by
voting on a consistent offset) does, and survives re-encoding, gain and resampling (bench/dedup.py measures it).

The landmark fingerprint of 16 kHz audio: a 1024-point STFT every 32 ms, its log magnitude between 250 Hz and
3.75 kHz (so an 8 kHz copy, which lost everything above 4 kHz, keeps every peak used), local maxima of that
spectrogram within 35 dB of the loudest bin around them (a level relative to its surroundings: a gain change moves
none, and a clip keeps the peaks it had inside the longer file), and for each peak a hash of it and each of its next
few neighbours (frequency, frequency step, time step): 21 bits, mixed into 32 so that a consistent sample of the hash
space can be stored and indexed.
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
HASH_MIX = 0x9E3779B1  # Fibonacci hashing: spreads the 21 landmark bits over 32 so a bit-range sample is uniform

QUERY_SHIFTS = 4
SAMPLE_LIMIT = 1 << 29  # hashes below this are stored and indexed: an eighth (the top 3 of 32 well-mixed bits are 0)


@dataclass(frozen=True)
class Fingerprint:
    """Landmark hashes and the frame (32 ms) where each one's anchor peak lies."""

    hashes: np.ndarray  # uint32
    times: np.ndarray  # uint32, frames from the start of the audio fingerprinted (plus any offset given)

    def __len__(self) -> int:
        return int(self.hashes.shape[0])

    def to_bytes(self) -> tuple[bytes, bytes]:
        """The compact form stored in tables: little-endian uint32 hashes, little-endian uint32 times."""
        return self.hashes.astype("<u4").tobytes(), self.times.astype("<u4").tobytes()

    @classmethod
    def from_bytes(cls, hashes: bytes, times: bytes) -> Fingerprint:
        return cls(np.frombuffer(hashes, "<u4").astype(np.uint32), np.frombuffer(times, "<u4").astype(np.uint32))


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
    hashes = []
    # Pair each anchor with the next FAN_OUT peaks inside its target zone: a vectorised scan over the following peaks.
    for step in range(1, FAN_OUT * 4 + 1):
        if step >= n:
            break
        dt = t[step:] - t[:-step]
        df = f[step:] - f[:-step]
        ok = (dt > 0) & (dt <= MAX_DT) & (np.abs(df) <= MAX_DF)
        hashes.append(np.where(ok, (f[:-step] << 13) | ((df + MAX_DF) << 6) | dt, -1))
    if not hashes:
        return Fingerprint(np.empty(0, np.uint32), np.empty(0, np.uint32))
    # Per anchor, the first FAN_OUT valid pairs (in step order, i.e. nearest targets first).
    width = len(hashes)
    full = np.full((n, width), -1, dtype=np.int64)
    for i, col in enumerate(hashes):
        full[: len(col), i] = col
    valid = full >= 0
    rank = np.cumsum(valid, axis=1)
    chosen = valid & (rank <= FAN_OUT)
    anchor, _ = np.nonzero(chosen)
    raw = full[chosen].astype(np.uint64)
    mixed = ((raw * HASH_MIX) & 0xFFFFFFFF).astype(np.uint32)
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
    """The landmarks that are stored and indexed: a consistent eighth of the hash space. Both copies of a recording
    keep the same ones, so matching needs no more, and tables and the index hold an eighth of the rows."""
    keep = print_.hashes < SAMPLE_LIMIT
    return Fingerprint(print_.hashes[keep], print_.times[keep])


def stored_prints(x: np.ndarray, offset_frames: int = 0) -> tuple[bytes, bytes, list[int]]:
    """The sampled landmarks of ``x`` on every query grid, packed for a table: hashes, times (uint32 LE) and how many
    belong to each grid (the first grid's are what the index holds)."""
    prints = [sampled(p) for p in query_prints(x, offset_frames)]
    hashes = np.concatenate([p.hashes for p in prints]).astype("<u4").tobytes()
    times = np.concatenate([p.times for p in prints]).astype("<u4").tobytes()
    return hashes, times, [len(p) for p in prints]


def unpack_prints(hashes: bytes, times: bytes, sizes: list[int]) -> list[Fingerprint]:
    """The per-grid fingerprints of :func:`stored_prints`' output."""
    h, t = np.frombuffer(hashes, "<u4").astype(np.uint32), np.frombuffer(times, "<u4").astype(np.uint32)
    ends = np.cumsum(sizes)
    return [Fingerprint(h[e - n : e], t[e - n : e]) for n, e in zip(sizes, ends, strict=True)]
