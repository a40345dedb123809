"""Deterministic generator of a small English speech corpus with reference transcripts.

The corpus is synthesized with espeak-ng from everyday English sentences, so it needs no downloads and is
reproducible: the same arguments always produce byte-identical files. It is used by ``make demo`` and by tests.

Layout of ``out_dir``::

    media/en_000_wav.wav            good files, one container/codec each, cycling through FORMATS
    media/sub dir/en_002_flac.flac  every third good file lives in a subfolder whose name has a space
    media/broken_*.{wav,mp3,flac,mp4}  undecodable or audio-less files (reference text "")
    references.jsonl                one JSON object per item: path, text, speech, sentences, broken

Command line::

    python -m asr_assets.sample_corpus --out DIR [--seed 0] [--files 12] [--no-broken]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

SAMPLE_RATE = 22050
"""Rate of the synthesized master in Hz; espeak-ng's native rate, kept so the pipeline has to resample."""

# espeak-ng 1.51 silently ignores a "+variant" suffix on "en-gb" (it exits 0 with nothing on stderr and speaks
# plain en-gb), so the British female voice is spelled "en+f2"; tests check that every voice sounds different.
VOICES: tuple[str, ...] = ("en-us", "en-gb", "en-us+m3", "en+f2", "en-us+f3")
"""espeak-ng voices that files are spoken with, one voice per file."""

FORMATS: tuple[str, ...] = ("wav", "mp3", "flac", "ogg", "opus", "m4a", "mp4")
"""Output formats that good files cycle through, in order; the format name is also the file extension."""

SUBDIR = "sub dir"
"""Subfolder of the media dir (with a space, to exercise recursive listing) that holds every third good file."""

SENTENCES: tuple[str, ...] = (
    "The train to the city leaves early in the morning.",
    "Please remember to close the window before you leave.",
    "We had pasta and a green salad for dinner last night.",
    "The children played in the park until it started to rain.",
    "My sister works at a small bookshop near the station.",
    "It is going to be cold and windy tomorrow afternoon.",
    "He forgot his umbrella on the bus again this week.",
    "The meeting has been moved to Thursday afternoon.",
    "Could you send me the report by the end of the day?",
    "They painted the kitchen a bright shade of yellow.",
    "The dog waited patiently by the door for his owner.",
    "She drinks a cup of tea every morning before work.",
    "The library is open every day except Sunday.",
    "We are planning a trip to the mountains this summer.",
    "The new phone has a much better camera than the old one.",
    "Turn left at the traffic lights and then go straight ahead.",
    "The museum was full of visitors on Sunday afternoon.",
    "I need to buy bread, milk and some fresh eggs.",
    "The football match was cancelled because of the storm.",
    "Our neighbours have a garden full of red roses.",
    "The doctor told him to get more sleep and drink water.",
    "My brother is learning to play the guitar.",
    "The shop on the corner sells fresh fruit and vegetables.",
    "We watched a funny movie at the cinema yesterday.",
    "The teacher asked the students to read the first chapter.",
    "It takes about an hour to drive to the airport.",
    "She opened the letter and smiled at the good news.",
    "The coffee in this small cafe is really good.",
    "Please turn off the lights when you leave the room.",
    "The river runs through the middle of the old town.",
    "He wants to become a pilot when he grows up.",
    "The weather was warm and sunny for the whole weekend.",
    "I will call you as soon as I get home.",
    "The baby fell asleep in the back of the car.",
    "They moved to a bigger house closer to the school.",
    "The price of petrol has gone up again this month.",
    "We need to finish this project before the holidays.",
    "The cat likes to sleep on the warm windowsill.",
    "Our flight was delayed because of the heavy fog.",
    "She bought a new blue dress for the wedding.",
)
"""Everyday English sentences (written for this project, free to use) that good files are made of. Common words
and no numbers: the embedded Whisper tiny.en teacher transcribes them reliably, so the demo's WER measures the
pipeline rather than the limits of a tiny model on deliberately hard text (IEEE "Harvard" sentences gave 0.31-0.41
clip-level WER with tiny.en here, these 0.03-0.24 depending on the voice)."""

_LEAD_S = 0.5
_TAIL_S = 0.5
_GAP_RANGE_S = (1.0, 3.0)
_SPEED_RANGE_WPM = (140, 175)
_SENTENCES_PER_FILE = (2, 4)
# Relative to full scale; espeak-ng pads each utterance with digital silence and a faint fade that is not speech.
_TRIM_THRESHOLD = 1e-3
_SPEECH_PEAK_DBFS = -3.0
_NOISE_RMS_DBFS = -55.0
# Independent numpy streams per purpose, so adding files never changes the noise of earlier ones.
_NOISE_STREAM = 1
_BROKEN_STREAM = 2

