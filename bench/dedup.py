"""Deduplication benchmark: recall on real re-encodes, false matches between distinct recordings, fingerprinting
speed, and the global index's lookup time with synthetic segments indexed (their posting lists as long as the
landmark collision rate measured between real recordings makes them at that size).

Generates espeak-ng speech (several voices reading the same sentences) and, from one voice's recordings, ffmpeg
variants: mp3 / aac / opus at two bitrates each, +6 dB and -6 dB, 8 kHz and 44.1 kHz resampling, and 5-30 s clips cut
from the longer files (re-encoded too). Every variant must match its original through the fingerprint index; the other
voices' recordings of the same sentences must match nothing. Prints one JSON line:
``{"pairs", "recall", "false_matches", "weakest_pair", "most_votes_distinct", "files_per_s_per_core",
"x_realtime_per_core", "index_segments", "index_rows", "collision_source", "lookup_ms", "real_collision_rate",
"synthetic_values", "mean_postings_per_hash", "mean_postings_read_per_grid", "mean_hashes_consulted_per_grid",
"recall_at_scale_by_share", "false_matches_at_scale", "posting_budget"}``.

    python bench/dedup.py [--work DIR] [--index-segments 10000000]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asr_assets import dedup_index  # noqa: E402
from asr_assets import fingerprint as fp  # noqa: E402
from asr_assets.dedup_index import FingerprintIndex, build_index_arrays, synthetic_index  # noqa: E402

WORDS = {
    "adj": [
        "quick",
        "brown",
        "lazy",
        "quiet",
        "golden",
        "narrow",
        "ancient",
        "bright",
        "heavy",
        "gentle",
        "silver",
        "rapid",
        "hollow",
        "crimson",
    ],
    "noun": [
        "fox",
        "river",
        "teacher",
        "engine",
        "garden",
        "window",
        "captain",
        "market",
        "village",
        "doctor",
        "letter",
        "bridge",
        "forest",
    ],
    "verb": [
        "crossed",
        "painted",
        "followed",
        "opened",
        "carried",
        "watched",
        "repaired",
        "visited",
        "measured",
        "described",
    ],
    "place": ["before dawn", "near the station", "after the storm", "in the valley", "under the old bridge", "at noon"],
}
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f3"]  # the first is copied; the others are distinct
SENTENCES_PER_RECORDING = 14  # about 45 s of speech
RECORDINGS = 4  # long recordings per voice, each reading the sentences in its own order
VARIANTS = {
    "mp3-64k": ["-c:a", "libmp3lame", "-b:a", "64k"],
    "mp3-128k": ["-c:a", "libmp3lame", "-b:a", "128k"],
    "aac-48k": ["-c:a", "aac", "-b:a", "48k"],
    "aac-128k": ["-c:a", "aac", "-b:a", "128k"],
    "opus-16k": ["-c:a", "libopus", "-b:a", "16k"],
    "opus-48k": ["-c:a", "libopus", "-b:a", "48k"],
    "gain+6": ["-af", "volume=6dB", "-c:a", "pcm_s16le"],
    "gain-6": ["-af", "volume=-6dB", "-c:a", "pcm_s16le"],
    "8khz": ["-ar", "8000", "-c:a", "pcm_s16le"],
    "44khz": ["-ar", "44100", "-c:a", "pcm_s16le"],
}
EXT = {"mp3": "mp3", "aac": "m4a", "opus": "opus"}
CLIP_LENGTHS = (5.0, 12.0, 30.0)


def _sentence(rng: random.Random) -> str:
    """A random sentence: every recording of the copied voice says different words (so a clip has one original)."""
    pick = {k: rng.choice(v) for k, v in WORDS.items()}
    return f"The {pick['adj']} {pick['noun']} {pick['verb']} the {rng.choice(WORDS['noun'])} {pick['place']}."


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def speak(text: str, voice: str, dst: Path) -> None:
    _run(["espeak-ng", "-v", voice, "-s", "160", "-w", str(dst), text])


def decode(path: Path) -> np.ndarray:
    """16 kHz mono float samples through ffmpeg (the same resampler the pipeline's decoder uses)."""
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-ac", "1", "-ar", "16000", "-f", "f32le", "-"],
        check=True,
        capture_output=True,
    ).stdout
    return np.frombuffer(raw, np.float32)


def variant(src: Path, dst_stem: Path, name: str, args: list[str], clip: tuple[float, float] | None = None) -> Path:
    dst = Path(f"{dst_stem}.{EXT.get(name.split('-')[0], 'wav')}")
    cut = [] if clip is None else ["-ss", f"{clip[0]:.2f}", "-t", f"{clip[1]:.2f}"]
    _run(["ffmpeg", "-v", "error", "-y", "-i", str(src), *cut, *args, str(dst)])
    return dst


