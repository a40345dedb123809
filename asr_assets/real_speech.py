"""A real-speech evaluation corpus built from Debian packages: human recordings with reference transcripts.

Synthetic speech (espeak-ng) says little about how the filters treat real labels, and no test may download data from
a hub, so the corpus is assembled from what Debian ships:

- ``asterisk-core-sounds-{lang}-g722``: the Asterisk PBX prompts, recorded by professional voice talent (English and
  Spanish: Allison Smith; French: June Wallack; Russian: Maxim Topal), 16 kHz G.722, CC-BY-SA-3.0 / CC-BY-3.0, with
  every prompt's text in ``asterisk-core-sounds-{lang}`` (``core-sounds-{lang}.txt.gz``, ``id: text`` lines);
- ``pocketsphinx-testdata``: five LibriVox audiobook sentences (public domain) and five spoken card names, another
  speaker each, with CMU Sphinx transcriptions (BSD-2).

The packages are fetched with ``apt-get download`` (no root needed; as root, a missing package list is refreshed
first) and unpacked with ``dpkg-deb -x`` into a cache folder; nothing is installed. Each selected recording is
written in one of several containers and sample rates, and a share of them also in degraded copies (noise at a low
SNR, telephone band), so the teacher makes real mistakes on real speech. ``references.jsonl`` lists every file in
the format the distillation report reads (``path``, ``text``) plus its language, source and condition.

    python -m asr_assets.real_speech --out data/real-speech --limit 150
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asr_assets.distill import canonical_text

SAMPLE_RATE = 16_000
ASTERISK_VOICES = {"en": "en_US_f_Allison", "es": "es_MX_f_Allison", "fr": "fr_CA_f_June", "ru": "ru_RU_f_IvrvoiceRU"}
POCKETSPHINX_DATA = "usr/share/pocketsphinx/test/data"
# (extension, ffmpeg output arguments, sample rate): clean copies rotate through these.
CONTAINERS = (
    ("wav", ["-c:a", "pcm_s16le"], 16_000),
    ("flac", ["-c:a", "flac"], 44_100),
    ("mp3", ["-c:a", "libmp3lame", "-b:a", "64k"], 22_050),
    ("ogg", ["-c:a", "libvorbis", "-q:a", "4"], 48_000),
    ("m4a", ["-c:a", "aac", "-b:a", "64k"], 16_000),
    ("opus", ["-c:a", "libopus", "-b:a", "32k"], 48_000),
)


@dataclass(frozen=True)
class Utterance:
    """One real recording: an id unique in the corpus, its 16 kHz samples, the reference text, language, source."""

    uid: str
    audio: np.ndarray
    text: str
    language: str
    source: str


def _fetch(package: str, cache: Path) -> Path:
    """The unpacked contents of a Debian package (downloaded once into ``cache``)."""
    root = cache / "pkg" / package
    if (root / ".unpacked").exists():
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        download = ["apt-get", "download", "-qq", package]
        done = subprocess.run(download, cwd=debs, capture_output=True, text=True)
        if done.returncode != 0 and os.geteuid() == 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            done = subprocess.run(download, cwd=debs, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"apt-get download {package} failed ({done.stderr.strip()}); run `sudo apt-get update` and retry"
            )
        found = sorted(debs.glob(f"{package}_*.deb"))
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(found[-1]), str(root)], check=True, capture_output=True)
    (root / ".unpacked").touch()
    return root


def _decode(path: Path, *input_args: str) -> np.ndarray:
    """16 kHz mono float32 samples of a file, through the ffmpeg CLI (G.722 and raw PCM need input arguments)."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", *input_args, "-i", str(path), "-ac", "1", "-ar", str(SAMPLE_RATE)]
    done = subprocess.run([*cmd, "-f", "f32le", "-"], capture_output=True, check=True)
    return np.frombuffer(done.stdout, np.float32).copy()


def clean_prompt_text(text: str) -> str:
    """An Asterisk prompt's text without its editorial notes: ``(...)`` removed, whitespace collapsed."""
    return " ".join(re.sub(r"\([^)]*\)", " ", text).split())