_FFMPEG_PREFIX: tuple[str, ...] = ("ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y")
# Strip encoder version strings, timestamps and random ids (e.g. Ogg serial numbers) from the output.
_FFMPEG_BITEXACT: tuple[str, ...] = (
    "-map_metadata", "-1", "-fflags", "+bitexact", "-flags:a", "+bitexact", "-flags:v", "+bitexact",
)  # fmt: skip
_BLACK_VIDEO = "color=c=black:s=64x64:r=5"
# x264 is deterministic with a fixed thread count; one thread keeps the 2-core budget for the audio encoders.
_H264_ARGS: tuple[str, ...] = ("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-threads", "1")
_AUDIO_CODEC_ARGS: dict[str, tuple[str, ...]] = {
    # Duplicate the channel explicitly: ffmpeg's default mono->stereo upmix attenuates each side by 3 dB.
    "wav": ("-af", "pan=stereo|c0=c0|c1=c0", "-ar", "44100", "-c:a", "pcm_s16le"),
    "mp3": ("-c:a", "libmp3lame", "-b:a", "64k"),
    "flac": ("-c:a", "flac"),
    "ogg": ("-c:a", "libvorbis", "-q:a", "3"),
    # libopus only accepts 8/12/16/24/48 kHz.
    "opus": ("-ar", "48000", "-c:a", "libopus", "-b:a", "32k"),
    "m4a": ("-c:a", "aac", "-b:a", "64k"),
    "mp4": ("-c:a", "aac", "-b:a", "64k"),
}
_BROKEN_KINDS: dict[str, str] = {
    "broken_empty.wav": "empty",
    "broken_random.mp3": "random",
    "broken_text.flac": "text",
    "broken_noaudio.mp4": "noaudio",
}
_BROKEN_TEXT = "This is not a FLAC file: it is plain UTF-8 text, naïvely named .flac.\n"
_GENERATED_NAME = re.compile(r"en_\d{3}_[a-z0-9]+\.[a-z0-9]+|broken_[a-z]+\.[a-z0-9]+")


@dataclass(frozen=True)
class CorpusItem:
    """One media file of the corpus and its reference.

    Attributes:
        path: Location relative to ``Corpus.media_dir``, as a POSIX string (may contain a subfolder).
        text: Full reference transcript, the sentences joined with single spaces; "" for broken files.
        speech: ``(start_s, end_s)`` pairs in seconds from the start of the file, one per sentence, marking where
            speech really is (measured on the generated samples, before encoding); empty for broken files.
        sentences: The reference sentences in spoken order; empty for broken files.
        broken: None for a good file, otherwise a short kind: "empty", "random", "text" or "noaudio".
    """

    path: str
    text: str
    speech: tuple[tuple[float, float], ...]
    sentences: tuple[str, ...]
    broken: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Returns the item as the JSON object stored on one line of ``references.jsonl``."""
        return {
            "path": self.path,
            "text": self.text,
            "speech": [[start, end] for start, end in self.speech],
            "sentences": list(self.sentences),
            "broken": self.broken,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CorpusItem:
        """Builds an item from one parsed line of ``references.jsonl``.

        Args:
            obj: The parsed JSON object, as written by ``to_json``.

        Returns:
            The equivalent item.
        """
        return cls(
            path=obj["path"],
            text=obj["text"],
            speech=tuple((float(start), float(end)) for start, end in obj["speech"]),
            sentences=tuple(obj["sentences"]),
            broken=obj["broken"],
        )


@dataclass(frozen=True)
class Corpus:
    """A generated corpus on disk.

    Attributes:
        media_dir: Folder holding the media files (searched recursively; some are in a subfolder).
        references_path: The ``references.jsonl`` file, one ``CorpusItem.to_json`` object per line, in item order.
        items: Every file of the corpus: good files in generation order, then broken files.
    """

    media_dir: Path
    references_path: Path
    items: tuple[CorpusItem, ...]


@dataclass(frozen=True)
class _Plan:
    """Seeded choices for one good file, drawn before any synthesis."""

    index: int
    rel_path: str
    fmt: str
    voice: str
    speed_wpm: int
    sentences: tuple[str, ...]
    gaps_s: tuple[float, ...]


def generate_corpus(out_dir: Path, *, seed: int = 0, num_files: int = 12, include_broken: bool = True) -> Corpus:
    """Generates (or regenerates) the sample corpus under ``out_dir``.

    Every file is written to a temporary name inside ``out_dir`` and renamed into place, and the output depends only
    on the arguments, so running again with the same arguments leaves byte-identical files. Files from an earlier run
    with other arguments that match this generator's naming scheme are removed; other files are left alone.

    Args:
        out_dir: Folder to write ``media/`` and ``references.jsonl`` into; created if missing.
        seed: Non-negative seed for every random choice (sentences, voices, speeds, gaps, noise, broken bytes).
        num_files: Number of good speech files; they cycle through ``FORMATS``, so 7 covers each format once.
        include_broken: Whether to add the four broken files (empty, random bytes, text, video without audio).

    Returns:
        The corpus that was written.

    Raises:
        ValueError: If ``seed`` or ``num_files`` is negative.
        RuntimeError: If espeak-ng or ffmpeg fails; the message names the file and the tool's error output.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if num_files < 0:
        raise ValueError(f"num_files must be >= 0, got {num_files}")
    out_dir = Path(out_dir)
    media_dir = out_dir / "media"
    (media_dir / SUBDIR).mkdir(parents=True, exist_ok=True)
    plans = _plan_files(seed, num_files)
    items: list[CorpusItem] = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".sample_corpus-") as tmp_name:
        tmp_dir = Path(tmp_name)
        for plan in plans:
            items.append(_make_good_file(plan, seed, media_dir, tmp_dir))
        if include_broken:
            items.extend(_make_broken_files(seed, media_dir, tmp_dir))
        _prune_stale(media_dir, {item.path for item in items})
        references_path = out_dir / "references.jsonl"
        lines = "".join(json.dumps(item.to_json(), ensure_ascii=False) + "\n" for item in items)
        tmp_references = tmp_dir / references_path.name
        tmp_references.write_text(lines, encoding="utf-8")
        os.replace(tmp_references, references_path)
    return Corpus(media_dir=media_dir, references_path=references_path, items=tuple(items))


