"""Prometheus metrics: a partition materialized by the Dagster CLI with metrics on, then /metrics scraped from the
exporter `make ui` starts, and the numbers compared with what the stages recorded."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from prometheus_client.parser import text_string_to_metric_families

from asr_assets import layout
from asr_assets.sample_corpus import Corpus
from asr_assets.stages import read_transcripts
from resources.storage import LocalStore
from tests.dagster_processes import ROOT, free_port

NAME = re.compile(r"^asr_[a-z][a-z0-9_]*$")


def _scrape(port: int, proc: subprocess.Popen) -> str:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                return response.read().decode()
        except OSError:
            assert proc.poll() is None, "the metrics exporter exited"
            assert time.monotonic() < deadline, "the metrics exporter did not answer"
            time.sleep(0.3)


def test_metrics_count_what_the_stages_did(corpus: Corpus, busiest_shard: str, tmp_path: Path) -> None:
    out, home, samples = tmp_path / "out", tmp_path / "home", tmp_path / "prometheus"
    home.mkdir()
    samples.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "ASR_SOURCE_URI": str(corpus.media_dir),
        "ASR_OUTPUT_ROOT": str(out),
        "PROMETHEUS_MULTIPROC_DIR": str(samples),
    }
    cli = Path(sys.executable).parent / "dagster"
    argv = [str(cli), "asset", "materialize", "-m", "asr_assets.definitions", "--select", "group:asr"]
    done = subprocess.run([*argv, "--partition", busiest_shard], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "asr_assets.metrics", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        text = _scrape(port, exporter)
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)

    values: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("asr_"):
            assert NAME.match(family.name), family.name
            assert family.documentation
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in values, f"no sample {name}{labels} in /metrics"
        return values[key]

    store = LocalStore(out)
    audio = pq.read_table(out / layout.audio_manifest_key(busiest_shard)).to_pylist()
    decoded = [r for r in audio if r["status"] == "decoded"]
    assert value("asr_items_processed_total", stage="audio_wav", outcome="succeeded") == len(decoded)
    assert value("asr_items_processed_total", stage="audio_wav", outcome="failed") == len(audio) - len(decoded)
    seconds = value("asr_audio_processed_seconds_total", stage="audio_wav")
    assert abs(seconds - sum(r["duration_s"] for r in decoded)) < 0.01
    dead = Counter(r["error_class"] for r in layout.read_dead_letters(store, "audio_wav", busiest_shard).to_pylist())
    for kind, count in dead.items():
        assert value("asr_errors_total", stage="audio_wav", kind=kind) == count
    labelled = read_transcripts(store, busiest_shard).num_rows
    assert labelled > 0
    assert value("asr_items_processed_total", stage="transcripts", outcome="succeeded") == labelled
    assert value("asr_queue_depth", stage="transcripts") == 0  # nothing left waiting once the step is done
    for stage in ("media_index", "vad_segments", "segment_features"):
        assert value("asr_items_processed_total", stage=stage, outcome="succeeded") > 0
