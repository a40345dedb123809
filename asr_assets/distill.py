"""Filter teacher labels and pack the kept segments for trainers (``distilled_dataset``).

Each filter is a small named rule with its parameters; rules run in a fixed order, a segment is dropped by the first
rule that fires, and every rule that would have fired is recorded too. Kept segments are packed as WebDataset tar
shards (``{key}.flac`` + ``{key}.json``) with deterministic bytes, plus a Parquet manifest and per-file transcripts.

Each build of a shard's dataset is written under its own folder, ``distilled/{shard}/{build_id}/`` (the id is a hash
of the inputs and settings), and committed by writing the ``distilled/{shard}.current.json`` pointer and then the
manifest users read, ``distilled/{shard}.parquet``; readers never see a half-written build, and a build that stopped
being current is kept for a grace period before it is removed.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import time
import unicodedata
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import soundfile as sf

from asr_assets import dedup, layout
from asr_assets.languages import (
    CHAR_RATE_LANGUAGES,
    TEXT_LID_LANGUAGES,
    are_related,
    base_language,
    majority_language,
    script_share,
    text_language,
    unspaced_text,
    unspaced_units,
)
from asr_assets.media import read_audio
from asr_assets.records import (
    AUDIO_SCHEMA,
    DECISION_SCHEMA,
    FEATURE_SCHEMA,
    SAMPLE_RATE,
    SEGMENT_SCHEMA,
    VAD_MEDIA_SCHEMA,
    DecisionRow,
    to_table,
)
from asr_assets.second_opinion import row_disagreement
from asr_assets.stages import StageReport, read_transcripts
from resources.storage import ObjectInfo, ObjectStore, read_table, write_table

FILTER_VERSION = "filters-v3"

# The dataset manifest (distilled/{shard}.parquet): one row per kept segment, the same fields as its {key}.json plus
# the tar that holds it.
MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("tar_key", pa.string()),
        ("text", pa.string()),
        ("language", pa.string()),
        ("duration", pa.float64()),
        ("source_uri", pa.string()),
        ("media_id", pa.string()),
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("avg_logprob", pa.float32()),
        ("no_speech_prob", pa.float32()),
        ("teacher_model", pa.string()),
        ("teacher_engine", pa.string()),
        ("teacher_settings_hash", pa.string()),
        ("prompt_version", pa.string()),
        ("vad_model_sha256", pa.string()),
        ("vad_params", pa.string()),
        ("filter_version", pa.string()),
        ("filter_params_sha", pa.string()),
        ("speech_s", pa.float64()),
        ("disagreement", pa.float32()),
        ("second_model", pa.string()),
        ("dnsmos_ovrl", pa.float32()),
        ("language_prob", pa.float32()),
        ("lid_model", pa.string()),
    ]
)

_SEGMENT_STRUCT = pa.struct(
    [
        ("segment_id", pa.string()),
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("text", pa.string()),
        ("avg_logprob", pa.float64()),
        ("status", pa.string()),
        ("language", pa.string()),
        ("language_prob", pa.float64()),
        ("lid_model", pa.string()),
        ("duplicate_of", pa.string()),
        ("duplicate_of_uri", pa.string()),
        ("similarity", pa.float64()),
        ("duplicate_kind", pa.string()),
        ("eval_set", pa.string()),
    ]
)
# Per-file transcripts (files.parquet in a build's folder): the same records as files.jsonl.
FILES_SCHEMA = pa.schema(
    [
        ("media_id", pa.string()),
        ("uri", pa.string()),
        ("outcome", pa.string()),
        ("duration_s", pa.float64()),
        ("text", pa.string()),
        ("segments", pa.list_(_SEGMENT_STRUCT)),
        ("failure", pa.struct([("stage", pa.string()), ("error_class", pa.string()), ("error", pa.string())])),
        ("language", pa.string()),
        ("duplicate_of", pa.string()),
        ("similarity", pa.float64()),
        ("duplicate_kind", pa.string()),
    ]
)


@dataclass(frozen=True)
class Candidate:
    """One transcribed segment with the signals the rules look at.

    Attributes:
        segment_id: the segment.
        text: teacher transcript.
        duration_s: segment length in seconds (VAD padding and pauses included).
        rms_dbfs: segment level in dBFS.
        avg_logprob: mean token log probability (None when no tokens).
        no_speech_prob: engine's no-speech probability (None when the engine has none).
        compression_ratio: zlib ratio of the text (None for empty text).
        finish_reason: ``stop`` or ``length``.
        language: language the segment was transcribed in (ISO 639-1; the detected audio language with
            ``ASR_LANGUAGE=auto``).
        clip_ratio: fraction of samples at full scale.
        speech_s: voiced seconds inside the segment (VAD windows at or above its threshold); None when unknown.
        disagreement: normalized error rate between the teacher's text and an independent model's (0 = the same
            words, 1 = nothing in common); None when the segment got no second opinion.
        dnsmos_ovrl: DNSMOS overall quality (1-5); None when not scored.
        language_prob: the audio language ID's probability of ``language``; None when the language was fixed.
    """

    segment_id: str
    text: str
    duration_s: float
    rms_dbfs: float
    avg_logprob: float | None
    no_speech_prob: float | None
    compression_ratio: float | None
    finish_reason: str
    language: str = "en"
    clip_ratio: float = 0.0
    speech_s: float | None = None
    disagreement: float | None = None
    dnsmos_ovrl: float | None = None
    language_prob: float | None = None

    @property
    def chars_per_s(self) -> float:
        """Letters and digits per voiced second (per second of the segment when the voiced time is unknown);
        characters or syllables for ``CHAR_RATE_LANGUAGES``."""
        return chars_per_s(self.text, voiced_seconds(self.duration_s, self.speech_s), self.language)


def voiced_seconds(duration_s: float, speech_s: float | None) -> float:
    """The time a speaking rate is measured over: the VAD's voiced time inside the segment, never under a quarter of
    the segment (a quiet speaker whose windows sit just under the VAD threshold must not look like a fast one), and
    the whole segment when the voiced time is unknown (tables written before it was recorded)."""
    if speech_s is None:
        return duration_s
    return min(duration_s, max(speech_s, 0.25 * duration_s))


# Letters a digit or a lone Latin letter takes when said aloud ("five", "em"): read as one character each, spelled
# letters and digit strings look like very slow speech, and the rate rules dropped correct labels of them.
SPOKEN_DIGIT_CHARS = 4
SPOKEN_LETTER_CHARS = 3


def spoken_chars(text: str, language: str = "en") -> int:
    """Letters and digits of the text as spoken: a digit counts as ``SPOKEN_DIGIT_CHARS``, a lone Latin letter (a
    spelled one) as ``SPOKEN_LETTER_CHARS``, anything else one per letter. For ``CHAR_RATE_LANGUAGES``: characters
    (Han, kana) or Hangul syllables (``languages.unspaced_units``)."""
    if base_language(language) in CHAR_RATE_LANGUAGES:
        return unspaced_units(text)
    count = 0
    for token in normalize_text(text).split():
        if token.isdigit():
            count += SPOKEN_DIGIT_CHARS * len(token)
        elif len(token) == 1 and token.isascii() and token.isalpha():
            count += SPOKEN_LETTER_CHARS
        else:
            count += sum(ch.isalnum() for ch in token)
    return count


def chars_per_s(text: str, duration_s: float, language: str = "en") -> float:
    """Speaking rate: spoken letters (characters for zh/ja/ko) per second (``spoken_chars``; what the speaking-rate
    rules and the report use)."""
    return spoken_chars(text, language) / max(duration_s, 1e-3)


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (for phrase matching and WER)."""
    text = unicodedata.normalize("NFKC", text).lower()
    # Combining marks stay: they are part of a letter (Thai vowels and tones, Devanagari vowel signs).
    text = "".join(
        ch if (ch.isalnum() or ch.isspace() or ch == "'" or unicodedata.category(ch).startswith("M")) else " "
        for ch in text
    )
    return " ".join(text.replace("'", "").split())


