"""DNSMOS P.835 acoustic quality (SIG, BAK, OVRL on a 1-5 scale) through onnxruntime, without torch or librosa.

The ONNX model ships inside the ``speechmos`` wheel, installed with ``--no-deps``: the package's own module imports
librosa and requests, so the file is located with ``resources.packaged.package_file`` instead. The model takes
9.01 s of 16 kHz audio per row and returns raw scores that the DNS Challenge's non-personalized polynomials map to MOS.

Two departures from the reference script (DNSMOS ``dnsmos_local.py``), both to bound cost: a clip shorter than 9.01 s
is tiled cyclically to exactly one window (the reference doubles it until it is long enough, then slides over it),
and a longer clip is scored in the fewest 9.01 s windows that cover every sample, spread evenly (the reference hops
1 s, which costs ~20 windows for a 30 s segment instead of 4). Runs inside pool workers: import-light, no Dagster.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from asr_assets.records import SAMPLE_RATE
from resources.packaged import package_file

WINDOW = round(9.01 * SAMPLE_RATE)  # samples per model input (144160); the model knows 16 kHz input only

# DNS Challenge mapping of raw model outputs to MOS (non-personalized), as in the reference script.
_SIG = np.poly1d([-0.08397278, 1.22083953, 0.0052439])
_BAK = np.poly1d([-0.13166888, 1.60915514, -0.39604546])
_OVRL = np.poly1d([-0.06766283, 1.11546468, 0.04602535])


class DnsmosScore(NamedTuple):
    """DNSMOS P.835 scores of one clip, each on a 1-5 scale (the mean over its windows).

    Attributes:
        sig: speech signal quality (distortion of the voice itself).
        bak: background quality (intrusiveness of the noise; higher is quieter).
        ovrl: overall quality.
    """

    sig: float
    bak: float
    ovrl: float


def model_path() -> Path:
    """The SIG/BAK/OVRL ONNX model inside the installed speechmos wheel, found without importing the package (which
    imports librosa).

    Raises:
        FileNotFoundError: speechmos is not installed; the message says how to install it.
    """
    return package_file(
        "speechmos",
        "dnsmos_models/sig_bak_ovr.onnx",
        "speechmos (the DNSMOS models)",
        "run `make install` (it installs the wheel with --no-deps)",
    )


@functools.cache
def model_sha256() -> str:
    """SHA-256 of the DNSMOS model file, recorded as lineage."""
    return hashlib.sha256(model_path().read_bytes()).hexdigest()


def selected(segment_id: str, fraction: float) -> bool:
    """Whether a segment is in the scored sample: a hash of its id below ``fraction`` (0: none, 1: all).

    Deterministic, so a re-run or another worker picks the same segments; keyed so the sample is independent of the
    uri hash that assigns shards.
    """
    digest = hashlib.blake2b(segment_id.encode(), digest_size=8, person=b"dnsmos").digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def windows(pcm: np.ndarray) -> np.ndarray:
    """The model inputs for one clip, shape ``(n, 144160)`` float32: one tiled window for a clip up to 9.01 s, else
    ``ceil(len / 9.01 s)`` windows spread evenly from its start to its end.

    Raises:
        ValueError: the clip is empty.
    """
    if pcm.shape[0] == 0:
        raise ValueError("DNSMOS: cannot score an empty clip")
    if pcm.shape[0] <= WINDOW:
        return np.resize(pcm.astype(np.float32, copy=False), (1, WINDOW))
    count = -(-pcm.shape[0] // WINDOW)
    starts = np.linspace(0, pcm.shape[0] - WINDOW, count).round().astype(np.int64)
    return np.stack([pcm[s : s + WINDOW] for s in starts]).astype(np.float32, copy=False)


class Dnsmos:
    """The DNSMOS model in one onnxruntime session with one intra-op thread (parallelism comes from worker
    processes), fed ``batch_windows`` windows per call."""

    def __init__(self, path: Path, batch_windows: int = 1) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._batch = batch_windows

    def raw(self, inputs: np.ndarray) -> np.ndarray:
        """Raw model outputs (SIG, BAK, OVRL before the MOS mapping) of windows ``(n, 144160)``, shape ``(n, 3)``."""
        return np.concatenate(
            [
                self._session.run(None, {"input_1": inputs[i : i + self._batch]})[0]
                for i in range(0, inputs.shape[0], self._batch)
            ]
        )

    def score(self, pcm: np.ndarray) -> DnsmosScore:
        """DNSMOS of 16 kHz mono float samples in [-1, 1]: each window's raw scores mapped to MOS, then averaged."""
        raw = self.raw(windows(pcm)).astype(np.float64)
        return DnsmosScore(
            float(np.mean(_SIG(raw[:, 0]))), float(np.mean(_BAK(raw[:, 1]))), float(np.mean(_OVRL(raw[:, 2])))
        )


@functools.cache
def _session() -> Dnsmos:
    return Dnsmos(model_path())  # one per worker process, reused for every segment


def score(pcm: np.ndarray) -> DnsmosScore:
    """DNSMOS (SIG, BAK, OVRL) of 16 kHz mono float samples in [-1, 1], with this process's cached session."""
    return _session().score(pcm)
