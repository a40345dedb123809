"""The language side of a transcript's text: the script its letters are written in, the language a text LID reads in
it, how its speech is counted (characters for scripts written without spaces) and which error rate measures it.

What the ``language_mismatch`` and speaking-rate rules, the repetition rule and the label error rates of the report
build on. Nothing here reads audio: the segment's audio language comes from the transcripts (``language``,
``language_prob``, ``lid_model``).
"""

from __future__ import annotations

import functools
import unicodedata
from collections import Counter

import numpy as np

from asr_assets.second_opinion import UNSPACED_LANGUAGES

CER_LANGUAGES = UNSPACED_LANGUAGES
"""Languages whose label error rate is a character error rate (words are not separated by spaces, or, for Korean,
syllables are the unit the field reports)."""

CHAR_RATE_LANGUAGES = frozenset({"zh", "yue", "ja", "ko"})
"""Languages whose speaking rate is counted in characters (Han and kana) or Hangul syllables, with their own bounds:
a rate in letters per second fitted on English means nothing for them."""

# Scripts written without spaces between words: repetition is looked for in character n-grams, and each character is
# a unit of speech.
UNSPACED_SCRIPTS = frozenset({"Han", "Hiragana", "Katakana", "Thai"})

_CYRILLIC = "ru uk be bg mk kk ky mn tg tt ba"
_ARABIC = "ar fa ur ps ug sd"
_LATIN = (
    "en es fr de it pt nl pl tr ca sv da no nb nn fi cs sk sl hr bs ro hu id ms vi tl et lv lt is ga cy eu gl af sw "
    "sq mt lb oc br eo la jv jw ha yo so mi haw ln uz az tk sn fo ht mg qu rw xh zu wa an se"
)
EXPECTED_SCRIPTS: dict[str, frozenset[str]] = {
    **{code: frozenset({"Latin"}) for code in _LATIN.split()},
    **{code: frozenset({"Cyrillic"}) for code in _CYRILLIC.split()},
    **{code: frozenset({"Arabic"}) for code in _ARABIC.split()},
    "sr": frozenset({"Cyrillic", "Latin"}),
    "zh": frozenset({"Han"}),
    "yue": frozenset({"Han"}),
    "ja": frozenset({"Han", "Hiragana", "Katakana"}),
    "ko": frozenset({"Hangul", "Han"}),
    "he": frozenset({"Hebrew"}),
    "yi": frozenset({"Hebrew"}),
    "el": frozenset({"Greek"}),
    "hi": frozenset({"Devanagari"}),
    "mr": frozenset({"Devanagari"}),
    "ne": frozenset({"Devanagari"}),
    "bn": frozenset({"Bengali"}),
    "th": frozenset({"Thai"}),
    "ka": frozenset({"Georgian"}),
    "hy": frozenset({"Armenian"}),
    "ta": frozenset({"Tamil"}),
    "te": frozenset({"Telugu"}),
    "km": frozenset({"Khmer"}),
    "lo": frozenset({"Lao"}),
    "my": frozenset({"Myanmar"}),
    "am": frozenset({"Ethiopic"}),
}
"""The scripts each language is written in (ISO 639-1, Whisper's ``yue``); a language not listed is not judged."""

_TEXT_LID = "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th"
TEXT_LID_LANGUAGES = frozenset(_TEXT_LID.split())
"""The languages the text LID chooses among: the 31 Whisper was trained on most, the ones teachers write. Measured
on the Asterisk prompts (README "Language"), py3langid's full 97-language set reads 8 of 108 Russian prompts of 40+
letters as Bulgarian or Macedonian with probability ~1.0; restricted to these, none."""

RELATED_LANGUAGES = (
    frozenset({"es", "ca", "gl", "pt", "it"}),
    frozenset({"ru", "uk", "be", "bg", "mk", "sr"}),
    frozenset({"cs", "sk"}),
    frozenset({"da", "no", "nb", "nn", "sv"}),
    frozenset({"id", "ms"}),
    frozenset({"hr", "sr", "bs"}),
)
"""Languages a text LID confuses on sentence-length text (a Spanish prompt without its accents reads as Italian
with p = 0.999): text in a relative of the segment's language is not a mismatch."""


def base_language(language: str | None) -> str:
    """The ISO 639 code without region or script (``zh-CN`` -> ``zh``), lower case; "" for None."""
    return (language or "").split("-")[0].split("_")[0].lower()


def error_metric(language: str | None) -> str:
    """``cer`` for languages measured in characters (zh, ja, ko, th, yue), else ``wer``."""
    return "cer" if base_language(language) in CER_LANGUAGES else "wer"


