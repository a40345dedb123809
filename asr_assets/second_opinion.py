"""The second opinion: an independent model labels a deterministic sample of the teacher's segments, and the
normalized error rate between the two texts is a per-segment signal (``disagreement`` in the transcripts).

The teacher's text is the reference and the second text the hypothesis, both normalized the way the filters normalize
(``distill.canonical_text``: NFKC, lower case, punctuation removed, English number words as digits, spelled
letters joined): word error rate, or character error rate for
scripts written without spaces between words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from hashlib import blake2b

import jiwer

from resources.teachers.base import TeacherEngine

UNSPACED_LANGUAGES = frozenset({"zh", "ja", "ko", "th"})
"""Languages judged by character error rate (Korean spaces its words, but its units are syllables: CER is the norm)."""


def disagreement(teacher_text: str, second_text: str, language: str) -> float:
    """Normalized error rate of ``second_text`` against ``teacher_text``, in [0, 1].

    WER, or CER for ``UNSPACED_LANGUAGES``; two empty texts (after normalization) disagree by 0, one empty text by 1,
    and insertions cannot push it past 1.
    """
    # Imported here: distill imports stages, which imports this module.
    from asr_assets.distill import canonical_text

    reference, hypothesis = canonical_text(teacher_text, language), canonical_text(second_text, language)
    if language.split("-")[0].lower() in UNSPACED_LANGUAGES:
        reference, hypothesis = "".join(reference.split()), "".join(hypothesis.split())
        measure = jiwer.cer
    else:
        measure = jiwer.wer
    if not reference or not hypothesis:
        return 0.0 if reference == hypothesis else 1.0
    return min(1.0, float(measure(reference, hypothesis)))


def row_disagreement(row: dict) -> float | None:
    """A transcript row's disagreement, computed from its two texts the current way (None without a second opinion).

    What the rules and the report read: the stored ``disagreement`` column keeps the normalization in force when the
    row was written, which a later release may refine."""
    if row.get("second_text") is None:
        return None
    return disagreement(row["text"], row["second_text"], row["language"])


def is_sampled(segment_id: str, fraction: float) -> bool:
    """Whether the segment gets a second opinion: a hash of its id against ``fraction``, so every run (and every
    re-run after a crash) picks the same segments; 1.0 picks all, 0.0 none."""
    if fraction >= 1.0:
        return True
    draw = int.from_bytes(blake2b(segment_id.encode(), digest_size=8).digest(), "big") / 2**64
    return draw < fraction


@dataclass(frozen=True)
class SecondOpinion:
    """The second opinion for ``transcribe_shard``.

    Attributes:
        engine: returns the loaded second engine (called only when a selected segment has a teacher label).
        fraction: share of segments that get one (see :func:`is_sampled`).
    """

    engine: Callable[[], TeacherEngine]
    fraction: float


@dataclass
class SecondOpinionStats:
    """What the second opinion did in one run.

    Attributes:
        segments: segments it labelled.
        failed: selected segments it could not label (their columns stay null; the teacher's label is kept).
        seconds: wall time of its calls.
        audio_s: seconds of audio it labelled.
        disagreement_sum: sum of the labelled segments' disagreement.
    """

    segments: int = 0
    failed: int = 0
    seconds: float = 0.0
    audio_s: float = 0.0
    disagreement_sum: float = 0.0

    def merge(self, other: SecondOpinionStats) -> None:
        self.segments += other.segments
        self.failed += other.failed
        self.seconds += other.seconds
        self.audio_s += other.audio_s
        self.disagreement_sum += other.disagreement_sum

    def totals(self) -> dict[str, float | int]:
        """Flat numbers for a stage report's totals (and back through :meth:`from_totals`)."""
        return {
            "second_opinion_segments": self.segments,
            "second_opinion_failed": self.failed,
            "second_opinion_s": round(self.seconds, 3),
            "second_opinion_audio_s": round(self.audio_s, 3),
            "second_opinion_disagreement_sum": round(self.disagreement_sum, 6),
        }

    @classmethod
    def from_totals(cls, totals: dict) -> SecondOpinionStats:
        return cls(
            segments=int(totals.get("second_opinion_segments", 0)),
            failed=int(totals.get("second_opinion_failed", 0)),
            seconds=float(totals.get("second_opinion_s", 0.0)),
            audio_s=float(totals.get("second_opinion_audio_s", 0.0)),
            disagreement_sum=float(totals.get("second_opinion_disagreement_sum", 0.0)),
        )

    def metadata(self) -> dict[str, float | int]:
        """The run's cost and mean disagreement (when it labelled anything), for the asset's metadata."""
        meta: dict[str, float | int] = {
            "second_opinion_segments": self.segments,
            "second_opinion_failed": self.failed,
            "second_opinion_seconds": round(self.seconds, 2),
            "second_opinion_segments_per_s": round(self.segments / self.seconds, 2) if self.seconds else 0.0,
            "second_opinion_x_realtime": round(self.audio_s / self.seconds, 1) if self.seconds else 0.0,
        }
        if self.segments:
            meta["mean_disagreement"] = round(self.disagreement_sum / self.segments, 4)
        return meta