_UNITS = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
_TEENS_TENS = "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety"
_EN_NUMBERS = dict(
    zip(
        f"{_UNITS} {_TEENS_TENS}".split(),  # noqa: SIM905 - a list literal of 28 words reads worse
        [str(n) for n in [*range(20), *range(20, 100, 10)]],
        strict=True,
    )
)


# Contractions written either way by references and teachers ("I'm sorry, that's" = "I am sorry, that is"). "'s"
# is only expanded after pronouns: elsewhere it is a possessive.
_EN_WHOLE = {"can't": "can not", "cannot": "can not", "won't": "will not", "let's": "let us"} | {
    f"{w}'s": f"{w} is" for w in ("it", "that", "he", "she", "what", "there", "here", "who", "where")
}
_EN_WHOLE_WORD = re.compile(r"\b(" + "|".join(re.escape(w) for w in _EN_WHOLE) + r")\b", re.IGNORECASE)
_EN_CONTRACTIONS = {"'m": " am", "'re": " are", "'ve": " have", "'ll": " will", "'d": " would", "n't": " not"}
_EN_CONTRACTION = re.compile(r"(\w)('m|'re|'ve|'ll|'d|n't)\b", re.IGNORECASE)


def canonical_text(text: str, language: str = "en") -> str:
    """``normalize_text`` plus the spellings two correct transcripts differ in: English number words as digits
    ("press one" = "Press 1."), and spelled-out letters joined ("M-I-S-D-N" = "MISDN"). Used wherever two texts are
    compared (second-opinion disagreement, label error rates), so formatting is not counted as an error. English
    contractions are expanded ("I'm" = "I am", "don't" = "do not") and "#" is "pound".

    Accents on Latin letters are removed (``_strip_latin_accents``) and Russian "ё" is "е": references and
    teachers differ in them far more often than in the word said. Other scripts keep every letter and mark."""
    language = base_language(language) or "en"
    text = _strip_latin_accents(text) if language != "vi" else text
    if language == "ru":
        text = text.replace("ё", "е").replace("Ё", "Е")
    if language == "en":
        text = _EN_WHOLE_WORD.sub(lambda m: _EN_WHOLE[m.group(1).lower()], text.replace("’", "'"))
        text = _EN_CONTRACTION.sub(lambda m: m.group(1) + _EN_CONTRACTIONS[m.group(2).lower()], text)
        text = text.replace("#", " pound ")
    words = normalize_text(text).split()
    if language == "en":
        words = [_EN_NUMBERS.get(w, w) for w in words]
    out: list[str] = []
    letters: list[str] = []
    for w in [*words, ""]:
        # Spelled letters are Latin ones: single-letter Cyrillic words are prepositions ("в", "с", "и"), not spelling.
        if len(w) == 1 and w.isalpha() and w.isascii():
            letters.append(w)
            continue
        if letters:
            out.append("".join(letters))
            letters = []
        if w:
            out.append(w)
    return " ".join(out)


def _strip_latin_accents(text: str) -> str:
    """Combining marks removed from Latin letters only ("está" -> "esta"); Cyrillic "й", Devanagari and Thai
    vowel signs, and kana voicing marks stay (there the mark makes another letter). Vietnamese is left alone by the
    caller: its tone marks tell words apart."""
    out: list[str] = []
    base_is_latin = False
    for ch in unicodedata.normalize("NFD", text):
        if unicodedata.category(ch) == "Mn":
            if base_is_latin:
                continue
        else:
            base_is_latin = ch.isascii() and ch.isalpha() or unicodedata.name(ch, "").startswith("LATIN")
        out.append(ch)
    return unicodedata.normalize("NFC", "".join(out))


class Rule(ABC):
    """A filter: ``drops`` says whether the candidate should be removed, ``name`` is the recorded reason.

    A rule that judges a segment against its shard (a quantile, an inter-quartile fence) computes its thresholds in
    ``fit`` from every candidate of the shard and returns a fitted copy; the others return themselves.
    """

    name: ClassVar[str]

    def fit(self, candidates: list[Candidate]) -> Rule:
        """This rule with any shard-level thresholds computed from ``candidates``."""
        return self

    @abstractmethod
    def drops(self, c: Candidate) -> bool:
        """True when this rule removes the candidate."""


@dataclass(frozen=True)
class EmptyText(Rule):
    """No letters or digits at all (empty or punctuation-only)."""

    name: ClassVar[str] = "empty_text"

    def drops(self, c: Candidate) -> bool:
        return not any(ch.isalnum() for ch in c.text)


@dataclass(frozen=True)
class TooShort(Rule):
    """Shorter than ``min_s`` seconds: fragments carry little signal and attract hallucinations."""

    min_s: float = 0.5
    name: ClassVar[str] = "too_short"

    def drops(self, c: Candidate) -> bool:
        return c.duration_s < self.min_s


@dataclass(frozen=True)
class TooLong(Rule):
    """Longer than ``max_s`` seconds: past the teacher's window, so the label is likely truncated."""

    max_s: float = 30.0
    name: ClassVar[str] = "too_long"

    def drops(self, c: Candidate) -> bool:
        return c.duration_s > self.max_s + 1e-6


@dataclass(frozen=True)
class NearSilent(Rule):
    """Audio level under ``max_rms_dbfs``: no usable speech whatever the text says."""

    max_rms_dbfs: float = -50.0
    name: ClassVar[str] = "near_silent"

    def drops(self, c: Candidate) -> bool:
        return c.rms_dbfs < self.max_rms_dbfs


@dataclass(frozen=True)
class Clipped(Rule):
    """More than ``max_clip_ratio`` of the samples at full scale: distorted audio teaches the student distortion."""

    max_clip_ratio: float = 0.01
    name: ClassVar[str] = "clipped"

    def drops(self, c: Candidate) -> bool:
        return c.clip_ratio > self.max_clip_ratio


HALLUCINATION_PHRASES = (
    "you",
    "thank you",
    "thank you very much",
    "thanks for watching",
    "thank you for watching",
    "please subscribe",
    "subtitles by the amaraorg community",
    "bye",
)


@dataclass(frozen=True)
class HallucinationPhrase(Rule):
    """A phrase Whisper-style teachers emit on silence or noise, when the audio is short, quiet or judged non-speech."""

    phrases: tuple[str, ...] = HALLUCINATION_PHRASES
    max_duration_s: float = 2.0
    max_rms_dbfs: float = -45.0
    min_no_speech_prob: float = 0.5
    name: ClassVar[str] = "hallucination_phrase"

    def drops(self, c: Candidate) -> bool:
        if normalize_text(c.text) not in self.phrases:
            return False
        suspicious_audio = c.duration_s <= self.max_duration_s or c.rms_dbfs <= self.max_rms_dbfs
        return suspicious_audio or (c.no_speech_prob or 0.0) >= self.min_no_speech_prob


@functools.cache
def _repeat_pattern(times: int, min_words: int = 1) -> re.Pattern:
    """A ``min_words``-4 word n-gram occurring ``times`` times back to back (the first occurrence plus times-1
    repeats)."""
    gram = r"\w+(?:\W+\w+){" + str(min_words - 1) + ",3}?"
    return re.compile(r"\b(" + gram + r")(?:\W+\1\b){" + str(max(times - 1, 1)) + ",}", re.IGNORECASE)


