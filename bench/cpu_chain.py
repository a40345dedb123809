"""CPU chain benchmark: audio_wav -> vad_segments -> segment_features on one generated shard.

Reports hours of audio per hour per core for the whole chain (CPU seconds of the step process and its workers), and
peak memory for a shard of 100 items against one of 1000 (each size in a fresh process; peak = the step process's
peak RSS plus the largest worker's). The last line printed is one JSON object:
``{"x_realtime_per_core": .., "rss_ratio_1000_vs_100": ..}``.

    .venv/bin/python bench/cpu_chain.py [--small 100] [--large 1000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from asr_assets.sample_corpus import generate_corpus


def run_chain(media: str, out: str, workers: int) -> dict:
    """Runs the three stages on shard-00000 of a 1-shard dataset; called in a fresh process."""
    import time

    from asr_assets.stages import DecodeSettings, PoolSettings, build_index, decode_shard, features_shard, vad_shard
    from asr_assets.stages import PackSettings as AudioPackSettings
    from asr_assets.vad import VadParams, silero_model_path
    from resources.storage import LocalStore

    source, store, shard = LocalStore(Path(media)), LocalStore(Path(out)), "shard-00000"
    pool = PoolSettings(workers=workers, timeout_s=600)
    start = time.perf_counter()
    build_index(source, store, shard, 1)
    decoded = decode_shard(source, store, shard, DecodeSettings(1 << 40, 1e9), pool)
    vad_shard(store, shard, VadParams(), silero_model_path(), pool)
    features = features_shard(store, shard, AudioPackSettings(), pool)
    wall = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "items": decoded.processed,
        "audio_s": decoded.audio_s,
        "segments": features.processed,
        "wall_s": wall,
        "cpu_s": own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime,
        "peak_rss_mb": (own.ru_maxrss + kids.ru_maxrss) / 1024,
    }


def measure(corpus_dir: Path, items: int, workers: int, tmp: Path) -> dict:
    files = sorted(p for p in (corpus_dir / "media").rglob("*") if p.is_file())
    media = tmp / f"media-{items}"
    media.mkdir()
    for i in range(items):  # hard links: distinct objects (uris) with real content, no extra disk
        src = files[i % len(files)]
        os.link(src, media / f"{i:05d}{src.suffix}")
    code = (
        "import json, sys; sys.path.insert(0, 'bench'); from cpu_chain import run_chain; "
        f"print(json.dumps(run_chain({str(media)!r}, {str(tmp / f'out-{items}')!r}, {workers})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        generate_corpus(tmp / "corpus", num_files=21, include_broken=False)
        small = measure(tmp / "corpus", args.small, args.workers, tmp)
        large = measure(tmp / "corpus", args.large, args.workers, tmp)
    for name, r in (("small", small), ("large", large)):
        print(
            f"{name}: {r['items']} items, {r['audio_s'] / 3600:.2f} h audio, {r['segments']} segments, "
            f"{r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} CPU s, peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    print(
        json.dumps(
            {
                "x_realtime_per_core": round(large["audio_s"] / large["cpu_s"], 1),
                "rss_ratio_1000_vs_100": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