def script_of(ch: str) -> str | None:
    """The script of a letter (``Latin``, ``Cyrillic``, ``Han``, ``Hiragana``, ``Katakana``, ``Hangul``, ``Arabic``,
    ...), from its Unicode name; None for anything that is not a letter. Give NFKC text (full-width Latin and
    half-width kana are then plain Latin and kana)."""
    if not ch.isalpha():
        return None
    first = unicodedata.name(ch, "").split(" ")[0]
    if first in ("CJK", "IDEOGRAPHIC"):
        return "Han"
    if first == "KATAKANA-HIRAGANA":  # the prolonged sound mark
        return "Katakana"
    return first.title() or None


def script_units(text: str) -> Counter[str]:
    """Units of text per script: each character of a script written without spaces (Han, kana, Thai), each word
    (a run of letters of one script) of the others. Units, not letters: "我用 iPhone" is 2 Han units and 1 Latin,
    not 2 against 6."""
    units: Counter[str] = Counter()
    previous = None
    for ch in unicodedata.normalize("NFKC", text):
        script = script_of(ch)
        if script is None:
            if not unicodedata.category(ch).startswith("M"):  # a combining mark continues its word
                previous = None
            continue
        if script in UNSPACED_SCRIPTS:
            units[script] += 1
            previous = None
        elif script != previous:
            units[script] += 1
            previous = script
    return units


def script_share(text: str, language: str) -> tuple[float, int] | None:
    """The share of the text's units written in the language's scripts, and the number of units; None when the
    language's scripts are unknown or the text has no letters."""
    expected = EXPECTED_SCRIPTS.get(base_language(language))
    units = script_units(text)
    total = sum(units.values())
    if expected is None or not total:
        return None
    return sum(n for script, n in units.items() if script in expected) / total, total


def unspaced_units(text: str) -> int:
    """Speech units of a text in a language counted in characters: Han, kana and Hangul characters and digits one
    each (a digit is one syllable in Chinese, Japanese and Korean); a word of another script (a Latin loanword in
    Mandarin) one per three letters, about its syllables."""
    count = 0
    for token in unicodedata.normalize("NFKC", text).split():
        run = 0
        for ch in [*token, " "]:
            script = script_of(ch)
            if script is not None and script not in UNSPACED_SCRIPTS and script != "Hangul":
                run += 1
                continue
            count += -(-run // 3)
            run = 0
            count += ch.isdigit() or script in UNSPACED_SCRIPTS or script == "Hangul"
    return count


def unspaced_text(text: str) -> str:
    """The characters of the text in scripts written without spaces (Han, kana, Thai), in order, without the
    spaces, punctuation and other scripts between them: where a character loop ("我爱你我爱你...") shows."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text) if script_of(ch) in UNSPACED_SCRIPTS)


def are_related(a: str, b: str) -> bool:
    """Whether two languages are the same or close relatives a text LID confuses (``RELATED_LANGUAGES``)."""
    a, b = base_language(a), base_language(b)
    return a == b or any(a in group and b in group for group in RELATED_LANGUAGES)


@functools.cache
def _identifier(languages: tuple[str, ...]):
    # Imported here: the model (3 MB, 0.4 s to load) is read only by a process that judges a text's language.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_pickled_model(MODEL_FILE, norm_probs=False)
    identifier.set_languages(list(languages))
    return identifier


def text_language(text: str, language: str | None = None) -> tuple[str, float, float]:
    """The language py3langid reads in ``text`` among ``TEXT_LID_LANGUAGES`` (and ``language``, when given).

    Returns:
        The language, its probability (normalized over those languages) and, when ``language`` is given, the
        evidence for it over ``language`` per letter (the difference of their log scores over the letters, in nats;
        0 when they are the same). The probability saturates with length (a list of names reads as Italian with
        p = 0.9999); the evidence per letter does not: 0.09-0.37 on the NATO alphabet against 0.4-1.9 (5th
        percentile to median) on English, Spanish and French prompts read against each other.
    """
    claimed = base_language(language) if language else None
    languages = sorted({*TEXT_LID_LANGUAGES, *([claimed] if claimed else [])})
    scores = dict(_identifier(tuple(languages)).rank(text))
    found = max(scores, key=scores.get)
    logits = np.array(list(scores.values()), np.float64) - scores[found]
    prob = float(1.0 / np.exp(logits).sum())
    letters = max(sum(ch.isalpha() for ch in text), 1)
    margin = float(scores[found] - scores[claimed]) / letters if claimed else 0.0
    return str(found), prob, margin


def majority_language(languages: list[tuple[str | None, float]]) -> str | None:
    """The language of most of the speech: ``(language, seconds)`` pairs summed per language; ties go to the
    alphabetically first; None without any language."""
    seconds: Counter[str] = Counter()
    for language, duration in languages:
        if language:
            seconds[language] += duration
    if not seconds:
        return None
    return min(seconds, key=lambda lang: (-seconds[lang], lang))