@functools.cache
def _char_repeat_pattern(times: int, min_chars: int, max_chars: int) -> re.Pattern:
    """A ``min_chars``-``max_chars`` character n-gram occurring ``times`` times back to back."""
    return re.compile(r"(.{" + f"{min_chars},{max_chars}" + r"}?)\1{" + str(max(times - 1, 1)) + ",}")


@dataclass(frozen=True)
class RepetitionLoop(Rule):
    """A decoding loop: highly compressible text, a 1-4 word n-gram said ``max_repeats`` times in a row, a phrase of
    2-4 words said ``max_phrase_repeats`` times in a row (people repeat a word for emphasis, rarely a whole phrase
    three times), or a ``length`` finish.

    Text in scripts written without spaces (Han, kana, Thai) has no words to count: its characters
    (``languages.unspaced_text``) are searched for a 2-3 character n-gram (about a word) ``max_repeats`` times in a
    row, a 4-8 character one (a phrase) ``max_phrase_repeats`` times, or one character twice ``max_repeats`` times
    (laughter "哈哈哈哈" and "对对对" are speech)."""

    max_compression_ratio: float = 2.4
    max_repeats: int = 4
    max_phrase_repeats: int = 3
    name: ClassVar[str] = "repetition"

    def drops(self, c: Candidate) -> bool:
        if c.finish_reason == "length":
            return True
        if c.compression_ratio is not None and c.compression_ratio > self.max_compression_ratio:
            return True
        if _repeat_pattern(self.max_repeats).search(c.text) is not None:
            return True
        if _repeat_pattern(self.max_phrase_repeats, min_words=2).search(c.text) is not None:
            return True
        chars = unspaced_text(c.text)
        return chars != "" and any(
            _char_repeat_pattern(times, low, high).search(chars) is not None
            for times, low, high in (
                (2 * self.max_repeats, 1, 1),
                (self.max_repeats, 2, 3),
                (self.max_phrase_repeats, 4, 8),
            )
        )


@dataclass(frozen=True)
class LanguageMismatch(Rule):
    """The teacher's text is not in the segment's language: a teacher that translates (English text on Spanish
    audio) or answers in another language.

    Two signals, each used only where it is reliable (``languages``):

    - script: under ``min_script_share`` of the text's units (words; characters of Han, kana, Thai) are in the
      scripts the language is written in (zh audio with pinyin or English, en audio with Cyrillic), judged on texts
      of at least ``min_script_units`` units;
    - text LID (py3langid among ``TEXT_LID_LANGUAGES``): on a text of at least ``min_letters`` letters, another
      language than the segment's, and not a close relative (es/ca/gl/pt/it, ru/uk/bg, ...), with probability at
      least ``min_prob`` and at least ``min_margin`` nats of evidence per letter over the segment's language (a
      list of names or code words reads as some language with a high probability, but on little evidence).

    Short or ambiguous text is never judged ("OK" in Mandarin speech is speech), nor a language outside the tables,
    nor a segment whose audio language ID was unsure (``language_prob`` under ``min_audio_prob``: the teacher may
    have been asked for no particular language).
    """

    min_script_units: int = 3
    min_script_share: float = 0.5
    min_letters: int = 20
    min_prob: float = 0.99
    min_margin: float = 0.4
    min_audio_prob: float = 0.5
    name: ClassVar[str] = "language_mismatch"

    def drops(self, c: Candidate) -> bool:
        if c.language_prob is not None and c.language_prob < self.min_audio_prob:
            return False
        share = script_share(c.text, c.language)
        if share is not None and share[1] >= self.min_script_units and share[0] < self.min_script_share:
            return True
        language = base_language(c.language)
        if language not in TEXT_LID_LANGUAGES or sum(ch.isalpha() for ch in c.text) < self.min_letters:
            return False
        found, prob, margin = text_language(c.text, language)
        return prob >= self.min_prob and margin >= self.min_margin and not are_related(found, language)


@dataclass(frozen=True)
class NoSpeech(Rule):
    """Whisper's own no-speech rule: high no-speech probability together with low confidence."""

    min_no_speech_prob: float = 0.6
    max_avg_logprob: float = -1.0
    name: ClassVar[str] = "no_speech"

    def drops(self, c: Candidate) -> bool:
        if c.no_speech_prob is None or c.avg_logprob is None:
            return False
        return c.no_speech_prob > self.min_no_speech_prob and c.avg_logprob < self.max_avg_logprob


@dataclass(frozen=True)
class LowConfidence(Rule):
    """Mean token log probability below ``min_avg_logprob``, or below the shard's ``quantile`` (0 turns that off)."""

    min_avg_logprob: float = -1.0
    quantile: float = 0.0
    shard_threshold: float | None = None
    name: ClassVar[str] = "low_confidence"

    def fit(self, candidates: list[Candidate]) -> Rule:
        scores = [c.avg_logprob for c in candidates if c.avg_logprob is not None]
        if not self.quantile or not scores:
            return self
        return replace(self, shard_threshold=float(np.quantile(scores, self.quantile)))

    def drops(self, c: Candidate) -> bool:
        if c.avg_logprob is None:
            return True
        threshold = max(self.min_avg_logprob, self.shard_threshold if self.shard_threshold is not None else -np.inf)
        return c.avg_logprob < threshold


@dataclass(frozen=True)
class SpeakingRate(Rule):
    """Characters (letters and digits) per second outside ``[min_cps, max_cps]``: truncated or invented text.

    Languages counted in characters or syllables (zh, ja, ko: ``CHAR_RATE_LANGUAGES``) have their own bounds,
    ``[min_char_cps, max_char_cps]``: normal Mandarin is ~3-8 characters a second, where English is 10-20 letters.
    """

    min_cps: float = 2.0
    max_cps: float = 30.0
    min_char_cps: float = 1.0
    max_char_cps: float = 12.0
    name: ClassVar[str] = "speaking_rate"

    def drops(self, c: Candidate) -> bool:
        if base_language(c.language) in CHAR_RATE_LANGUAGES:
            return not self.min_char_cps <= c.chars_per_s <= self.max_char_cps
        return not self.min_cps <= c.chars_per_s <= self.max_cps


@dataclass(frozen=True)
class SpeakingRateOutlier(Rule):
    """Speaking rate far from the shard's own, per language: outside ``[Q1 / f, Q3 * f]`` with
    ``f = exp(k * max(IQR, min_log_iqr))``, quartiles taken over log(chars per voiced second).

    Rates are compared as ratios (log space), and the fence width has a floor: a narrow distribution (one speaker,
    calm prompts) must not turn its own tails into outliers. With the defaults a segment is judged only when its rate
    is under ~0.62 x the shard's lower quartile or over ~1.6 x its upper quartile; a transcript cut in half lands
    below. Languages with fewer than ``min_segments`` segments in the shard are not judged.
    """

    k: float = 1.5
    min_segments: int = 20
    min_log_iqr: float = 0.32
    fences: tuple[tuple[str, float, float], ...] = ()
    name: ClassVar[str] = "speaking_rate_outlier"

    def fit(self, candidates: list[Candidate]) -> Rule:
        by_language: dict[str, list[float]] = {}
        for c in candidates:
            if any(ch.isalnum() for ch in c.text):
                by_language.setdefault(c.language, []).append(np.log(max(c.chars_per_s, 1e-3)))
        fences = []
        for language, rates in sorted(by_language.items()):
            if len(rates) >= self.min_segments:
                q1, q3 = np.quantile(rates, [0.25, 0.75])
                width = self.k * max(float(q3 - q1), self.min_log_iqr)
                fences.append((language, float(np.exp(q1 - width)), float(np.exp(q3 + width))))
        return replace(self, fences=tuple(fences))

    def drops(self, c: Candidate) -> bool:
        for language, low, high in self.fences:
            if language == c.language:
                return not low <= c.chars_per_s <= high
        return False