def _plan_files(seed: int, num_files: int) -> list[_Plan]:
    # All choices come from one stream in a fixed order, so the first N files are the same whatever num_files is.
    rng = random.Random(seed)
    plans = []
    for index in range(num_files):
        fmt = FORMATS[index % len(FORMATS)]
        name = f"en_{index:03d}_{fmt}.{fmt}"
        count = rng.randint(*_SENTENCES_PER_FILE)
        plans.append(
            _Plan(
                index=index,
                rel_path=f"{SUBDIR}/{name}" if index % 3 == 2 else name,
                fmt=fmt,
                voice=rng.choice(VOICES),
                speed_wpm=rng.randint(*_SPEED_RANGE_WPM),
                sentences=tuple(rng.sample(SENTENCES, count)),
                gaps_s=tuple(rng.uniform(*_GAP_RANGE_S) for _ in range(count - 1)),
            )
        )
    return plans


def _make_good_file(plan: _Plan, seed: int, media_dir: Path, tmp_dir: Path) -> CorpusItem:
    clips = [
        _trim_silence(_synthesize(sentence, plan, tmp_dir / f"{plan.index:03d}_{number}.wav"), plan, number)
        for number, sentence in enumerate(plan.sentences)
    ]
    lead = round(_LEAD_S * SAMPLE_RATE)
    gaps = [math.ceil(gap_s * SAMPLE_RATE) for gap_s in plan.gaps_s]
    total = lead + sum(len(clip) for clip in clips) + sum(gaps) + round(_TAIL_S * SAMPLE_RATE)
    signal = np.zeros(total, dtype=np.float64)
    speech = []
    position = lead
    for clip, gap in zip(clips, [*gaps, 0], strict=True):
        signal[position : position + len(clip)] = clip
        speech.append((position / SAMPLE_RATE, (position + len(clip)) / SAMPLE_RATE))
        position += len(clip) + gap
    signal *= 10 ** (_SPEECH_PEAK_DBFS / 20) / np.max(np.abs(signal))
    noise_rng = np.random.default_rng([seed, _NOISE_STREAM, plan.index])
    signal += noise_rng.normal(0.0, 10 ** (_NOISE_RMS_DBFS / 20), total)
    master = tmp_dir / f"{plan.index:03d}_master.wav"
    # Quantize here rather than in libsndfile so the master's samples are fully determined by this code.
    sf.write(master, np.round(np.clip(signal, -1.0, 1.0) * 32767).astype(np.int16), SAMPLE_RATE, subtype="PCM_16")
    _encode(master, total, media_dir / plan.rel_path, plan.fmt, tmp_dir)
    return CorpusItem(
        path=plan.rel_path,
        text=" ".join(plan.sentences),
        speech=tuple(speech),
        sentences=plan.sentences,
    )


def _synthesize(sentence: str, plan: _Plan, wav_path: Path) -> np.ndarray:
    args = ["espeak-ng", "-v", plan.voice, "-s", str(plan.speed_wpm), "-w", str(wav_path), sentence]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    # A warning on stderr usually means espeak-ng fell back to another voice, which would break reproducibility.
    if result.returncode != 0 or result.stderr.strip():
        raise RuntimeError(
            f"espeak-ng failed for {plan.rel_path} (voice {plan.voice}, sentence {sentence!r}), "
            f"exit code {result.returncode}: {result.stderr.strip() or 'no error output'}"
        )
    samples, rate = sf.read(wav_path, dtype="float64")
    if rate != SAMPLE_RATE or samples.ndim != 1:
        raise RuntimeError(
            f"espeak-ng wrote {rate} Hz with shape {samples.shape} for {plan.rel_path}, expected {SAMPLE_RATE} Hz mono"
        )
    return samples


