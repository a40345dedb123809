"""Operating it as users do, with the real processes: a UI-style partition backfill through the webserver's GraphQL API
run by the daemon (restarted midway), the arrival sensor switched on through GraphQL, and `make ui`'s launcher."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import dagster as dg
import pytest

from asr_assets import layout
from asr_assets.checks import (
    reconcile_audio,
    reconcile_distilled,
    reconcile_features,
    reconcile_transcripts,
    reconcile_vad,
)
from asr_assets.sample_corpus import Corpus
from partitions import NUM_SHARDS, shard_of
from resources.storage import LocalStore
from tests.dagster_processes import BACKFILL_STATUS, LAUNCH_BACKFILL, LOCATION, ROOT, DagsterProcesses, free_port

ASSETS = ["media_index", "audio_wav", "vad_segments", "segment_features", "transcripts", "distilled_dataset"]
RECONCILE = [reconcile_audio, reconcile_vad, reconcile_features, reconcile_transcripts, reconcile_distilled]
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}

RUNS = """
query($key: String!, $value: String!) {
  runsOrError(filter: {tags: [{key: $key, value: $value}]}) {
    ... on Runs { results { runId status tags { key value } } }
  }
}"""
START_SENSOR = """
mutation($selector: SensorSelector!) {
  startSensor(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { status } }
    ... on PythonError { message }
  }
}"""
SENSOR_TICKS = """
query($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    ... on Sensor { sensorState { status ticks(limit: 20) { status cursor runIds } } }
  }
}"""


def _runs(servers: DagsterProcesses, key: str, value: str) -> list[dict]:
    return servers.query(RUNS, {"key": key, "value": value})["runsOrError"]["results"]


def _wait(what: str, check, servers: DagsterProcesses, timeout_s: float, every_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        for name, proc in servers.procs.items():
            assert proc.poll() is None, f"{name} exited while waiting for {what}:\n{servers.log(name)}"
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}:\n" + servers.log(
            "daemon"
        )
        time.sleep(every_s)


def _tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["tags"] if t["key"] == key), None)


def test_ui_backfill_survives_a_daemon_restart_and_the_sensor_runs_only_new_files(
    corpus: Corpus, tmp_path: Path, monkeypatch
) -> None:
    # The watched folder holds the files of the two shards with the most speech, so that the backfill of those two
    # partitions covers everything in it and the sensor has nothing to do until new files arrive.
    watched = tmp_path / "watched"
    store = LocalStore(watched)
    good = Counter(shard_of(store.uri_of(i.path), NUM_SHARDS) for i in corpus.items if not i.broken)
    shards = sorted(s for s, _ in good.most_common(2))
    for item in corpus.items:
        if shard_of(store.uri_of(item.path), NUM_SHARDS) in shards:
            (watched / item.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(corpus.media_dir / item.path, watched / item.path)
    out = tmp_path / "out"
    env = {
        "ASR_SOURCE_URI": str(watched),
        "ASR_OUTPUT_ROOT": str(out),
        "ASR_CACHE_DIR": str(tmp_path / "cache"),
        "ASR_SENSOR_INTERVAL_S": "5",
    }

    with DagsterProcesses(tmp_path / "home", env) as servers:
        servers.wait_ready()
        # What the UI's "Materialize all" over selected partitions sends: an asset backfill of the whole graph.
        launched = servers.query(
            LAUNCH_BACKFILL,
            {"params": {"assetSelection": [{"path": [a]} for a in ASSETS], "partitionNames": shards}},
        )["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill = launched["backfillId"]

        # The daemon is restarted while the backfill is under way (a run of it has been launched).
        _wait("the backfill's first run", lambda: _runs(servers, "dagster/backfill", backfill), servers, 180)
        servers.stop("daemon", signal.SIGTERM)
        time.sleep(2)
        servers.start("daemon")

        def finished() -> str | None:
            status = servers.query(BACKFILL_STATUS, {"id": backfill})["partitionBackfillOrError"]
            return status["status"] if status["status"] not in ("REQUESTED",) else None

        status = _wait("the backfill to finish", finished, servers, 600)
        runs = _runs(servers, "dagster/backfill", backfill)
        assert status == "COMPLETED_SUCCESS", (status, runs, servers.log("daemon"))
        assert runs and all(r["status"] == "SUCCESS" for r in runs), runs
        output = LocalStore(out)
        for shard in shards:
            for reconcile in RECONCILE:
                assert reconcile(output, shard).passed, (reconcile.__name__, shard)
            assert output.exists(layout.distilled_manifest_key(shard))

        # The arrival sensor, switched on as the UI's toggle does.
        selector = {**LOCATION, "sensorName": "media_arrivals"}
        started = servers.query(START_SENSOR, {"selector": selector})["startSensor"]
        assert started["__typename"] == "Sensor" and started["sensorState"]["status"] == "RUNNING", started

        def ticks() -> list[dict]:
            return servers.query(SENSOR_TICKS, {"selector": selector})["sensorOrError"]["sensorState"]["ticks"]

        _wait("the sensor's first tick", lambda: [t for t in ticks() if t["status"] != "STARTED"], servers, 120)
        assert not _runs(servers, "dagster/sensor_name", "media_arrivals")  # everything was indexed already

        # New files arrive; names sort after every existing key, as new uploads under a date prefix would.
        arrivals = {"zz-arrival-1.wav": "en_000_wav.wav", "zz-arrival-2.mp3": "en_001_mp3.mp3"}
        for new, old in arrivals.items():
            shutil.copy(corpus.media_dir / old, watched / f".{new}.part")
            os.replace(watched / f".{new}.part", watched / new)  # appears whole, as an object-store upload does
        new_shards = Counter(shard_of(store.uri_of(name), NUM_SHARDS) for name in arrivals)

        def sensor_runs_done() -> list[dict] | None:
            runs = [r for t in ticks() for r in t["runIds"]]
            if len(runs) < len(new_shards):
                return None
            details = [r for r in _runs(servers, "dagster/sensor_name", "media_arrivals")]
            return details if details and all(r["status"] in TERMINAL for r in details) else None

        sensor_runs = _wait("the sensor's runs", sensor_runs_done, servers, 420)
        assert all(r["status"] == "SUCCESS" for r in sensor_runs), sensor_runs
        assert sorted(_tag(r, "dagster/partition") for r in sensor_runs) == sorted(new_shards)

    # Each sensor run decoded exactly the files that arrived in its shard, nothing already done.
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))  # dagster.yaml reads it
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        for run in sensor_runs:
            shard = _tag(run, "dagster/partition")
            events = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("audio_wav"), asset_partitions=[shard]), limit=10
            ).records
            mine = [e for e in events if e.run_id == run["runId"]]
            assert len(mine) == 1
            assert mine[0].asset_materialization.metadata["media_processed"].value == new_shards[shard]
    output = LocalStore(out)
    for shard in new_shards:
        for reconcile in RECONCILE:
            assert reconcile(output, shard).passed, (reconcile.__name__, shard)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_make_ui_launcher_stops_everything_even_when_started_in_the_background(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    port, metrics_port = free_port(), free_port()

    def ignore_sigint() -> None:  # what a non-interactive shell does to a job it starts with `&`
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    launcher = subprocess.Popen(
        [sys.executable, "-m", "asr_assets.ui", "--port", str(port), "--metrics-port", str(metrics_port)],
        cwd=ROOT,
        env={**os.environ, "DAGSTER_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ignore_sigint,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2)
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)
                break
            except OSError:
                assert launcher.poll() is None, launcher.stdout.read()
                assert time.monotonic() < deadline, "make ui did not come up in 120 s"
                time.sleep(0.5)
        children = _descendants(launcher.pid)
        assert len(children) >= 3  # webserver, daemon, exporter (and the servers' own children)
        launcher.send_signal(stop_signal)
        output, _ = launcher.communicate(timeout=60)
        assert launcher.returncode == 0, output
        assert "stopped" in output
        time.sleep(1)
        assert not [pid for pid in children if _alive(pid)], f"processes left behind after {stop_signal.name}"
    finally:
        if launcher.poll() is None:
            launcher.kill()


def _descendants(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == parent:
                    found.append(int(entry.name))
                    frontier.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