@dataclass(frozen=True)
class Disagreement(Rule):
    """The teacher and an independent model disagree: their normalized error rate (WER; CER for unspaced scripts)
    is above ``max_disagreement``. A segment without a second opinion is not judged."""

    max_disagreement: float = 0.6
    name: ClassVar[str] = "disagreement"

    def drops(self, c: Candidate) -> bool:
        # Read back from a float32 column (the manifest) 3 of 5 words is 0.60000002: it must not cross 0.6.
        return c.disagreement is not None and c.disagreement > self.max_disagreement + 1e-6


@dataclass(frozen=True)
class UnsureDisagreement(Rule):
    """The teacher is unsure (mean token logprob under ``max_avg_logprob``) and the second opinion disagrees with
    more than ``max_disagreement`` of its words: either signal alone is common on good labels, both together
    mostly on wrong ones. A segment without a second opinion is not judged."""

    max_disagreement: float = 0.45
    max_avg_logprob: float = -0.55
    name: ClassVar[str] = "unsure_disagreement"

    def drops(self, c: Candidate) -> bool:
        if c.disagreement is None or c.avg_logprob is None:
            return False
        return c.disagreement > self.max_disagreement + 1e-6 and c.avg_logprob < self.max_avg_logprob


@dataclass(frozen=True)
class LowAcousticQuality(Rule):
    """DNSMOS overall quality under ``min_dnsmos_ovrl`` (1-5; 0 turns the rule off). Off by default: quality is a
    choice of the training recipe (Emilia keeps >= 3.0), not a sign of a wrong label. Unscored segments pass."""

    min_dnsmos_ovrl: float = 0.0
    name: ClassVar[str] = "low_dnsmos"

    def drops(self, c: Candidate) -> bool:
        return c.dnsmos_ovrl is not None and c.dnsmos_ovrl < self.min_dnsmos_ovrl


def fit_rules(rules: list[Rule], candidates: list[Candidate]) -> list[Rule]:
    """Every rule fitted to the shard's candidates (shard-level thresholds computed), in the same order."""
    return [rule.fit(candidates) for rule in rules]


