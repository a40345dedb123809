"""Language ID per segment and labels in every language, against whole-file multilingual faster-whisper.

The corpus holds real human speech (the Asterisk prompts in English, Spanish, French and Russian from Debian packages,
``asr_assets.real_speech``), espeak-ng speech in Spanish, French, German, Russian and Mandarin plus a ~70-s file whose
speakers switch language at every turn (``asr_assets.multilingual_corpus``), and long real recordings made of Asterisk
prompts of two languages alternating. Ours is the whole asset graph with ``ASR_LANGUAGE=auto`` (per-segment language
ID, tiny.en for English, Whisper base for the rest); the peer is Whisper base on each whole file with its own language
detection (from the first 30 s) and its own VAD, beam 5 for both.

- ``lid_accuracy``: single-language files whose language (ours: the majority of its segments' detected languages,
  by duration; the peer: its detection) is the reference's.
- ``turn_lid_accuracy``: turns of the mixed-language files whose segments carry the turn's language (a segment
  belongs to the turn it overlaps most; a turn with no segment counts as wrong).
- ``x_realtime_per_core``: seconds of audio per second of language ID per core, timed on the corpus's segments in
  this process.
- ``wer_by_language``: label error rate per reference language (CER for zh), all labels before filtering, ours and
  the peer's on the same files.

    .venv/bin/python bench/lid.py [--per-language 15] [--work data/bench-lid]
    .venv/bin/python bench/lid.py --sweep     # accuracy and cost of the LID input length (asr_assets.lid.MIN_FRAMES)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import file_records, our_texts, run_ours  # noqa: E402

from asr_assets.calibrate import label_errors  # noqa: E402
from asr_assets.languages import error_metric  # noqa: E402
from asr_assets.multilingual_corpus import generate_multilingual_corpus  # noqa: E402
from asr_assets.real_speech import SAMPLE_RATE, _encode, asterisk_utterances, mixed_recording, select  # noqa: E402

REAL_LANGUAGES = ("en", "es", "fr", "ru")


def real_files(media: Path, cache: Path, per_language: int) -> tuple[list[dict], list[dict]]:
    """Short real prompts per language as files, and two long files alternating two languages every prompt."""
    records, turns = [], []
    pools = {lang: select(asterisk_utterances(cache, lang), per_language * 3) for lang in REAL_LANGUAGES}
    for lang, pool in pools.items():
        for u in pool[:per_language]:
            name = f"real-{u.uid}.flac"
            if not (media / name).exists():
                _encode(u.audio, media / name, ["-c:a", "flac"], 16_000)
            records.append({"path": name, "text": u.text, "language": lang})
    for n, (a, b) in enumerate((("en", "es"), ("fr", "ru"))):
        name = f"real-mixed-{a}-{b}.m4a"
        rest = {lang: pools[lang][per_language + 6 * n :] for lang in (a, b)}
        audio, mine = mixed_recording(rest, [a, b] * 6, seed=n)
        turns += [{"path": name, **t} for t in mine]
        if not (media / name).exists():
            _encode(audio, media / name, ["-c:a", "aac", "-b:a", "64k"], 16_000)
    return records, turns


def majority(segments: list[dict]) -> str | None:
    weight: dict[str, float] = {}
    for s in segments:
        if s.get("language"):
            weight[s["language"]] = weight.get(s["language"], 0.0) + s["end"] - s["start"]
    return max(weight, key=weight.__getitem__) if weight else None


def turn_accuracy(turns: list[dict], files: dict[str, dict]) -> float:
    right = 0
    for t in turns:
        segs = (files.get(t["path"]) or {}).get("segments") or []
        mine = [
            s
            for s in segs
            if max(turns, key=lambda u: _overlap(u, s) if u["path"] == t["path"] else -1.0) is t and _overlap(t, s) > 0
        ]
        right += bool(mine) and all(s.get("language") == t["language"] for s in mine)
    return right / max(len(turns), 1)


def _overlap(turn: dict, seg: dict) -> float:
    return min(turn["end_s"], seg["end"]) - max(turn["start_s"], seg["start"])


def run_peer(media: Path, paths: list[str]) -> dict[str, tuple[str, str]]:
    from faster_whisper import WhisperModel

    from resources.teachers.whisper import multilingual_base_path

    model = WhisperModel(str(multilingual_base_path()), device="cpu", compute_type="int8", local_files_only=True)
    out = {}
    for path in paths:
        pieces, info = model.transcribe(str(media / path), beam_size=5, vad_filter=True)
        out[path] = (info.language, " ".join(p.text.strip() for p in pieces))
    return out


def lid_speed(files: dict[str, dict], media: Path) -> float:
    """Seconds of audio per second of language ID per core, on the corpus's VAD segments."""
    from asr_assets.lid import SpokenLanguageId
    from asr_assets.real_speech import _decode

    clips = []
    for path, rec in files.items():
        audio = _decode(media / path)
        clips += [audio[int(s["start"] * SAMPLE_RATE) : int(s["end"] * SAMPLE_RATE)] for s in rec.get("segments") or []]
    lid = SpokenLanguageId()
    started = time.process_time()
    lid.detect(clips)
    cpu = time.process_time() - started
    return sum(c.shape[0] for c in clips) / SAMPLE_RATE / max(cpu, 1e-9)


