"""Deterministic generator of a small multilingual espeak-ng speech corpus with references.

Files in several languages (espeak-ng voices), and one long file whose speakers switch language between turns.

For the language tests and ``bench/lid.py``: every file's language and text are known, and the mixed file's turns
are known to the sample. It reuses ``sample_corpus``'s synthesis, trimming and encoding, so the same arguments give
byte-identical files.

Layout of ``out_dir``::

    media/{lang}_{k:02d}.{fmt}   one language per file, two sentences each (lang: es, fr, de, ru, zh)
    media/mixed_turns.mp4        ~60-90 s, one sentence per turn, the language changing at every turn
    references.jsonl             one object per file: path, text, language (null for the mixed file), languages,
                                 sentences, speech ([start_s, end_s] per sentence), duration_s, voices
    turns.jsonl                  one object per turn of the mixed file: path, turn, start_s, end_s, language, text

Command line::

    python -m asr_assets.multilingual_corpus --out DIR [--seed 0] [--files-per-language 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from asr_assets.sample_corpus import (
    _NOISE_RMS_DBFS,
    _SPEECH_PEAK_DBFS,
    SAMPLE_RATE,
    SENTENCES,
    _encode,
    _make_good_file,
    _Plan,
    _synthesize,
    _trim_silence,
)

VOICES = {"en": "en-us", "es": "es", "fr": "fr", "de": "de", "ru": "ru", "zh": "cmn"}
"""espeak-ng voice per language (ISO 639-1; Mandarin is espeak-ng's ``cmn``)."""

LANGUAGES = ("es", "fr", "de", "ru", "zh")
"""Languages of the single-language files (English is the sample corpus's)."""

MULTILINGUAL_SENTENCES: dict[str, tuple[str, ...]] = {
    "es": (
        "El tren a la ciudad sale muy temprano por la mañana.",
        "Por favor, cierra la ventana antes de salir de casa.",
        "Mi hermana trabaja en una pequeña librería cerca de la estación.",
        "Mañana va a hacer frío y mucho viento por la tarde.",
        "Los niños jugaron en el parque hasta que empezó a llover.",
    ),
    "fr": (
        "Le train pour la ville part très tôt le matin.",
        "Nous avons mangé des pâtes et une salade verte hier soir.",
        "Le musée était plein de visiteurs dimanche après-midi.",
        "Il faut acheter du pain, du lait et des œufs frais.",
        "La réunion a été déplacée à jeudi après-midi.",
    ),
    "de": (
        "Der Zug in die Stadt fährt früh am Morgen ab.",
        "Bitte schließe das Fenster, bevor du das Haus verlässt.",
        "Das Wetter war das ganze Wochenende warm und sonnig.",
        "Mein Bruder lernt gerade, Gitarre zu spielen.",
        "Die Bibliothek ist jeden Tag außer Sonntag geöffnet.",
    ),
    "ru": (
        "Поезд в город уходит рано утром.",
        "Пожалуйста, закрой окно перед тем, как уйти.",
        "Моя сестра работает в маленьком книжном магазине.",
        "Завтра будет холодно и ветрено.",
        "Дети играли в парке, пока не начался дождь.",
    ),
    "zh": (
        "今天的天气非常好，我们去公园散步吧。",
        "请在离开房间的时候关掉电灯。",
        "我的妹妹在火车站附近的一家小书店工作。",
        "明天下午会很冷，还会刮大风。",
        "我们昨天晚上在电影院看了一部有趣的电影。",
    ),
    "en": SENTENCES[:5],
}
"""Everyday sentences (written for this project, free to use), in each language's own script."""

FORMATS = ("wav", "mp3", "flac", "ogg", "m4a")
MIXED_NAME = "mixed_turns.mp4"
_MIXED_LANGUAGES = ("en", "es", "zh", "fr", "de", "ru")
_MIXED_TURNS = 18
_PAUSE_RANGE_S = (0.9, 1.4)  # well past VAD's 0.5 s minimum silence, with noise in the pauses
_LEAD_S = 0.5
_SPEED_RANGE_WPM = (150, 175)
_MIXED_NOISE_STREAM = 3


@dataclass(frozen=True)
class Turn:
    """One turn of the mixed file: where its speech is (seconds from the start of the file), its language and text."""

    turn: int
    start_s: float
    end_s: float
    language: str
    text: str


def generate_multilingual_corpus(out_dir: Path, *, seed: int = 0, files_per_language: int = 2) -> list[dict]:
    """Writes the corpus under ``out_dir`` (``media/``, ``references.jsonl``, ``turns.jsonl``).

    Args:
        out_dir: output folder; created if missing.
        seed: non-negative seed of every choice (sentences, speeds, pauses, noise).
        files_per_language: single-language files per language (2 sentences each, at most 2 with 5 sentences).

    Returns:
        The reference records written to ``references.jsonl``, the mixed file's last.

    Raises:
        ValueError: if ``seed`` is negative or ``files_per_language`` out of range.
        RuntimeError: if espeak-ng or ffmpeg fails (the message names the file and the tool's error output).
    """
    if seed < 0 or not 0 <= files_per_language <= 2:
        raise ValueError(f"seed must be >= 0 and files_per_language 0-2, got {seed}, {files_per_language}")
    out_dir = Path(out_dir)
    media = out_dir / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".multilingual-") as tmp_name:
        tmp = Path(tmp_name)
        for n, language in enumerate(LANGUAGES):
            order = rng.sample(MULTILINGUAL_SENTENCES[language], len(MULTILINGUAL_SENTENCES[language]))
            for k in range(files_per_language):
                index = n * files_per_language + k
                fmt = FORMATS[index % len(FORMATS)]
                plan = _Plan(
                    index=index,
                    rel_path=f"{language}_{k:02d}.{fmt}",
                    fmt=fmt,
                    voice=VOICES[language],
                    speed_wpm=rng.randint(*_SPEED_RANGE_WPM),
                    sentences=tuple(order[2 * k : 2 * k + 2]),
                    gaps_s=(rng.uniform(1.0, 2.0),),
                )
                item = _make_good_file(plan, seed, media, tmp)
                records.append(_record(item.path, language, item.sentences, item.speech, [plan.voice]))
        turns = _make_mixed_file(rng, seed, media, tmp)
        records.append(
            _record(
                MIXED_NAME,
                None,
                tuple(t.text for t in turns),
                tuple((t.start_s, t.end_s) for t in turns),
                [VOICES[t.language] for t in turns],
                languages=[t.language for t in turns],
            )
        )
        _write_jsonl(out_dir / "references.jsonl", records, tmp)
        _write_jsonl(out_dir / "turns.jsonl", [{"path": MIXED_NAME, **vars(t)} for t in turns], tmp)
    return records


