"""Screenshots of the Dagster UI for the README: the asset graph, and a partition backfill over two shards.

Starts dagster-webserver and dagster-daemon on the sample corpus (a throwaway DAGSTER_HOME and output root), launches
the backfill through the webserver's GraphQL API as the UI's Backfill button does, waits for it, and photographs the
pages with headless Chromium (Debian's `chromium`). Run it with `make screenshots`; it writes docs/*.png.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from partitions import shard_partitions
from tests.dagster_processes import BACKFILL_STATUS, LAUNCH_BACKFILL, ROOT, DagsterProcesses

ASSETS = ["media_index", "audio_wav", "vad_segments", "segment_features", "transcripts", "distilled_dataset"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--hide-scrollbars"]


def screenshot(chromium: str, url: str, png: Path, width: int = 1600, height: int = 1000) -> None:
    """One page, rendered with enough virtual time for the UI's JavaScript to fetch and draw."""
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--window-size={width},{height}",
            "--virtual-time-budget=20000",
            f"--screenshot={png}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    print(f"wrote {png} ({png.stat().st_size} bytes) from {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", type=Path, default=ROOT / "data/sample/media")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("chromium not found: `apt-get install chromium` (make screenshots does it)")
    work = Path(tempfile.mkdtemp(prefix="asr-screenshots-"))
    env = {"ASR_SOURCE_URI": str(args.media), "ASR_OUTPUT_ROOT": str(work / "out"), "ASR_CACHE_DIR": str(work / "c")}
    shards = shard_partitions.get_partition_keys()[:2]
    try:
        with DagsterProcesses(work / "home", env) as servers:
            servers.wait_ready()
            base = f"http://127.0.0.1:{servers.port}"
            time.sleep(5)  # the webserver loads the code location after it starts answering
            servers.query("mutation { setNuxSeen }")  # the first-visit "join the community" dialog, dismissed
            group = f"{base}/locations/asr_distill/asset-groups/asr"
            screenshot(chromium, group, args.out / "asset-graph.png")
            launched = servers.query(
                LAUNCH_BACKFILL,
                {"params": {"assetSelection": [{"path": [a]} for a in ASSETS], "partitionNames": shards}},
            )["launchPartitionBackfill"]
            if launched["__typename"] != "LaunchBackfillSuccess":
                raise SystemExit(f"the backfill was not launched: {launched}")
            backfill = launched["backfillId"]
            deadline = time.monotonic() + 900
            status = "REQUESTED"
            while status == "REQUESTED":
                if time.monotonic() > deadline:
                    raise SystemExit(f"backfill {backfill} did not finish in 15 minutes; no screenshot taken")
                time.sleep(3)
                status = servers.query(BACKFILL_STATUS, {"id": backfill})["partitionBackfillOrError"]["status"]
            print(f"backfill {backfill}: {status}")
            screenshot(chromium, f"{base}/runs/b/{backfill}", args.out / "backfill.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
