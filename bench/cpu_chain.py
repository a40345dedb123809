"""CPU chain benchmark: media_index -> audio_wav -> vad_segments -> segment_features on one generated shard.

The input is one sample corpus of distinct files (``generate_corpus``: each file its own espeak-ng sentences, voice,
speed, pauses and noise seed, cycling through the seven containers), not copies of a few: the small shard is its
first ``--small`` files (copied), the large shard all ``--large``. Each shard runs in a fresh process with
``--workers`` pool workers. Reported per shard: hours of audio per hour per core (CPU seconds of the step process and
its workers), and memory sampled from /proc every 0.1 s while it runs: the peak of the summed VmRSS of the step
process and all its descendants (the pool's workers, respawned ones included), the same for the workers alone, and the
sum of every process's own VmHWM (each process's peak, whenever it happened: an upper bound on the tree's peak, loose
since each stage starts its own workers), and the VmHWM of the step process and of the largest worker. A process
that lives less than one sampling interval is missed. The
last line printed is one JSON object: ``{"x_realtime_per_core", "peak_rss_mb_small", "peak_rss_mb_large",
"rss_ratio_large_vs_small", ...}``.

    .venv/bin/python bench/cpu_chain.py [--small 50] [--large 200] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from asr_assets.sample_corpus import generate_corpus


def run_chain(media: str, out: str, workers: int) -> dict:
    """Runs the four stages on shard-00000 of a 1-shard dataset; called in a fresh process."""
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
    }


def _status_kb(pid: int) -> tuple[int, int] | None:
    """VmRSS and VmHWM of a process in kB (None when it is gone). VmHWM is the process's own peak: ru_maxrss of a
    spawned worker would carry over the peak of the process it was forked from before exec."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


class TreeSampler:
    """Samples the memory of a process and its descendants on a thread until stopped."""

    def __init__(self, root: int, every_s: float = 0.1) -> None:
        self.root, self.every_s = root, every_s
        self.peak_tree_kb = self.peak_workers_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            tree = workers = 0
            for pid in [self.root, *_descendants(self.root)]:
                status = _status_kb(pid)
                if status is None:
                    continue
                tree += status[0]
                workers += status[0] if pid != self.root else 0
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), status[1])
            self.peak_tree_kb = max(self.peak_tree_kb, tree)
            self.peak_workers_kb = max(self.peak_workers_kb, workers)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(media: Path, workers: int, out: Path) -> dict:
    """Runs the chain over ``media`` in a fresh process, sampling its process tree's memory meanwhile."""
    code = (
        "import json, sys; sys.path.insert(0, 'bench'); from cpu_chain import run_chain; "
        f"print(json.dumps(run_chain({str(media)!r}, {str(out)!r}, {workers})))"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True)
    sampler = TreeSampler(proc.pid)
    stdout, _ = proc.communicate()
    sampler.stop()
    if proc.returncode:
        raise RuntimeError(f"the chain failed on {media} (exit code {proc.returncode})")
    return {
        **json.loads(stdout.strip().splitlines()[-1]),
        "peak_rss_mb": sampler.peak_tree_kb / 1024,
        "peak_workers_rss_mb": sampler.peak_workers_kb / 1024,
        "sum_hwm_mb": sum(sampler.hwm_kb.values()) / 1024,
        "step_hwm_mb": sampler.hwm_kb.get(proc.pid, 0) / 1024,
        "largest_worker_hwm_mb": max((kb for pid, kb in sampler.hwm_kb.items() if pid != proc.pid), default=0) / 1024,
        "processes": len(sampler.hwm_kb),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=50, help="distinct files in the small shard")
    parser.add_argument("--large", type=int, default=200, help="distinct files in the large shard")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        corpus = generate_corpus(tmp / "corpus", num_files=args.large, include_broken=False)
        digests = {hashlib.sha256((corpus.media_dir / item.path).read_bytes()).digest() for item in corpus.items}
        assert len(digests) == args.large, f"only {len(digests)} distinct files of {args.large}"
        small_media = tmp / "media-small"
        for item in corpus.items[: args.small]:
            (small_media / item.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(corpus.media_dir / item.path, small_media / item.path)  # a real copy, not a link
        small = measure(small_media, args.workers, tmp / "out-small")
        large = measure(corpus.media_dir, args.workers, tmp / "out-large")
    for name, r in (("small", small), ("large", large)):
        print(
            f"{name}: {r['items']} items, {r['audio_s'] / 3600:.2f} h audio, {r['segments']} segments, "
            f"{r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} CPU s, peak RSS of the tree {r['peak_rss_mb']:.0f} MB "
            f"(workers {r['peak_workers_rss_mb']:.0f} MB; sum of {r['processes']} processes' VmHWM "
            f"{r['sum_hwm_mb']:.0f} MB; VmHWM of the step process {r['step_hwm_mb']:.0f} MB, of the largest worker "
            f"{r['largest_worker_hwm_mb']:.0f} MB)"
        )
    print(
        json.dumps(
            {
                "items": [small["items"], large["items"]],
                "x_realtime_per_core": round(large["audio_s"] / large["cpu_s"], 1),
                "peak_rss_mb_small": round(small["peak_rss_mb"]),
                "peak_rss_mb_large": round(large["peak_rss_mb"]),
                "rss_ratio_large_vs_small": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
                "peak_workers_rss_mb": [round(small["peak_workers_rss_mb"]), round(large["peak_workers_rss_mb"])],
                "sum_hwm_mb": [round(small["sum_hwm_mb"]), round(large["sum_hwm_mb"])],
                "step_hwm_mb": [round(small["step_hwm_mb"]), round(large["step_hwm_mb"])],
                "largest_worker_hwm_mb": [round(small["largest_worker_hwm_mb"]), round(large["largest_worker_hwm_mb"])],
            }
        )
    )


if __name__ == "__main__":
    main()