def _make_mixed_file(rng: random.Random, seed: int, media: Path, tmp: Path) -> list[Turn]:
    """The long file: one sentence per turn, never two turns in a row in one language, pauses of 0.9-1.4 s."""
    clips, languages, texts = [], [], []
    used = {language: 0 for language in _MIXED_LANGUAGES}
    previous = None
    for k in range(_MIXED_TURNS):
        language = rng.choice([lang for lang in _MIXED_LANGUAGES if lang != previous])
        text = MULTILINGUAL_SENTENCES[language][used[language] % len(MULTILINGUAL_SENTENCES[language])]
        used[language] += 1
        plan = _Plan(100 + k, MIXED_NAME, "mp4", VOICES[language], rng.randint(*_SPEED_RANGE_WPM), (text,), ())
        clips.append(_trim_silence(_synthesize(text, plan, tmp / f"turn_{k:02d}.wav"), plan, k))
        languages.append(language)
        texts.append(text)
        previous = language
    pauses = [math.ceil(rng.uniform(*_PAUSE_RANGE_S) * SAMPLE_RATE) for _ in clips[1:]]
    lead = round(_LEAD_S * SAMPLE_RATE)
    total = 2 * lead + sum(len(c) for c in clips) + sum(pauses)
    signal = np.zeros(total)
    turns = []
    position = lead
    for k, (clip, pause) in enumerate(zip(clips, [*pauses, 0], strict=True)):
        # Each voice at the same peak level: espeak-ng's voices differ by several dB.
        signal[position : position + len(clip)] = clip / np.max(np.abs(clip))
        turns.append(
            Turn(
                k,
                round(position / SAMPLE_RATE, 3),
                round((position + len(clip)) / SAMPLE_RATE, 3),
                languages[k],
                texts[k],
            )
        )
        position += len(clip) + pause
    signal *= 10 ** (_SPEECH_PEAK_DBFS / 20)
    signal += np.random.default_rng([seed, _MIXED_NOISE_STREAM]).normal(0.0, 10 ** (_NOISE_RMS_DBFS / 20), total)
    master = tmp / "mixed_master.wav"
    sf.write(master, np.round(np.clip(signal, -1.0, 1.0) * 32767).astype(np.int16), SAMPLE_RATE, subtype="PCM_16")
    _encode(master, total, media / MIXED_NAME, "mp4", tmp)
    return turns


def _record(path, language, sentences, speech, voices, languages=None) -> dict:
    return {
        "path": path,
        "text": " ".join(sentences),
        "language": language,
        "languages": languages or [language],
        "sentences": list(sentences),
        "speech": [[round(start, 3), round(end, 3)] for start, end in speech],
        # Both kinds of file end with half a second after the last speech (sample_corpus's tail, the mixed lead).
        "duration_s": round(speech[-1][1] + _LEAD_S, 3),
        "voices": voices,
        "source": "espeak-ng",
    }


def _write_jsonl(path: Path, rows: list[dict], tmp: Path) -> None:
    part = tmp / path.name
    part.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(part, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (gets media/, references.jsonl, turns)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--files-per-language", type=int, default=2)
    args = parser.parse_args(argv)
    records = generate_multilingual_corpus(args.out, seed=args.seed, files_per_language=args.files_per_language)
    print(json.dumps({"files": len(records), "out": str(args.out)}))


if __name__ == "__main__":
    main()
