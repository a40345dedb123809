"""Index benchmark: the ``media_index`` asset's own path on a folder of real files, and the sharded Parquet index of
N synthetic object keys, as the listing of a large bucket.

The asset's path: ``--files`` small files with crawl-like keys in nested folders, indexed for one shard of
``ASR_NUM_SHARDS`` (default 4, as for the asset) the way the asset's body does it (``layout.step_output`` with its lease
and sweeps, then ``build_index``: the store's listing, the shard's new rows, the index read back for the totals), into a
fresh output root each time, and again over the same root (nothing new: the re-materialization a sensor tick or a rerun
pays). Baseline in the same run: the store's listing alone (``LocalStore.list`` consumed). ``--repeat`` passes, the
three alternating which goes first; wall seconds, min and median, and the ratios to the listing.

Then ``index_objects`` (the code the asset, the sensor and the rescan use) is fed a stream of ``--rows`` synthetic
objects into a fresh output folder once, timed in wall seconds, with the process's peak RSS. The last line printed is
one JSON object: ``{"asset": {..}, "rows": .., "seconds": .., "peak_rss_mb": ..}``.

    .venv/bin/python bench/index.py [--files 20000] [--repeat 5] [--rows 1000000] [--shards 1000]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

from asr_assets import layout
from asr_assets.stages import build_index, index_objects
from partitions import NUM_SHARDS, shard_key
from resources.storage import LocalStore, ObjectInfo, StorageResource


def synthetic(rows: int):
    for i in range(rows):
        yield ObjectInfo(
            f"crawl/2026-11/{i % 997:03d}/{i:010d}-segment audio.mp3", 1_000_000 + i % 5_000_000, 1.7e9 + i
        )


def make_files(root: Path, count: int) -> None:
    for i in range(count):
        path = root / f"crawl/2026-11/{i % 97:03d}/{i:08d}-segment audio.mp3"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(i.to_bytes(8, "little"))  # content is not read by the index


def asset_path(media: Path, out_root: Path) -> int:
    """What the ``media_index`` asset's body runs for shard 0 (without Dagster's metadata and metrics)."""
    storage = StorageResource(source_uri=str(media), output_root=str(out_root))
    with layout.step_output(storage, "media_index", shard_key(0)) as out:
        return build_index(storage.source(), out, shard_key(0), NUM_SHARDS).totals["media"]


def time_asset(tmp: Path, files: int, repeat: int) -> dict:
    """Listing alone, the asset on a fresh root, the asset again on that root: alternating, ``repeat`` passes."""
    media = tmp / "media"
    make_files(media, files)
    store = LocalStore(media)
    seconds: dict[str, list[float]] = {"listing": [], "fresh": [], "rerun": []}
    shard_rows = 0
    for r in range(repeat):
        root = tmp / f"asset-out-{r}"
        runs = {
            "listing": lambda: sum(1 for _ in store.list()),
            "fresh": lambda root=root: asset_path(media, root),
            "rerun": lambda root=root: asset_path(media, root),
        }
        # fresh must precede rerun on its root; the listing goes first, in the middle or last
        order = [["listing", "fresh", "rerun"], ["fresh", "listing", "rerun"], ["fresh", "rerun", "listing"]][r % 3]
        for name in order:
            started = time.perf_counter()
            result = runs[name]()
            seconds[name].append(time.perf_counter() - started)
            if name == "listing":
                assert result == files, (result, files)
            else:
                shard_rows = result
    listing = statistics.median(seconds["listing"])
    return {
        "files": files,
        "shards": NUM_SHARDS,
        "shard_rows": shard_rows,
        **{
            f"{name}_s": {"min": round(min(values), 3), "median": round(statistics.median(values), 3)}
            for name, values in seconds.items()
        },
        "fresh_vs_listing_median": round(statistics.median(seconds["fresh"]) / listing, 2),
        "rerun_vs_listing_median": round(statistics.median(seconds["rerun"]) / listing, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000, help="files in the folder the asset lists")
    parser.add_argument("--repeat", type=int, default=5, help="passes of the asset's path")
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic objects for index_objects")
    parser.add_argument("--shards", type=int, default=1000, help="shards of the synthetic index")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asset = time_asset(Path(tmp), args.files, args.repeat)
    print(
        f"asset path, {args.files} files, {NUM_SHARDS} shards: listing {asset['listing_s']} s, "
        f"fresh {asset['fresh_s']} s, rerun {asset['rerun_s']} s ({asset['shard_rows']} rows in the shard)"
    )
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
        f"re-listing {min(args.rows, 1_000_000)} known objects took {recheck:.1f} s and added nothing"
    )
    print(
        json.dumps(
            {
                "asset": asset,
                "rows": sum(added.values()),
                "seconds": round(seconds, 1),
                "peak_rss_mb": round(peak_mb),
            }
        )
    )


if __name__ == "__main__":
    main()
