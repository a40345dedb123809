"""Index benchmark: build the sharded Parquet index of N synthetic object keys, as the listing of a large bucket.

Feeds ``index_objects`` (the code the asset, the sensor and the rescan use) a stream of N objects with crawl-like
keys, into a fresh output folder, and reports wall time and the process's peak RSS. The last line printed is one JSON
object: ``{"rows": .., "seconds": .., "peak_rss_mb": ..}``.

    .venv/bin/python bench/index.py --rows 10000000 [--shards 1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from asr_assets.stages import index_objects
from resources.storage import LocalStore, ObjectInfo


def synthetic(rows: int):
    for i in range(rows):
        yield ObjectInfo(
            f"crawl/2026-11/{i % 997:03d}/{i:010d}-segment audio.mp3", 1_000_000 + i % 5_000_000, 1.7e9 + i
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shards", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = LocalStore(Path(tmp) / "source")
        (Path(tmp) / "source").mkdir()
        out = LocalStore(Path(tmp) / "out")
        started = time.perf_counter()
        added = index_objects(source, out, synthetic(args.rows), args.shards)
        seconds = time.perf_counter() - started
        parts = sum(1 for _ in (Path(tmp) / "out" / "index").glob("*/*.parquet"))
        size_mb = sum(p.stat().st_size for p in (Path(tmp) / "out" / "index").glob("*/*.parquet")) / 2**20
        again = time.perf_counter()
        assert index_objects(source, out, synthetic(min(args.rows, 1_000_000)), args.shards) == {}
        recheck = time.perf_counter() - again
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{sum(added.values())} rows in {len(added)} shards, {parts} parts, {size_mb:.0f} MB of Parquet; "
        f"re-listing 1M known objects took {recheck:.1f} s and added nothing"
    )
    print(json.dumps({"rows": sum(added.values()), "seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb)}))


if __name__ == "__main__":
    main()
