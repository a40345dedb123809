"""Long-file benchmark: peak memory of the CPU chain on one 10-minute file against one 10-hour file.

The chain (media_index -> audio_wav -> vad_segments -> segment_features) runs on a one-file shard in a fresh process
per file; a sampler reads the resident memory of that process and every process under it (the pool workers) from
/proc four times a second and keeps the peak of the sum. VAD and segment_features stream the decoded audio, so the
ratio should stay near 1 (goal: <= 1.3). The files are espeak-ng sentences with pauses over a faint noise floor, tiled
with ffmpeg to length, and cached as 16 kHz FLAC under data/bench/long-file/. The last line printed is one JSON object:
``{"rss_ratio_10h_vs_10min", "peak_rss_mb_10min", "peak_rss_mb_10h", "x_realtime_per_core"}`` (the long run's hours
in the key names; x_realtime_per_core for the long run: audio seconds per CPU second of the chain's processes).

    .venv/bin/python bench/long_file.py [--hours 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from asr_assets.sample_corpus import SENTENCES, VOICES

CACHE = Path(__file__).resolve().parent.parent / "data" / "bench" / "long-file"
SHORT_S = 600.0
SR = 16_000


def run_chain(media: str, out: str, workers: int, mel_bins: int) -> dict:
    """Runs the four stages on shard-00000 of a 1-shard dataset; called in a fresh process."""
    from asr_assets.stages import DecodeSettings, PoolSettings, build_index, decode_shard, features_shard, vad_shard
    from asr_assets.stages import PackSettings as AudioPackSettings
    from asr_assets.vad import VadParams, silero_model_path
    from resources.storage import LocalStore

    source, store, shard = LocalStore(Path(media)), LocalStore(Path(out)), "shard-00000"
    pool = PoolSettings(workers=workers, timeout_s=6 * 3600)  # one file is one task: hours of audio per task
    start = time.perf_counter()
    build_index(source, store, shard, 1)
    decoded = decode_shard(source, store, shard, DecodeSettings(1 << 40, 1e9), pool)
    vad_shard(store, shard, VadParams(), silero_model_path(), pool)
    features = features_shard(store, shard, AudioPackSettings(), pool, mel_bins=mel_bins)
    wall = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "items": decoded.processed,
        "audio_s": decoded.audio_s,
        "segments": features.processed,
        "speech_s": features.audio_s,
        "wall_s": wall,
        "cpu_s": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
        "max_process_rss_mb": max(own.ru_maxrss, kids.ru_maxrss) / 1024,
    }


def _speech_base(folder: Path) -> Path:
    """About a minute of espeak-ng sentences (voices and speeds varied) with 0.2-2.5 s pauses over a -60 dBFS noise
    floor, at 16 kHz."""
    base = folder / "base.flac"
    if base.exists():
        return base
    rng = np.random.default_rng(0)
    pieces = []
    for k, sentence in enumerate(SENTENCES[:16]):
        wav = folder / "sentence.wav"
        speed = str(140 + 15 * (k % 4))
        subprocess.run(["espeak-ng", "-v", VOICES[k % len(VOICES)], "-s", speed, "-w", str(wav), sentence], check=True)
        audio, rate = sf.read(wav, dtype="float32")
        pieces += [np.zeros(int(rng.uniform(0.2, 2.5) * rate), np.float32), audio]
    audio = np.concatenate(pieces)
    audio += rng.normal(0, 1e-3, audio.shape[0]).astype(np.float32)
    sf.write(folder / "base.wav", np.clip(audio, -1, 1), rate, subtype="PCM_16")
    _ffmpeg("-i", folder / "base.wav", "-ar", str(SR), "-ac", "1", "-c:a", "flac", base)
    (folder / "base.wav").unlink()
    wav.unlink()
    return base


def _ffmpeg(*args: object) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", *map(str, args)], check=True)


def long_file(seconds: float) -> Path:
    """The cached test file of ``seconds``: the base minute tiled to length (built on first use)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    media = CACHE / f"media-{seconds:g}s"
    path = media / "long.flac"
    if not path.exists():
        media.mkdir(exist_ok=True)
        tmp = media / ".long.flac.part"
        base = _speech_base(CACHE)
        _ffmpeg("-stream_loop", "-1", "-i", base, "-t", f"{seconds:g}", "-c:a", "flac", "-f", "flac", tmp)
        tmp.rename(path)
    return path


def _rss_of_tree(root: int, page: int = os.sysconf("SC_PAGE_SIZE")) -> int:
    """Resident bytes of ``root`` and all its descendants (from /proc; processes that vanish meanwhile count 0)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
        todo += children.get(pid, [])
    return total


def measure(path: Path, workers: int, mel_bins: int) -> dict:
    """Runs the chain on the one file in a fresh process, sampling its process tree's memory meanwhile."""
    out = CACHE / f"run-{path.parent.name}"
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "import json, sys; sys.path.insert(0, 'bench'); from long_file import run_chain; "
        f"print(json.dumps(run_chain({str(path.parent)!r}, {str(out)!r}, {workers}, {mel_bins})))"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.25):
            peak = max(peak, _rss_of_tree(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    stop.set()
    sampler.join()
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode:
        raise RuntimeError(f"the chain failed on {path} (exit code {proc.returncode})")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss_mb": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=10.0, help="length of the long file (the short one: 10 min)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mel-bins", type=int, default=0, choices=(0, 80, 128))
    args = parser.parse_args()
    long_label = f"{args.hours:g}h"
    results = {}
    for label, seconds in (("10min", SHORT_S), (long_label, args.hours * 3600)):
        r = results[label] = measure(long_file(seconds), args.workers, args.mel_bins)
        print(
            f"{label}: {r['audio_s'] / 3600:.2f} h audio, {r['segments']} segments ({r['speech_s'] / 3600:.2f} h), "
            f"{r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} CPU s, peak RSS of the process tree {r['peak_rss_mb']:.0f} MB "
            f"(largest single process {r['max_process_rss_mb']:.0f} MB)",
            flush=True,
        )
    short, long = results["10min"], results[long_label]
    print(
        json.dumps(
            {
                f"rss_ratio_{long_label}_vs_10min": round(long["peak_rss_mb"] / short["peak_rss_mb"], 3),
                "peak_rss_mb_10min": round(short["peak_rss_mb"], 1),
                f"peak_rss_mb_{long_label}": round(long["peak_rss_mb"], 1),
                "x_realtime_per_core": round(long["audio_s"] / long["cpu_s"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