def prompt_texts(cache: Path, language: str = "en") -> dict[str, str]:
    """Every spoken Asterisk prompt's text by id (``digits/5``), notes removed; tones (``[...]``) left out."""
    text_root = _fetch(f"asterisk-core-sounds-{language}", cache)
    listing = text_root / f"usr/share/doc/asterisk-core-sounds-{language}/core-sounds-{language}.txt.gz"
    texts = {}
    with gzip.open(listing, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            match = re.match(r"^([^:;\s]+):\s*(.*)$", line.strip())
            if match and not match.group(2).startswith("["):
                texts[match.group(1)] = clean_prompt_text(match.group(2))
    return texts


def asterisk_utterances(cache: Path, language: str = "en", min_words: int = 4) -> list[Utterance]:
    """Every sentence prompt (at least ``min_words`` words, 1-15 s) of one Asterisk language, in id order."""
    texts = prompt_texts(cache, language)
    sounds = _fetch(f"asterisk-core-sounds-{language}-g722", cache) / "usr/share/asterisk/sounds"
    sounds = sounds / ASTERISK_VOICES[language]
    out = []
    for uid, text in sorted(texts.items()):
        path = sounds / f"{uid}.g722"
        if uid.startswith("silence/") or len(text.split()) < min_words or not path.exists():
            continue
        audio = _decode(path, "-f", "g722")
        if 1.0 <= audio.shape[0] / SAMPLE_RATE <= 15.0:
            out.append(Utterance(f"asterisk-{language}-{uid.replace('/', '-')}", audio, text, language, "asterisk"))
    return out


def pocketsphinx_utterances(cache: Path) -> list[Utterance]:
    """The LibriVox sentences and card names of ``pocketsphinx-testdata`` (other speakers than the prompts)."""
    data = _fetch("pocketsphinx-testdata", cache) / POCKETSPHINX_DATA
    out = []
    for folder, listing in (("librivox", "transcription"), ("cards", "cards.transcription")):
        for line in (data / folder / listing).read_text().splitlines():
            match = re.match(r"<s>(.*)</s>\s*\((.*)\)", line.strip())
            if match:
                audio = _decode(data / folder / f"{match.group(2)}.wav")
                uid = f"pocketsphinx-{folder}-{match.group(2)}"
                out.append(Utterance(uid, audio, " ".join(match.group(1).split()), "en", "pocketsphinx"))
    return out


def degrade(audio: np.ndarray, condition: str, seed: int) -> np.ndarray:
    """A harder copy of real speech: ``noise-{snr}db`` (white noise at that SNR over the speech's power) or
    ``telephone`` (300-3400 Hz band, 8 kHz); deterministic for a seed."""
    if condition.startswith("noise-"):
        snr_db = float(condition.removeprefix("noise-").removesuffix("db"))
        rng = np.random.default_rng(seed)
        power = float(np.mean(audio.astype(np.float64) ** 2))
        noise = rng.standard_normal(audio.shape[0]) * np.sqrt(power / 10 ** (snr_db / 10))
        mixed = audio + noise.astype(np.float32)
        return (mixed / max(1.0, float(np.max(np.abs(mixed))) / 0.99)).astype(np.float32)
    if condition == "telephone":
        spectrum = np.fft.rfft(audio)
        freqs = np.fft.rfftfreq(audio.shape[0], 1 / SAMPLE_RATE)
        spectrum[(freqs < 300) | (freqs > 3400)] = 0
        return np.fft.irfft(spectrum, audio.shape[0]).astype(np.float32)
    raise ValueError(f"unknown condition {condition!r}")


def _encode(audio: np.ndarray, path: Path, args: list[str], rate: int) -> None:
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar", str(SAMPLE_RATE), "-ac", "1", "-i", "-"]
    subprocess.run([*cmd, "-ar", str(rate), *args, str(path)], input=audio.tobytes(), check=True)


def select(utterances: list[Utterance], limit: int, holdout: bool = False) -> list[Utterance]:
    """``limit`` utterances spread evenly over the list (deterministic), or with ``holdout`` every one of the others:
    rules tuned on one selection are checked on recordings they have never seen."""
    if limit <= 0 or limit >= len(utterances):
        return [] if holdout else list(utterances)
    picks = set(np.linspace(0, len(utterances) - 1, limit).round().astype(int).tolist())
    if not holdout:
        return [u for i, u in enumerate(utterances) if i in picks]
    # Nor the same words under another prompt id: a held-out text must be new too.
    seen = {canonical_text(utterances[i].text, utterances[i].language) for i in picks}
    return [u for i, u in enumerate(utterances) if i not in picks and canonical_text(u.text, u.language) not in seen]


def build_corpus(
    out: Path,
    cache: Path,
    limit: int = 150,
    degraded_every: int = 3,
    conditions: tuple[str, ...] = ("noise-5db", "telephone", "noise-0db"),
    languages: tuple[str, ...] = ("en",),
    with_pocketsphinx: bool = True,
    holdout: bool = False,
) -> list[dict]:
    """Writes the corpus under ``out/media`` and ``out/references.jsonl`` and returns the reference records.

    Args:
        out: corpus folder (media files and references).
        cache: where packages are downloaded and unpacked (reused between runs).
        limit: sentence prompts per language.
        degraded_every: every n-th selected utterance also gets a degraded copy (0: none), conditions in rotation.
        conditions: degradations to rotate through.
        languages: Asterisk languages to take prompts from.
        with_pocketsphinx: add the pocketsphinx-testdata sentences (English, other speakers).
        holdout: take the prompts that ``limit`` does not select instead (see ``select``).
    """
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    chosen = [u for language in languages for u in select(asterisk_utterances(cache, language), limit, holdout)]
    if with_pocketsphinx:
        chosen += pocketsphinx_utterances(cache)
    records = []
    for k, u in enumerate(chosen):
        variants = [("clean", u.audio)]
        if degraded_every and k % degraded_every == degraded_every - 1:
            condition = conditions[(k // degraded_every) % len(conditions)]
            variants.append((condition, degrade(u.audio, condition, seed=k)))
        for j, (condition, audio) in enumerate(variants):
            ext, args, rate = CONTAINERS[(k + j) % len(CONTAINERS)]
            name = f"{u.uid}.{condition}.{ext}"
            if not (media / name).exists():
                _encode(audio, media / f".{name}.part.{ext}", args, rate)
                (media / f".{name}.part.{ext}").rename(media / name)
            records.append(
                {
                    "path": name,
                    "text": u.text,
                    "language": u.language,
                    "source": u.source,
                    "condition": condition,
                    "utterance": u.uid,
                    "duration_s": round(u.audio.shape[0] / SAMPLE_RATE, 3),
                }
            )
    with open(out / "references.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    return records


def mixed_recording(
    utterances: dict[str, list[Utterance]], order: list[str], seed: int = 0
) -> tuple[np.ndarray, list[dict]]:
    """One recording whose turns follow ``order`` (a language per turn), each turn the next unused prompt of its
    language from ``utterances``, with 0.6-1.2 s pauses between turns (as between two speakers on a call). Returns the
    samples and the turns: ``start_s``, ``end_s``, ``language``, ``text``."""
    rng = np.random.default_rng(seed)
    used = dict.fromkeys(utterances, 0)
    pieces, turns, pos = [], [], 0.0
    for language in order:
        u = utterances[language][used[language]]
        used[language] += 1
        pause = np.zeros(int(rng.uniform(0.6, 1.2) * SAMPLE_RATE), np.float32)
        end = pos + u.audio.shape[0] / SAMPLE_RATE
        turns.append({"start_s": round(pos, 3), "end_s": round(end, 3), "language": language, "text": u.text})
        pieces += [u.audio, pause]
        pos = end + pause.shape[0] / SAMPLE_RATE
    return np.concatenate(pieces), turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=Path("data/cache-debs"))
    parser.add_argument("--limit", type=int, default=150, help="sentence prompts per language")
    parser.add_argument("--degraded-every", type=int, default=3)
    parser.add_argument("--languages", default="en", help="comma-separated Asterisk languages (en, es, fr, ru)")
    args = parser.parse_args()
    records = build_corpus(
        args.out, args.cache.resolve(), args.limit, args.degraded_every, languages=tuple(args.languages.split(","))
    )
    seconds = sum(r["duration_s"] for r in records)
    print(json.dumps({"files": len(records), "audio_s": round(seconds, 1), "out": str(args.out)}))


if __name__ == "__main__":
    main()