def _trim_silence(samples: np.ndarray, plan: _Plan, number: int) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples) >= _TRIM_THRESHOLD)
    if loud.size == 0:
        raise RuntimeError(f"espeak-ng produced only silence for sentence {number} of {plan.rel_path}")
    return samples[loud[0] : loud[-1] + 1]


def _encode(master: Path, num_samples: int, dest: Path, fmt: str, tmp_dir: Path) -> None:
    args = ["-i", str(master)]
    if fmt == "mp4":
        # "-shortest" lets the 5 fps video run a few frames past the audio in ffmpeg 5; an explicit limit ends the
        # container with the audio. Rounding up to whole microseconds keeps the last audio sample.
        limit_s = math.ceil(num_samples * 1_000_000 / SAMPLE_RATE) / 1_000_000
        args += ["-f", "lavfi", "-i", _BLACK_VIDEO, "-map", "0:a", "-map", "1:v", *_H264_ARGS, "-t", f"{limit_s:.6f}"]
    _run_ffmpeg([*args, *_AUDIO_CODEC_ARGS[fmt]], dest, tmp_dir)


def _run_ffmpeg(args: Sequence[str], dest: Path, tmp_dir: Path) -> None:
    # The temporary name keeps the real extension because ffmpeg picks the container from it.
    tmp_path = tmp_dir / f"encoding{dest.suffix}"
    command = [*_FFMPEG_PREFIX, *args, *_FFMPEG_BITEXACT, str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or result.stderr.strip():
        raise RuntimeError(
            f"ffmpeg failed to write {dest}, exit code {result.returncode}: "
            f"{result.stderr.strip() or 'no error output'}"
        )
    os.replace(tmp_path, dest)


def _make_broken_files(seed: int, media_dir: Path, tmp_dir: Path) -> list[CorpusItem]:
    contents = {
        "broken_empty.wav": b"",
        "broken_random.mp3": np.random.default_rng([seed, _BROKEN_STREAM]).bytes(4096),
        "broken_text.flac": _BROKEN_TEXT.encode("utf-8"),
    }
    for name, data in contents.items():
        tmp_path = tmp_dir / name
        tmp_path.write_bytes(data)
        os.replace(tmp_path, media_dir / name)
    video_only = ["-f", "lavfi", "-i", f"{_BLACK_VIDEO}:d=1", *_H264_ARGS, "-an"]
    _run_ffmpeg(video_only, media_dir / "broken_noaudio.mp4", tmp_dir)
    return [
        CorpusItem(path=name, text="", speech=(), sentences=(), broken=kind) for name, kind in _BROKEN_KINDS.items()
    ]


def _prune_stale(media_dir: Path, keep: set[str]) -> None:
    # Left-overs of a run with other arguments would have no reference and skew any evaluation of the corpus.
    for path in sorted(media_dir.rglob("*")):
        rel_path = path.relative_to(media_dir).as_posix()
        if path.is_file() and _GENERATED_NAME.fullmatch(path.name) and rel_path not in keep:
            path.unlink()
    subdir = media_dir / SUBDIR
    if not any(subdir.iterdir()):
        subdir.rmdir()


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command line: generates the corpus and prints a one-line summary.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.
    """
    parser = argparse.ArgumentParser(description="Generate a small deterministic English speech corpus.")
    parser.add_argument("--out", type=Path, required=True, help="output folder (gets media/ and references.jsonl)")
    parser.add_argument("--seed", type=int, default=0, help="non-negative random seed (default: 0)")
    parser.add_argument("--files", type=int, default=12, help="number of good speech files (default: 12)")
    parser.add_argument("--no-broken", action="store_true", help="leave out the broken files")
    args = parser.parse_args(argv)
    try:
        corpus = generate_corpus(args.out, seed=args.seed, num_files=args.files, include_broken=not args.no_broken)
    except ValueError as error:
        parser.error(str(error))
    good = [item for item in corpus.items if item.broken is None]
    speech_s = sum(end - start for item in good for start, end in item.speech)
    print(
        f"Generated {len(good)} speech files ({speech_s:.1f} s of speech, {sum(len(i.sentences) for i in good)} "
        f"sentences) and {len(corpus.items) - len(good)} broken files in {corpus.media_dir}; "
        f"references in {corpus.references_path}"
    )


if __name__ == "__main__":
    main()