def rules_fingerprint(rules: list[Rule]) -> str:
    """Short hash of the rule set version and every rule's parameters (before fitting), recorded as lineage."""
    blob = json.dumps([FILTER_VERSION, [(r.name, asdict(r)) for r in rules]], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def apply_rules(rules: list[Rule], c: Candidate) -> list[str]:
    """The names of every rule that drops the candidate, in rule order (empty: kept)."""
    return [rule.name for rule in rules if rule.drops(c)]


@dataclass(frozen=True)
class PackSettings:
    """WebDataset packing: a new tar starts once the current one reaches ``target_tar_bytes``."""

    target_tar_bytes: int = 256 * 1024 * 1024


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata so the same samples give byte-identical tars on every run.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def flac_bytes(pcm_float) -> bytes:
    """16-bit FLAC of 16 kHz mono float samples."""
    buf = io.BytesIO()
    sf.write(buf, pcm_float, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


@dataclass(frozen=True)
class ShardInputs:
    """Every upstream table a build reads, and when it read them (a build that read later saw newer inputs)."""

    index: pa.Table
    audio: pa.Table
    vad_media: pa.Table
    segments: pa.Table
    features: pa.Table
    transcripts: pa.Table
    dead: dict[str, pa.Table]
    read_at: float
    index_parts: list[str] | None = None  # the index part keys ``index`` was read from
    dedup: dict[str, dict] = field(default_factory=dict)  # dedup.shard_outcomes: duplicates, evaluation matches
    dedup_revision: int = 0  # the revision at which the shard's dedup outcomes last changed (dedup.outcomes_revision)
    dedup_index_id: str = ""  # of the dedup index they came from


def read_inputs(out: ObjectStore, shard: str) -> ShardInputs:
    """The shard's upstream tables as they are now."""
    read_at = time.time()
    # The index's id and the revision of the shard's outcomes, read before the outcomes: a change after them is newer.
    dedup_index_id, dedup_revision = dedup.outcomes_revision(shard, dedup.read_state(out))
    index_parts = layout.index_part_keys(out, shard)
    return ShardInputs(
        index=layout.read_index(out, shard, index_parts),
        index_parts=index_parts,
        audio=read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA),
        vad_media=read_table(out, layout.vad_media_key(shard), VAD_MEDIA_SCHEMA),
        segments=read_table(out, layout.segments_key(shard), SEGMENT_SCHEMA),
        features=read_table(out, layout.features_key(shard), FEATURE_SCHEMA),
        transcripts=read_transcripts(out, shard).sort_by("segment_id"),
        dead={stage: layout.read_dead_letters(out, stage, shard) for stage in layout.STAGES},
        read_at=read_at,
        dedup=dedup.shard_outcomes(out, shard),
        dedup_revision=dedup_revision,
        dedup_index_id=dedup_index_id,
    )


@dataclass
class Build:
    """A dataset build written under its own folder, not yet committed.

    Attributes:
        shard: the partition.
        build_id: the first 16 hex digits of the fingerprint (same inputs and settings: same id, same bytes).
        fingerprint: hash of the inputs and settings.
        inputs: what it was built from.
        decisions: one row per transcribed segment.
        report: the stage report (totals included).
    """

    shard: str
    build_id: str
    fingerprint: str
    inputs: ShardInputs
    decisions: list[DecisionRow]
    report: StageReport


@dataclass
class DistillResult:
    """What ``distill_shard`` did.

    Attributes:
        report: the stage report; ``totals`` are the current build's counts.
        build_id: the build this run produced or found current.
        current: the shard's current build after the run (another, newer one when this run lost a race).
        previous: the build this one replaced (None for the first build, or when nothing was committed).
        committed: True when this run made its build current; False for a no-op or a lost race.
        changes: ``samples_added``, ``samples_removed``, ``added_by_reason``, ``removed_by_reason`` and
            ``removed_by_refit`` (kept samples now dropped by a shard-fitted rule whose thresholds moved, by rule).
    """

    report: StageReport
    build_id: str
    current: str
    previous: str | None = None
    committed: bool = False
    changes: dict = field(default_factory=dict)


# A committed build's change record (distilled/{shard}/{build_id}/changes.parquet): one row per sample added to or
# removed from the dataset, relative to the build it replaced.
CHANGES_SCHEMA = pa.schema(
    [
        ("segment_id", pa.string()),
        ("media_id", pa.string()),
        ("change", pa.string()),
        ("reason", pa.string()),
        ("refit", pa.bool_()),
    ]
)
# Names of the single-build layout (before build folders), removed with its tars once the grace period has passed.
_LEGACY = "legacy"
_LEGACY_SUFFIXES = (".decisions.parquet", ".files.jsonl", ".files.parquet", ".state.json")


def distill_shard(
    out: ObjectStore, shard: str, rules: list[Rule], pack: PackSettings, keep_builds_hours: float = 24.0
) -> DistillResult:
    """Applies the rules to every transcript of the shard and, when the inputs or settings changed, writes a new
    build of its dataset and commits it.

    The outputs depend on the whole shard (tar boundaries, per-file texts), so they are built as a unit, under a
    folder of their own: readers of the current build never see a half-written one. The current pointer and the
    manifest are written last (the commit); earlier builds are removed once they have not been current for
    ``keep_builds_hours``. An unchanged re-run is a no-op.
    """
    started = time.perf_counter()
    inputs = read_inputs(out, shard)
    fingerprint = _fingerprint(inputs, rules, pack)
    current = layout.read_current(out, shard)
    if current is not None and current["fingerprint"] == fingerprint:
        stamp = {"dedup_revision": inputs.dedup_revision, "dedup_index_id": inputs.dedup_index_id}
        if {k: current.get(k) for k in stamp} != stamp and (inputs.dedup_revision or current.get("dedup_revision")):
            # Same inputs, yet the index says the outcomes changed since (and changed back, or an index rebuilt to
            # the same outcomes): the pointer says it is up to date, or pending_work would ask for it again and again.
            current = {**current, **stamp}
            out.put_bytes(layout.distilled_current_key(shard), json.dumps(current, sort_keys=True).encode())
        _publish_manifest(out, shard, current)
        remove_old_builds(out, shard, current["build_id"], keep_builds_hours)
        report = StageReport(totals=current["counts"], seconds=time.perf_counter() - started)
        build_id = current["build_id"]
        return DistillResult(report, build_id, build_id, current.get("previous"), False, _no_changes())
    build = write_build(out, shard, inputs, rules, pack, fingerprint)
    result = commit_build(out, build, keep_builds_hours)
    result.report.seconds = time.perf_counter() - started
    return result


def write_build(
    out: ObjectStore, shard: str, inputs: ShardInputs, rules: list[Rule], pack: PackSettings, fingerprint: str
) -> Build:
    """Filters the shard's transcripts and writes the build's tars, decisions, per-file transcripts and manifest
    under ``distilled/{shard}/{build_id}/``; the current build is not touched."""
    build_id = fingerprint[:16]
    out.sweep_stale_temp(f"{layout.distilled_builds_prefix(shard)}{build_id}")
    report = StageReport()
    # A replaced object's older version leaves the dataset (its newest version has its own samples) and the fitting.
    retired = layout.retired_media(inputs.index)
    is_retired = pc.is_in(inputs.transcripts["media_id"], value_set=pa.array(sorted(retired), pa.string()))
    # Duplicates and evaluation-set copies go before the rules, and out of the shard-fitted thresholds too; so does a
    # segment the teacher skipped as one (its reason stays, should the index no longer say so).
    known = _known_copies(inputs)
    is_dedup = pc.is_in(inputs.transcripts["segment_id"], value_set=pa.array(sorted(known), pa.string()))
    labelled, feats, segs, candidates = shard_candidates(
        inputs.transcripts.filter(pc.and_(pc.invert(is_retired), pc.invert(is_dedup))), inputs.features, inputs.segments
    )
    uris = dict(zip(inputs.index["media_id"].to_pylist(), inputs.index["uri"].to_pylist(), strict=True))
    decisions = [
        DecisionRow(t["segment_id"], t["media_id"], False, "superseded", ["superseded"], None)
        for t in inputs.transcripts.filter(is_retired).select(["segment_id", "media_id"]).to_pylist()
    ]
    for _ in decisions:
        report.fail("superseded")
    for t in inputs.transcripts.filter(pc.and_(pc.invert(is_retired), is_dedup)).to_pylist():
        d = known[t["segment_id"]]
        decisions.append(
            DecisionRow(
                t["segment_id"],
                t["media_id"],
                False,
                d["reason"],
                [d["reason"]],
                None,
                d.get("duplicate_of"),
                d.get("similarity"),
                d.get("duplicate_kind"),
                d.get("eval_set"),
            )
        )
        report.fail(d["reason"])
    kept_rows: list[dict] = []
    tar_keys: list[str] = []
    tar = None
    tar_path = None

    def close_tar() -> None:
        nonlocal tar
        if tar is not None:
            tar.close()
            out.put_file(tar_keys[-1], tar_path)
            tar = None

    fitted = fit_rules(rules, candidates)
    rules_sha = rules_fingerprint(rules)
    try:
        for t, cand in zip(labelled, candidates, strict=True):
            f = feats[t["segment_id"]]
            would = apply_rules(fitted, cand)
            if would:
                decisions.append(DecisionRow(t["segment_id"], t["media_id"], False, would[0], would, None))
                report.fail(would[0])
                continue
            if tar is None:
                tar_keys.append(layout.distilled_tar_key(shard, build_id, len(tar_keys)))
                # A name of its own: another run of the shard may be packing at the same time.
                fd, name = tempfile.mkstemp(prefix=f"distill-{shard}-{build_id}-", suffix=".tar", dir=out.scratch_dir())
                os.close(fd)
                tar_path = Path(name)
                # Open across loop iterations (a tar spans many samples); closed by close_tar or the except below.
                tar = tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
            seg = segs[t["segment_id"]]
            sample = _sample_json(t, f, seg, uris[t["media_id"]], rules_sha)
            _tar_member(
                tar,
                f"{t['segment_id']}.flac",
                flac_bytes(read_audio(out.local_path(f["audio_key"]), f["audio_offset"], f["audio_frames"])),
            )
            _tar_member(tar, f"{t['segment_id']}.json", json.dumps(sample, sort_keys=True, ensure_ascii=False).encode())
            decisions.append(DecisionRow(t["segment_id"], t["media_id"], True, None, [], tar_keys[-1]))
            kept_rows.append({**sample, "tar_key": tar_keys[-1]})
            report.ok(f["duration_s"])
            if tar_path.stat().st_size >= pack.target_tar_bytes:
                close_tar()
        close_tar()
    except BaseException:
        if tar is not None:
            tar.close()
            tar_path.unlink(missing_ok=True)
        raise

    write_table(out, layout.decisions_key(shard, build_id), to_table(decisions, DECISION_SCHEMA))
    files = _file_records(inputs, decisions, retired)
    jsonl = "".join(json.dumps(f, ensure_ascii=False, sort_keys=True) + "\n" for f in files)
    out.put_bytes(layout.files_key(shard, build_id), jsonl.encode())
    write_table(out, layout.files_parquet_key(shard, build_id), pa.Table.from_pylist(files, schema=FILES_SCHEMA))
    info = {"build_id": build_id, "fingerprint": fingerprint, "rules": _params(rules), "fitted": _params(fitted)}
    if inputs.index_parts is not None:
        # What files.jsonl covers: rows indexed after the build read the index are the next build's (checks).
        info["index_parts"] = inputs.index_parts
    out.put_bytes(layout.build_info_key(shard, build_id), json.dumps(info, sort_keys=True).encode())
    write_table(out, layout.build_manifest_key(shard, build_id), _manifest_table(kept_rows))
    report.totals = {
        "transcribed": inputs.transcripts.num_rows,
        "kept": len(kept_rows),
        "dropped": inputs.transcripts.num_rows - len(kept_rows),
        "kept_hours": sum(r["duration"] for r in kept_rows) / 3600,
        "tars": len(tar_keys),
    }
    report.outputs = [
        *tar_keys,
        layout.build_manifest_key(shard, build_id),
        layout.decisions_key(shard, build_id),
        layout.files_key(shard, build_id),
    ]
    return Build(shard, build_id, fingerprint, inputs, decisions, report)


def commit_build(out: ObjectStore, build: Build, keep_builds_hours: float) -> DistillResult:
    """Makes a written build the shard's current one, unless a build made from newer inputs is current already.

    Records the changes from the build it replaces, then writes the current pointer and, last, the manifest users
    read; then removes builds that have not been current for ``keep_builds_hours``.
    """
    shard, build_id = build.shard, build.build_id
    current = layout.read_current(out, shard)
    if current is not None and current["build_id"] == build_id:  # another run committed the same build
        _publish_manifest(out, shard, current)
        return DistillResult(build.report, build_id, build_id, current.get("previous"), False, _no_changes())
    if current is not None and current["inputs_read_at"] > build.inputs.read_at:
        # Lost a race: the current build saw newer inputs. Ours stays uncommitted (removed after the grace period).
        build.report.totals = current["counts"]
        return DistillResult(build.report, build_id, current["build_id"], None, False, _no_changes())
    missing = [key for key in build.report.outputs if not out.exists(key)]
    if missing:
        raise RuntimeError(
            f"{shard}: build {build_id} lost {len(missing)} of its files before its commit, e.g. {missing[:3]} "
            "(removed by another run of the shard?); nothing was committed: re-run the partition"
        )
    changes = _record_changes(out, build, current)
    manifest = out.read_bytes(layout.build_manifest_key(shard, build_id))
    previous = current["build_id"] if current else None
    pointer = {
        "build_id": build_id,
        "fingerprint": build.fingerprint,
        "created_at": datetime.now(UTC).isoformat(),
        "inputs_read_at": build.inputs.read_at,
        "previous": previous,
        "counts": build.report.totals,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "retired": _retired(out, shard, build_id, current),
        "dedup_revision": build.inputs.dedup_revision,
        "dedup_index_id": build.inputs.dedup_index_id,
    }
    out.put_bytes(layout.distilled_current_key(shard), json.dumps(pointer, sort_keys=True).encode())
    out.put_bytes(layout.distilled_manifest_key(shard), manifest)
    remove_old_builds(out, shard, build_id, keep_builds_hours)
    return DistillResult(build.report, build_id, build_id, previous, True, changes)


def _no_changes() -> dict:
    """The changes of a run that committed nothing."""
    return {
        "samples_added": 0,
        "samples_removed": 0,
        "added_by_reason": {},
        "removed_by_reason": {},
        "removed_by_refit": {},
    }


def _publish_manifest(out: ObjectStore, shard: str, current: dict) -> None:
    """Rewrites the users' manifest from the current build's copy when it is not that build's (a run killed between
    the pointer and the manifest)."""
    key = layout.distilled_manifest_key(shard)
    if out.exists(key) and hashlib.sha256(out.read_bytes(key)).hexdigest() == current["manifest_sha256"]:
        return
    out.put_bytes(key, out.read_bytes(layout.build_manifest_key(shard, current["build_id"])))


def _build_folders(out: ObjectStore, shard: str) -> dict[str, list[ObjectInfo]]:
    """The shard's build folders and their objects (``_LEGACY``: the single-build layout's files, if any)."""
    prefix = layout.distilled_builds_prefix(shard)
    folders: dict[str, list[ObjectInfo]] = {}
    for info in out.list(prefix):
        name, slash, _ = info.key[len(prefix) :].partition("/")
        folders.setdefault(name if slash else _LEGACY, []).append(info)
    for info in out.list(f"distilled/{shard}."):
        if info.key.endswith(_LEGACY_SUFFIXES):
            folders.setdefault(_LEGACY, []).append(info)
    return folders


def _retired(out: ObjectStore, shard: str, build_id: str, current: dict | None) -> dict[str, float]:
    """When each build folder still on the store stopped being current, for the pointer that makes ``build_id``
    current. The build being replaced (and, at the first commit, every folder found) retires now; folders never
    committed are not listed (their age is their newest object's)."""
    now = time.time()
    known = current.get("retired", {}) if current else {}
    retired = {}
    for name in _build_folders(out, shard):
        if name == build_id:
            continue
        if name in known:
            retired[name] = known[name]
        elif current is None or name == current["build_id"]:
            retired[name] = now
    return retired


def remove_old_builds(out: ObjectStore, shard: str, build_id: str, keep_builds_hours: float) -> list[str]:
    """Deletes the shard's builds that have not been current for ``keep_builds_hours`` (a folder never committed:
    since its last write), never the current one. Nothing is deleted unless ``build_id`` is still current (a run that
    lost a race leaves the folders to the winner).

    Returns:
        The build folders removed.
    """
    current = layout.read_current(out, shard)
    if current is None or current["build_id"] != build_id:
        return []
    now = time.time()
    removed = []
    for name, infos in sorted(_build_folders(out, shard).items()):
        since = current["retired"].get(name, max(info.mtime for info in infos))
        if name == build_id or now - since < keep_builds_hours * 3600:
            continue
        for info in infos:
            out.delete(info.key)
        removed.append(name)
    return removed


def _params(rules: list[Rule]) -> list:
    """The rules' names and parameters as JSON values (tuples become lists), for comparing builds."""
    return json.loads(json.dumps([(r.name, asdict(r)) for r in rules], default=str))


def _refitted(out: ObjectStore, shard: str, build_id: str, previous: str | None) -> set[str]:
    """Rules configured as in the previous build whose shard-fitted thresholds moved (new arrivals changed them)."""
    if previous is None or not out.exists(layout.build_info_key(shard, previous)):
        return set()
    before = json.loads(out.read_bytes(layout.build_info_key(shard, previous)))
    now = json.loads(out.read_bytes(layout.build_info_key(shard, build_id)))
    cfg, cfg_before = dict(map(tuple, now["rules"])), dict(map(tuple, before["rules"]))
    fit, fit_before = dict(map(tuple, now["fitted"])), dict(map(tuple, before["fitted"]))
    return {name for name in fit if cfg[name] == cfg_before.get(name) and fit[name] != fit_before.get(name)}


def _record_changes(out: ObjectStore, build: Build, current: dict | None) -> dict:
    """Writes the samples the build adds and removes relative to ``current`` (and why) into its folder.

    Added: ``new`` (not decided before) or ``was_dropped:{rule}``. Removed: ``dropped:{rule}`` (still transcribed,
    now dropped; ``refit`` when the rule's shard-fitted thresholds moved), ``media_retired`` (the media left the index),
    ``dead_lettered:{stage}``, ``media_superseded`` (the media's segments were replaced) or ``transcript_gone``.

    Returns:
        The summary written to ``changes.json`` (see ``DistillResult.changes``).
    """
    shard, inputs = build.shard, build.inputs
    previous = current["build_id"] if current else None
    before = read_table(out, layout.decisions_key(shard, previous), DECISION_SCHEMA) if previous else None
    before = before.to_pylist() if before is not None else []
    was_kept = {d["segment_id"]: d["media_id"] for d in before if d["kept"]}
    was_dropped = {d["segment_id"]: d["drop_reason"] for d in before if not d["kept"]}
    now = {d.segment_id: d for d in build.decisions}
    refit = _refitted(out, shard, build.build_id, previous)
    rows = [
        (d.segment_id, d.media_id, "added", f"was_dropped:{was_dropped[d.segment_id]}", False)
        if d.segment_id in was_dropped
        else (d.segment_id, d.media_id, "added", "new", False)
        for d in build.decisions
        if d.kept and d.segment_id not in was_kept
    ]
    gone = _Gone(inputs)
    for segment_id, media_id in sorted(was_kept.items()):
        d = now.get(segment_id)
        if d is not None and d.kept:
            continue
        reason = f"dropped:{d.drop_reason}" if d is not None else gone.reason(segment_id, media_id)
        rows.append((segment_id, media_id, "removed", reason, d is not None and d.drop_reason in refit))
    rows.sort(key=lambda r: (r[2], r[0]))
    table = pa.Table.from_pylist([dict(zip(CHANGES_SCHEMA.names, r, strict=True)) for r in rows], CHANGES_SCHEMA)
    write_table(out, layout.changes_key(shard, build.build_id), table)
    summary = {
        "build_id": build.build_id,
        "previous": previous,
        "samples_added": sum(r[2] == "added" for r in rows),
        "samples_removed": sum(r[2] == "removed" for r in rows),
        "added_by_reason": dict(sorted(Counter(r[3] for r in rows if r[2] == "added").items())),
        "removed_by_reason": dict(sorted(Counter(r[3] for r in rows if r[2] == "removed").items())),
        "removed_by_refit": dict(sorted(Counter(r[3].split(":", 1)[1] for r in rows if r[4]).items())),
    }
    out.put_bytes(layout.changes_summary_key(shard, build.build_id), json.dumps(summary, sort_keys=True).encode())
    return summary


class _Gone:
    """Why a sample kept earlier has no decision now: its media or segment left the upstream tables."""

    def __init__(self, inputs: ShardInputs) -> None:
        self.indexed = set(inputs.index["media_id"].to_pylist())
        self.segments = set(inputs.segments["segment_id"].to_pylist())
        self.dead = {stage: set(table["item_id"].to_pylist()) for stage, table in inputs.dead.items()}

    def reason(self, segment_id: str, media_id: str) -> str:
        if media_id not in self.indexed:
            return "media_retired"
        for stage, item in (
            ("audio_wav", media_id),
            ("vad_segments", media_id),
            ("segment_features", segment_id),
            ("transcripts", segment_id),
        ):
            if item in self.dead.get(stage, ()):
                return f"dead_lettered:{stage}"
        return "transcript_gone" if segment_id in self.segments else "media_superseded"


def shard_candidates(
    transcripts: pa.Table, features: pa.Table, segments: pa.Table
) -> tuple[list[dict], dict[str, dict], dict[str, dict], list[Candidate]]:
    """The shard's labelled segments as rows and as rule candidates.

    Returns:
        The transcript rows (in table order), feature and segment rows by segment id, and one candidate per
        transcript row.
    """
    feats = {r["segment_id"]: r for r in features.to_pylist()}
    segs = {r["segment_id"]: r for r in segments.to_pylist()}
    labelled = transcripts.to_pylist()
    candidates = [_candidate(t, feats[t["segment_id"]], segs[t["segment_id"]]) for t in labelled]
    return labelled, feats, segs, candidates


def _candidate(t: dict, f: dict, seg: dict) -> Candidate:
    return Candidate(
        segment_id=t["segment_id"],
        text=t["text"],
        duration_s=f["duration_s"],
        rms_dbfs=f["rms_dbfs"],
        avg_logprob=t["avg_logprob"],
        no_speech_prob=t["no_speech_prob"],
        compression_ratio=t["compression_ratio"],
        finish_reason=t["finish_reason"],
        language=t["language"],
        clip_ratio=f["clip_ratio"],
        speech_s=seg.get("speech_s"),
        disagreement=row_disagreement(t),
        dnsmos_ovrl=f.get("dnsmos_ovrl"),
        language_prob=t.get("language_prob"),
    )


def _sample_json(t: dict, f: dict, seg: dict, uri: str, rules_sha: str) -> dict:
    return {
        "key": t["segment_id"],
        "text": t["text"],
        "language": t["language"],
        "duration": f["duration_s"],
        "source_uri": uri,
        "media_id": t["media_id"],
        "start": f["start_s"],
        "end": f["end_s"],
        "avg_logprob": t["avg_logprob"],
        "no_speech_prob": t["no_speech_prob"],
        "teacher_model": t["model_id"],
        "teacher_engine": t["engine"],
        "teacher_settings_hash": t["settings_hash"],
        "prompt_version": t["prompt_version"],
        "vad_model_sha256": seg["vad_model_sha256"],
        "vad_params": seg["vad_params"],
        "filter_version": FILTER_VERSION,
        "filter_params_sha": rules_sha,
        "speech_s": seg.get("speech_s"),
        "disagreement": row_disagreement(t),
        "second_model": t.get("second_model_id"),
        "dnsmos_ovrl": f.get("dnsmos_ovrl"),
        "language_prob": t.get("language_prob"),
        "lid_model": t.get("lid_model"),
    }


def _manifest_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(
        [{name: r[name] for name in MANIFEST_SCHEMA.names} for r in rows], schema=MANIFEST_SCHEMA
    )


def _fingerprint(inputs: ShardInputs, rules: list[Rule], pack: PackSettings) -> str:
    index, audio, vad_media, segments = inputs.index, inputs.audio, inputs.vad_media, inputs.segments
    features, transcripts, dead = inputs.features, inputs.transcripts, inputs.dead
    h = hashlib.sha256()
    for table, column in (
        (index, "media_id"),
        (audio, "media_id"),
        (vad_media, "media_id"),
        (segments, "segment_id"),
        (transcripts, "segment_id"),
        (transcripts, "settings_hash"),
    ):
        h.update(json.dumps(sorted(table[column].to_pylist())).encode())
    # Every signal a rule reads: a second opinion or a DNSMOS score added later changes the decisions.
    for table, columns in (
        (segments, ["segment_id", "speech_s"]),
        (transcripts, ["segment_id", "second_text", "second_model_id"]),
        (features, ["segment_id", "dnsmos_ovrl", "rms_dbfs", "clip_ratio"]),
    ):
        h.update(json.dumps(sorted(table.select(columns).to_pylist(), key=lambda r: r["segment_id"])).encode())
    for stage in sorted(dead):
        h.update(json.dumps([stage, sorted(dead[stage]["item_id"].to_pylist())]).encode())
    if inputs.dedup:  # (absent from builds made before dedup, which keep their ids)
        h.update(json.dumps(inputs.dedup, sort_keys=True).encode())
    h.update(json.dumps([FILTER_VERSION, [(r.name, asdict(r)) for r in rules], asdict(pack)], default=str).encode())
    return h.hexdigest()


def _file_records(inputs: ShardInputs, decisions: list[DecisionRow], retired=frozenset()) -> list[dict]:
    """One record per indexed media object: its outcome, its segments in time order and the kept full text.

    A file's ``outcome`` is one of:

    - ``failed``: the file itself was dead-lettered (``audio_wav``: unreadable or no audio; ``vad_segments``), or
      every one of its segments was (``segment_features``, ``transcripts``). ``failure`` holds the ``stage``,
      ``error_class`` and ``error`` message of the file's dead letter, or of its first failed segment's.
    - ``pending``: decoded but not segmented yet (an upstream step has not run on it).
    - ``no_speech``: segmented, and the VAD found no speech in it: no segments, no text.
    - ``transcribed``: it has segments and at least one did not fail (some may have failed or be pending); ``text``
      joins its kept segments.
    - ``superseded``: an older version of an object replaced since (``layout.retired_media``), whatever became of it;
      its transcribed segments are ``dropped:superseded``.

    Each segment's ``status`` is one of ``kept`` (in the dataset), ``dropped:{rule}`` (the first filter rule that
    dropped it), ``failed:{stage}`` (dead-lettered by ``segment_features`` or ``transcripts``) or ``pending``.
    ``failure`` is null for every outcome but ``failed``.

    A transcribed segment carries its ``language`` (the one it was transcribed in), ``language_prob`` (the audio
    language ID's probability; null when the language was fixed) and ``lid_model`` (null likewise); null for a
    segment without a transcript. The file's ``language`` is the language of most of its transcribed speech
    (``languages.majority_language``, by segment duration), null when no segment was transcribed.
    """
    index, audio, vad_media, segments = inputs.index, inputs.audio, inputs.vad_media, inputs.segments
    transcripts, dead = inputs.transcripts, inputs.dead
    failed = _failures(dead, ("audio_wav", "vad_segments"))
    seg_failed = _failures(dead, ("segment_features", "transcripts"))
    durations = dict(zip(audio["media_id"].to_pylist(), audio["duration_s"].to_pylist(), strict=True))
    vad_done = set(vad_media["media_id"].to_pylist())
    # language_prob and lid_model are absent from tables written before language ID; a segment skipped as a known
    # copy has no label (null text), not an empty one.
    columns = ["segment_id", "text", "avg_logprob", "language", "language_prob", "lid_model"]
    labelled = transcripts.filter(pc.invert(pc.starts_with(transcripts["finish_reason"], dedup.SKIPPED_FINISH)))
    texts = {
        r["segment_id"]: r for r in labelled.select([c for c in columns if c in transcripts.column_names]).to_pylist()
    }
    decided = {d.segment_id: d for d in decisions}
    by_media: dict[str, list[dict]] = {}
    for s in segments.sort_by([("media_id", "ascending"), ("index", "ascending")]).to_pylist():
        d = decided.get(s["segment_id"])
        if d:
            status = "kept" if d.kept else f"dropped:{d.drop_reason}"
        elif s["segment_id"] in seg_failed:
            status = f"failed:{seg_failed[s['segment_id']]['stage']}"
        else:
            status = "pending"
        t = texts.get(s["segment_id"], {})
        dup = inputs.dedup.get(s["segment_id"], {})
        by_media.setdefault(s["media_id"], []).append(
            {
                "segment_id": s["segment_id"],
                "start": round(s["start_s"], 3),
                "end": round(s["end_s"], 3),
                "text": t.get("text"),
                "avg_logprob": t.get("avg_logprob"),
                "status": status,
                "language": t.get("language"),
                "language_prob": t.get("language_prob"),
                "lid_model": t.get("lid_model"),
                **{k: dup.get(k) for k in DEDUP_FIELDS},
            }
        )
    records = []
    for m in index.sort_by("uri").to_pylist():
        segs = by_media.get(m["media_id"], [])
        failure = failed.get(m["media_id"])
        if failure is None and segs and all(s["segment_id"] in seg_failed for s in segs):
            failure = seg_failed[segs[0]["segment_id"]]
        if m["media_id"] in retired:
            outcome, failure = "superseded", None
        elif failure is not None:
            outcome = "failed"
        elif m["media_id"] not in vad_done:
            outcome = "pending"
        elif not segs:
            outcome = "no_speech"
        else:
            outcome = "transcribed"
        line = {
            "media_id": m["media_id"],
            "uri": m["uri"],
            "outcome": outcome,
            "duration_s": durations.get(m["media_id"]),
            "text": " ".join(s["text"] for s in segs if s["status"] == "kept" and s["text"]),
            "segments": segs,
            "failure": failure,
            "language": majority_language([(s["language"], s["end"] - s["start"]) for s in segs]),
            **_file_duplicate(segs),
        }
        records.append(line)
    return records


def _known_copies(inputs: ShardInputs) -> dict[str, dict]:
    """``inputs.dedup``, plus the segments ``transcripts`` skipped as copies that it no longer lists."""
    known = dict(inputs.dedup)
    reasons = inputs.transcripts.select(["segment_id", "finish_reason"]).to_pylist()
    for r in reasons:
        if r["finish_reason"].startswith(dedup.SKIPPED_FINISH) and r["segment_id"] not in known:
            known[r["segment_id"]] = {"reason": r["finish_reason"][len(dedup.SKIPPED_FINISH) :]}
    return known


# Per segment in files.jsonl: what dedup found (null where nothing).
DEDUP_FIELDS = ("duplicate_of", "duplicate_of_uri", "similarity", "duplicate_kind", "eval_set")


def _file_duplicate(segs: list[dict]) -> dict:
    """A file whose every segment duplicates audio kept elsewhere is a duplicate file: ``duplicate_of`` names the
    uri holding most of the kept copies, with the mean similarity and the commonest kind; otherwise nulls."""
    dups = [s for s in segs if s["duplicate_of"] is not None]
    if not segs or len(dups) != len(segs):
        return {"duplicate_of": None, "similarity": None, "duplicate_kind": None}
    uris = Counter(s["duplicate_of_uri"] for s in dups)
    return {
        "duplicate_of": uris.most_common(1)[0][0],
        "similarity": round(sum(s["similarity"] for s in dups) / len(dups), 4),
        "duplicate_kind": Counter(s["duplicate_kind"] for s in dups).most_common(1)[0][0],
    }


def _failures(dead: dict, stages: tuple[str, ...]) -> dict[str, dict]:
    """Item id -> ``{stage, error_class, error}`` of its dead letter in the earliest of ``stages`` that has one."""
    failures: dict[str, dict] = {}
    for stage in stages:
        for r in dead[stage].to_pylist():
            failures.setdefault(r["item_id"], {"stage": stage, "error_class": r["error_class"], "error": r["message"]})
    return failures


def build_rules(
    *,
    min_duration_s: float = TooShort.min_s,
    max_duration_s: float = TooLong.max_s,
    max_rms_dbfs: float = NearSilent.max_rms_dbfs,
    max_clip_ratio: float = Clipped.max_clip_ratio,
    max_compression_ratio: float = RepetitionLoop.max_compression_ratio,
    max_repeats: int = RepetitionLoop.max_repeats,
    max_phrase_repeats: int = RepetitionLoop.max_phrase_repeats,
    no_speech_prob: float = NoSpeech.min_no_speech_prob,
    min_avg_logprob: float = LowConfidence.min_avg_logprob,
    confidence_quantile: float = LowConfidence.quantile,
    min_chars_per_s: float = SpeakingRate.min_cps,
    max_chars_per_s: float = SpeakingRate.max_cps,
    min_cjk_chars_per_s: float = SpeakingRate.min_char_cps,
    max_cjk_chars_per_s: float = SpeakingRate.max_char_cps,
    rate_fence_k: float = SpeakingRateOutlier.k,
    rate_fence_min_segments: int = SpeakingRateOutlier.min_segments,
    rate_fence_min_log_iqr: float = SpeakingRateOutlier.min_log_iqr,
    max_disagreement: float = Disagreement.max_disagreement,
    unsure_max_disagreement: float = UnsureDisagreement.max_disagreement,
    unsure_max_avg_logprob: float = UnsureDisagreement.max_avg_logprob,
    min_dnsmos_ovrl: float = LowAcousticQuality.min_dnsmos_ovrl,
    mismatch_min_script_units: int = LanguageMismatch.min_script_units,
    mismatch_min_script_share: float = LanguageMismatch.min_script_share,
    mismatch_min_letters: int = LanguageMismatch.min_letters,
    mismatch_min_prob: float = LanguageMismatch.min_prob,
    mismatch_min_margin: float = LanguageMismatch.min_margin,
    mismatch_min_audio_prob: float = LanguageMismatch.min_audio_prob,
) -> list[Rule]:
    """The rule set in its fixed order; the parameters are the run config's ``distilled_dataset`` fields."""
    return [
        EmptyText(),
        TooShort(min_duration_s),
        TooLong(max_duration_s),
        NearSilent(max_rms_dbfs),
        Clipped(max_clip_ratio),
        HallucinationPhrase(),
        RepetitionLoop(max_compression_ratio, max_repeats, max_phrase_repeats),
        LanguageMismatch(
            mismatch_min_script_units,
            mismatch_min_script_share,
            mismatch_min_letters,
            mismatch_min_prob,
            mismatch_min_margin,
            mismatch_min_audio_prob,
        ),
        NoSpeech(no_speech_prob),
        LowConfidence(min_avg_logprob, confidence_quantile),
        SpeakingRate(min_chars_per_s, max_chars_per_s, min_cjk_chars_per_s, max_cjk_chars_per_s),
        SpeakingRateOutlier(rate_fence_k, rate_fence_min_segments, rate_fence_min_log_iqr),
        Disagreement(max_disagreement),
        UnsureDisagreement(unsure_max_disagreement, unsure_max_avg_logprob),
        LowAcousticQuality(min_dnsmos_ovrl),
    ]


def default_rules() -> list[Rule]:
    """The rule set with default parameters."""
    return build_rules()