def sweep(cache: Path) -> dict:
    """Language ID accuracy and seconds of audio per CPU-second against the shortest input (``MIN_FRAMES``), on 40
    real prompts in each of four languages, one replica."""
    import asr_assets.lid as lid_module

    clips, truth = [], []
    for lang in REAL_LANGUAGES:
        for u in select(asterisk_utterances(cache, lang), 45)[:40]:
            clips.append(u.audio)
            truth.append(lang)
    out = {}
    for frames in (300, 500, 1000, 3000):
        lid_module.MIN_FRAMES = frames
        lid = lid_module.SpokenLanguageId(workers=1)
        started = time.process_time()
        found = lid.detect(clips)
        cpu = time.process_time() - started
        out[frames] = {
            "accuracy": round(sum(d.language == t for d, t in zip(found, truth, strict=True)) / len(truth), 4),
            "x_realtime_per_core": round(sum(c.shape[0] for c in clips) / SAMPLE_RATE / cpu, 1),
        }
    return {"prompts": len(clips), "min_frames": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-language", type=int, default=15, help="real prompts per language as files")
    parser.add_argument("--work", type=Path, default=Path("data/bench-lid"))
    parser.add_argument("--cache", type=Path, default=Path("data/cache-debs"))
    parser.add_argument("--sweep", action="store_true", help="only the LID input-length sweep")
    args = parser.parse_args()
    if args.sweep:
        print(json.dumps(sweep(args.cache.resolve())))
        return
    work = args.work.resolve()
    media = work / "corpus" / "media"
    synthetic = generate_multilingual_corpus(work / "corpus")
    turns = [json.loads(line) for line in (work / "corpus" / "turns.jsonl").read_text().splitlines()]
    records, real_turns = real_files(media, args.cache.resolve(), args.per_language)
    records += [r for r in synthetic if r.get("language")]
    turns += real_turns
    mixed = sorted({t["path"] for t in turns})
    references = {r["path"]: (r["language"], r["text"]) for r in records}
    for path in mixed:  # the mixed files' references: their turns' texts in order
        texts = [t for t in turns if t["path"] == path]
        references[path] = ("mixed", " ".join(t["text"] for t in texts))

    started = time.perf_counter()
    run_ours(media, work, {"ASR_LANGUAGE": "auto"}, {})
    seconds = time.perf_counter() - started
    files = file_records(work / "out", media)
    texts, _, copies = our_texts(work / "out", media)
    peer = run_peer(media, sorted(references))

    single = [p for p, (lang, _) in references.items() if lang != "mixed"]

    def file_accuracy(paths: list[str], ours: bool) -> float:
        right = sum(
            (majority((files.get(p) or {}).get("segments") or []) if ours else peer[p][0]) == references[p][0]
            for p in paths
        )
        return round(right / max(len(paths), 1), 4)

    real = [p for p in single if p.startswith("real-")]
    espeak = [p for p in single if not p.startswith("real-")]
    by_language: dict[str, dict] = {}
    for path in single:
        lang, ref = references[path]
        entry = by_language.setdefault(lang, {"metric": error_metric(lang), "files": 0, "e": 0, "pe": 0, "n": 0})
        e, n = label_errors(ref, texts.get(path, ""), lang)
        pe, _ = label_errors(ref, peer[path][1], lang)
        entry["files"] += 1
        entry["e"], entry["pe"], entry["n"] = entry["e"] + e, entry["pe"] + pe, entry["n"] + n
    wer_by_language = {
        lang: {
            "metric": v["metric"],
            "files": v["files"],
            "ours": round(v["e"] / v["n"], 4),
            "peer": round(v["pe"] / v["n"], 4),
        }
        for lang, v in sorted(by_language.items())
    }
    mixed_errors = [label_errors(references[p][1], texts.get(p, ""), "en") for p in mixed]
    peer_mixed = [label_errors(references[p][1], peer[p][1], "en") for p in mixed]
    real_mixed = sorted({t["path"] for t in real_turns})
    real_errors = [label_errors(references[p][1], texts.get(p, ""), "en") for p in real_mixed]
    peer_real = [label_errors(references[p][1], peer[p][1], "en") for p in real_mixed]

    def rate(errors: list[tuple[int, int]]) -> float:
        return round(sum(e for e, _ in errors) / max(sum(n for _, n in errors), 1), 4)

    print(
        json.dumps(
            {
                "files": len(references),
                "audio_s": round(sum(r.get("duration_s") or 0 for r in files.values()), 1),
                "lid_accuracy": file_accuracy(single, True),
                "peer_lid_accuracy": file_accuracy(single, False),
                "lid_accuracy_real": file_accuracy(real, True),
                "peer_lid_accuracy_real": file_accuracy(real, False),
                "lid_accuracy_espeak": file_accuracy(espeak, True),
                "peer_lid_accuracy_espeak": file_accuracy(espeak, False),
                "turn_lid_accuracy": round(turn_accuracy(turns, files), 4),
                "turn_lid_accuracy_real": round(turn_accuracy(real_turns, files), 4),
                "turn_lid_accuracy_espeak": round(turn_accuracy([t for t in turns if t not in real_turns], files), 4),
                "turns": len(turns),
                # Files holding a segment the dedup index skipped before the teacher as a copy (no label of ours).
                "copy_files_skipped": sorted(copies),
                "x_realtime_per_core": round(lid_speed(files, media), 1),
                "wer_by_language": wer_by_language,
                # Every label before filtering; the espeak file's misheard turns (Mandarin, German) dominate it.
                "mixed_files_wer": {"ours": rate(mixed_errors), "peer": rate(peer_mixed)},
                "mixed_files_wer_real": {"ours": rate(real_errors), "peer": rate(peer_real)},
                "seconds": round(seconds, 1),
                "cores": len(os.sched_getaffinity(0)),
            },
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