def make_corpus(work: Path, seed: int = 0) -> tuple[dict[str, Path], list[tuple[Path, str]], list[Path]]:
    """Originals (name -> wav), true pairs (variant, original name) and distinct recordings."""
    rng = random.Random(seed)
    originals: dict[str, Path] = {}
    distinct: list[Path] = []
    for r in range(RECORDINGS):
        text = " ".join(_sentence(rng) for _ in range(SENTENCES_PER_RECORDING))
        for voice in VOICES:
            path = work / f"rec{r}-{voice.replace('+', '_')}.wav"
            if not path.exists():
                speak(text, voice, path)
            if voice == VOICES[0]:
                originals[path.stem] = path
            else:
                distinct.append(path)
    pairs: list[tuple[Path, str]] = []
    for name, src in originals.items():
        duration = len(decode(src)) / 16000
        for vname, args in VARIANTS.items():
            pairs.append((variant(src, work / f"{name}.{vname}", vname, args), name))
        for length in CLIP_LENGTHS:
            start = rng.uniform(0, max(0.0, duration - length))
            vname = rng.choice(["mp3-64k", "aac-128k", "opus-48k", "gain-6"])
            stem = work / f"{name}.clip{length:.0f}-{vname}"
            pairs.append((variant(src, stem, vname, VARIANTS[vname], clip=(start, length)), name))
    return originals, pairs, distinct


def _human_speech_prints(cache: Path) -> list[np.ndarray]:
    """Each real human recording's sampled landmark hashes, when the real-speech package cache is there."""
    from asr_assets.real_speech import asterisk_utterances, pocketsphinx_utterances

    if not (cache / "debs").is_dir():
        return []
    try:
        utterances = asterisk_utterances(cache, min_words=1) + pocketsphinx_utterances(cache)
    except (OSError, ValueError, RuntimeError):  # a cache without the packages (they are fetched only by tests)
        return []
    return [fp.sampled(fp.fingerprint(u.audio.astype(np.float32))).hashes for u in utterances]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for the generated audio (default: a temp dir)")
    parser.add_argument("--index-segments", type=int, default=10_000_000, help="synthetic segments for the lookup")
    parser.add_argument(
        "--real-speech-cache",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "data" / "cache-debs",
        help="the Debian packages of real speech (asr_assets.real_speech; the tests download them here)",
    )
    parser.add_argument(
        "--budget", type=int, default=None, help="postings a query grid may read (default: dedup_index.POSTING_BUDGET)"
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.budget is not None:
        dedup_index.POSTING_BUDGET = args.budget
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    work.mkdir(parents=True, exist_ok=True)
    originals, pairs, distinct = make_corpus(work)

    # Fingerprinting speed: CPU time of one process (one core) over every decoded file.
    audio = {p: decode(p) for p in [*originals.values(), *(v for v, _ in pairs), *distinct]}
    cpu = time.process_time()
    prints = {p: fp.query_prints(x) for p, x in audio.items()}
    cpu = time.process_time() - cpu
    seconds = sum(len(x) for x in audio.values()) / 16000

    names = list(originals)
    index = FingerprintIndex([build_index_arrays([prints[originals[n]][0] for n in names])], names=names)
    found = 0
    weakest = None  # the true pair with the fewest agreeing landmarks (the margin over MIN_VOTES)
    for path, name in pairs:
        hit = index.lookup(prints[path])
        ok = hit is not None and hit.name == name
        found += ok
        if ok and (weakest is None or hit.votes < weakest.votes):
            weakest = hit
        if args.verbose:
            print(path.name, name, hit, file=sys.stderr)
    false = []
    strongest_false = 0  # the most agreeing landmarks any distinct recording got (the margin under MIN_VOTES)
    for path in distinct:
        hit = index.lookup(prints[path])
        strongest_false = max([strongest_false, *(b.votes for q in prints[path] if (b := index.best(q)))])
        if hit is not None:
            false.append((path.name, hit))
        if args.verbose:
            print("distinct", path.name, hit, [index.best(q) for q in prints[path]], file=sys.stderr)

    # The landmark collision rate that sets the synthetic index's posting lists: between real people's recordings
    # (Debian's Asterisk prompts and pocketsphinx's LibriVox sentences, when the test cache holds them), else between
    # the bench's espeak recordings (more alike: one synthesizer, the same sentences).
    human = _human_speech_prints(args.real_speech_cache)
    real = human or [
        prints[p][0].hashes[prints[p][0].hashes < np.uint64(fp.SAMPLE_LIMIT)] for p in [*originals.values(), *distinct]
    ]
    try:
        rows, lookup_ms, postings = synthetic_index(args.index_segments, work / "synthetic-index", real, seed=1)
    finally:
        shutil.rmtree(work / "synthetic-index", ignore_errors=True)  # 8 GB at 10 million segments
    print(
        json.dumps(
            {
                "pairs": len(pairs),
                "recall": round(found / len(pairs), 4),
                "false_matches": len(false),
                "distinct_recordings": len(distinct),
                "weakest_pair": None if weakest is None else [weakest.votes, round(weakest.similarity, 3)],
                "most_votes_distinct": strongest_false,
                "files_per_s_per_core": round(len(audio) / cpu, 1),
                "x_realtime_per_core": round(seconds / cpu, 1),
                "index_segments": args.index_segments,
                "index_rows": rows,
                "collision_source": f"{len(real)} human recordings" if human else f"{len(real)} espeak recordings",
                "lookup_ms": round(lookup_ms, 3),
                **postings,
            }
        )
    )


if __name__ == "__main__":
    main()
