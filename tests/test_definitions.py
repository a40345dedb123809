"""The code location loads: one Definitions, six partitioned assets, their checks, the job; the webserver shows them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from asr_assets.definitions import defs
from partitions import shard_of, shard_partitions
from tests.dagster_processes import DagsterProcesses

ASSETS = {"media_index", "audio_wav", "vad_segments", "segment_features", "transcripts", "distilled_dataset"}
REPORT = "distillation_report"
REPORTS = {REPORT, "threshold_card"}  # unpartitioned, over every shard
DEDUP = {"audio_fingerprints", "eval_sets"}  # unpartitioned too: one fingerprint index over every shard
ROOT = Path(__file__).resolve().parents[1]


def test_defs_load_and_every_job_resolves() -> None:
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == ASSETS | REPORTS | DEDUP
    for key in graph.get_all_asset_keys():
        expected = None if key.to_user_string() in REPORTS | DEDUP else shard_partitions
        assert graph.get(key).partitions_def == expected
    assert {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys} == {
        ("media_index", "ids_unique"),
        *((a, "counts_reconcile") for a in ASSETS - {"media_index"}),
    }
    for job in defs.jobs or []:
        defs.resolve_job_def(job.name)
    assert defs.resolve_job_def("distill_job")


def test_partitions_are_four_shards_and_hashing_is_stable() -> None:
    assert shard_partitions.get_partition_keys() == [f"shard-0000{i}" for i in range(4)]
    # Stable across processes (Python's own str hash is salted per process; blake2b is not).
    uris = [f"file:///data/{i}.wav" for i in range(20)]
    code = f"from partitions import shard_of; print([shard_of(u, 4) for u in {uris!r}])"
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    assert other.stdout.strip() == str([shard_of(u, 4) for u in uris])
    shards = {shard_of(f"file:///data/{i}.wav", 4) for i in range(200)}
    assert shards == set(shard_partitions.get_partition_keys())


def test_default_install_has_no_torch() -> None:
    code = "import importlib.util as u; print(u.find_spec('torch') is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_webserver_loads_the_workspace_and_shows_assets_and_partitions(tmp_path: Path) -> None:
    servers = DagsterProcesses(tmp_path / "home", {})
    servers.start("webserver")
    try:
        servers.wait_ready()
        query = "{ assetNodes { assetKey { path } groupName partitionKeys } }"
        deadline = time.monotonic() + 60
        while True:
            data = servers.query(query)
            nodes = data.get("assetNodes") or []
            if nodes or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert {"/".join(n["assetKey"]["path"]) for n in nodes} == ASSETS | REPORTS | DEDUP, data
        for node in nodes:
            if node["assetKey"]["path"][0] in REPORTS:
                assert node["groupName"] == "reports" and node["partitionKeys"] == []
            elif node["assetKey"]["path"][0] in DEDUP:
                assert node["groupName"] == "dedup" and node["partitionKeys"] == []
            else:
                assert node["groupName"] == "asr"
                assert node["partitionKeys"] == shard_partitions.get_partition_keys()
    finally:
        servers.stop("webserver", group=True)
