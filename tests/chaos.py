"""Chaos drills on the sample corpus: random SIGKILLs, concurrent runs, arrivals during a run; one JSON line.

Every drill runs the real `dagster asset materialize` CLI over one shard (``ASR_NUM_SHARDS=1``: the whole corpus in
one partition) and compares the final outputs with an uninterrupted run from the same source folder (uris, and so
ids, are the same):

- kills: per seed, a run is SIGKILLed (its whole process group, pool workers included) at random moments, several
  times, then run to completion;
- concurrent: two runs of the same shard started together (each step's lease makes one wait for the other);
- arrivals: a run starts on part of the corpus, the rest arrives midway and is indexed the way the arrivals sensor
  does it (``index_objects``) while the run decodes (so its checks see rows the step never saw), then the shard is
  run again.

"Identical" means: every table (index, decode manifest, VAD, features, transcripts, dead letters of every stage,
dataset manifest, decisions) equal row for row once sorted by id and stripped of wall-clock columns and of where a
segment sits in a packed part (that follows worker completion order), the per-file transcripts equal, and every tar
byte for byte. ``make chaos`` runs the full form; ``tests/test_chaos.py`` a light one inside ``make test``.

Usage: python -m tests.chaos [--seeds 4] [--kills 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from resources.storage import pid_alive

ROOT = Path(__file__).resolve().parents[1]
SHARD = "shard-00000"
# Wall-clock columns (when and how long) and packing positions (worker completion order): never what was decided.
VOLATILE = {"seconds", "time", "discovered_at", "audio_key", "audio_offset", "mel_key"}
# The column that is unique in each table (dead letters: item_id, one row per failed item and stage).
ID_COLUMNS = {
    "index": "media_id",
    "audio_wav": "media_id",
    "vad_media": "media_id",
    "segments": "segment_id",
    "features": "segment_id",
    "transcripts": "segment_id",
    "manifest": "key",
    "decisions": "segment_id",
}


def _not_final(table: pa.Table) -> int:
    """Dead letters that are not an item's last word (transient kinds, suspect ones with attempts left): items the
    drills left pending, which a clean run never has."""
    from asr_assets import failures

    rows = table.select(["error_class", "attempt"]).to_pylist()
    return sum(not failures.is_final(r["error_class"], r["attempt"] or 1) for r in rows)


@dataclass
class Drill:
    """What the drills did and found."""

    kills: int = 0
    concurrent_runs: int = 0
    arrival_drills: int = 0
    arrivals_mid_decode: int = 0  # arrival drills whose files were indexed while the run was in audio_wav
    stages_hit: Counter = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    duplicates: int = 0
    transient_dead_letters: int = 0
    failed_runs: int = 0

    def line(self) -> dict:
        return {
            "kills": self.kills,
            "stages_hit": dict(sorted(self.stages_hit.items())),
            "concurrent_runs": self.concurrent_runs,
            "arrival_drills": self.arrival_drills,
            "arrivals_mid_decode": self.arrivals_mid_decode,
            "identical": not self.mismatches,
            "duplicates": self.duplicates,
            "transient_dead_letters": self.transient_dead_letters,
            "failed_runs": self.failed_runs,
            "mismatches": self.mismatches[:10],
        }


class Runner:
    """Launches CLI runs of the per-shard assets with a fixed environment."""

    def __init__(self, source: Path, work: Path, extra_env: dict[str, str] | None = None) -> None:
        self.source, self.work = source, work
        self.env = {
            **os.environ,
            "ASR_SOURCE_URI": str(source),
            "ASR_NUM_SHARDS": "1",
            "ASR_SECOND_OPINION": "off",
            "ASR_LEASE_WAIT_S": "900",
            "ASR_CACHE_DIR": str(work / "cache"),
            "HF_HUB_OFFLINE": "1",
            **(extra_env or {}),
        }

    def start(self, out: Path, tag: str) -> subprocess.Popen:
        home = self.work / "homes" / f"{out.name}-{tag}"
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
        argv = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "asr_assets.definitions"]
        argv += ["--select", "group:asr", "--partition", SHARD]
        env = {
            **self.env,
            "ASR_OUTPUT_ROOT": str(out),
            "ASR_CACHE_DIR": str(self.work / "cache"),
            "DAGSTER_HOME": str(home),
        }
        log = open(home / "run.log", "wb")  # noqa: SIM115 - closed with the process by the caller's wait
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, out: Path, tag: str, timeout_s: float = 1800) -> int:
        proc = self.start(out, tag)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9


def _stage_now(out: Path) -> str:
    """The step a run is in: the asset whose lease on the shard is held (not released) right now."""
    for folder in sorted((out / "leases" / SHARD).glob("*")):
        records = sorted(folder.glob("*.json"))
        try:
            record = json.loads(records[-1].read_text()) if records else None
        except (OSError, ValueError):  # a record being replaced this very moment
            continue
        # Held by a live process: a killed run leaves its record unreleased until the next run takes it over.
        if record is not None and not record["released"] and pid_alive(record["pid"]):
            return folder.name
    return "between steps"


def _kill_after(proc: subprocess.Popen, delay_s: float, out: Path) -> str | None:
    """SIGKILLs the run's process group after ``delay_s`` and returns the stage it was in; None when the run had
    already ended."""
    deadline = time.monotonic() + delay_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    stage = _stage_now(out)
    if proc.poll() is not None:
        return None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return stage


# ----------------------------------------------------------------------------------------------------- comparison


def _tables(out: Path) -> dict[str, pa.Table]:
    """Every table of the shard, read the way the pipeline reads it."""
    from asr_assets import layout
    from asr_assets.records import AUDIO_SCHEMA, FEATURE_SCHEMA, SEGMENT_SCHEMA, VAD_MEDIA_SCHEMA
    from asr_assets.stages import read_transcripts
    from resources.storage import LocalStore, read_table

    store = LocalStore(out)
    tables = {
        "index": layout.read_index(store, SHARD),
        "audio_wav": read_table(store, layout.audio_manifest_key(SHARD), AUDIO_SCHEMA),
        "vad_media": read_table(store, layout.vad_media_key(SHARD), VAD_MEDIA_SCHEMA),
        "segments": read_table(store, layout.segments_key(SHARD), SEGMENT_SCHEMA),
        "features": read_table(store, layout.features_key(SHARD), FEATURE_SCHEMA),
        "transcripts": read_transcripts(store, SHARD),
    }
    for stage in layout.STAGES:
        tables[f"dead_letter/{stage}"] = layout.read_dead_letters(store, stage, SHARD)
    build = layout.current_build(store, SHARD)
    for name, key in (
        ("manifest", layout.distilled_manifest_key(SHARD)),
        ("decisions", layout.decisions_key(SHARD, build) if build else None),
    ):
        path = _committed(out, key)
        tables[name] = pq.read_table(path) if path is not None else pa.table({})
    return tables


def _committed(out: Path, key: str | None) -> Path | None:
    """The file of a committed dataset output (None before the first build)."""
    if key is None:
        return None
    path = out / key
    return path if path.is_file() else None


def _build(out: Path) -> str | None:
    from asr_assets import layout
    from resources.storage import LocalStore

    return layout.current_build(LocalStore(out), SHARD)


def _rows(table: pa.Table) -> list[dict]:
    keep = [c for c in table.column_names if c not in VOLATILE]
    rows = table.select(keep).to_pylist()
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def _tars(out: Path) -> list[tuple[str, bytes]]:
    """The current build's tars, by the manifest's tar keys (older builds kept for readers do not count)."""
    tables = _tables(out)
    manifest = tables["manifest"]
    keys = sorted(set(manifest["tar_key"].to_pylist())) if "tar_key" in manifest.column_names else []
    return [(key, (out / key).read_bytes()) for key in keys]


def compare(reference: Path, drill: Path, label: str, report: Drill, labels: bool = True) -> None:
    """Records every difference between the drill's outputs and the reference's, and counts duplicate ids. With
    ``labels=False`` only which items exist and where they went is compared, not the labels' text and scores: the
    teacher packs several segments into one window, so a segment labelled before other files arrived was labelled
    beside other neighbours than in a run that had every file from the start."""
    ours, theirs = _tables(drill), _tables(reference)
    for name in theirs:
        id_column = ID_COLUMNS.get(name, "item_id")
        if not labels and name == "manifest":
            same = True  # which labels pass the filters depends on the labels: the decisions table covers every item
        elif not labels and id_column in theirs[name].column_names:
            same = sorted(ours[name][id_column].to_pylist()) == sorted(theirs[name][id_column].to_pylist())
        else:
            same = _rows(ours[name]) == _rows(theirs[name])
        if not same:
            report.mismatches.append(f"{label}: {name} differs ({ours[name].num_rows} vs {theirs[name].num_rows} rows)")
        id_column = ID_COLUMNS.get(name, "item_id")
        if id_column in ours[name].column_names:
            counts = Counter(ours[name][id_column].to_pylist())
            report.duplicates += sum(n - 1 for n in counts.values() if n > 1)
    for name, table in ours.items():
        if name.startswith("dead_letter/"):
            report.transient_dead_letters += _not_final(table)
    if [k for k, _ in _tars(drill)] != [k for k, _ in _tars(reference)] or (
        labels and _tars(drill) != _tars(reference)
    ):
        report.mismatches.append(f"{label}: tars differ")
    from asr_assets import layout

    files = [
        _committed(root, layout.files_key(SHARD, build) if build else None)
        for root, build in ((drill, _build(drill)), (reference, _build(reference)))
    ]
    a, b = files
    if labels and (a.read_bytes() if a else b"") != (b.read_bytes() if b else b""):
        report.mismatches.append(f"{label}: per-file transcripts differ")


# ------------------------------------------------------------------------------------------------------------ drills


STAGES = ("media_index", "audio_wav", "vad_segments", "segment_features", "transcripts", "distilled_dataset")


def _kill_in_stage(proc: subprocess.Popen, out: Path, stage: str, rng: random.Random) -> str | None:
    """SIGKILLs the run at a random moment inside ``stage`` (a short random delay once its lease is held) and returns
    the stage it was in; None when the run ended first (the stage had nothing left to do, or was over in a blink)."""
    while proc.poll() is None and _stage_now(out) != stage:
        time.sleep(0.01)
    return _kill_after(proc, rng.uniform(0.0, 0.1), out)


def kill_drill(runner: Runner, reference: Path, clean_s: float, seed: int, kills: int, report: Drill) -> None:
    """Kills a run ``kills`` times (seeded), then runs it to completion and compares. The first kill lands inside the
    seed's stage (seed 0: media_index ... seed 5: distilled_dataset; the first run of a seed has work in every stage);
    the others at a moment uniform over the clean run's length (start-up, between steps and the commit alike), on a
    run that resumes what the killed ones left."""
    rng = random.Random(seed)
    out = runner.work / f"kill-{seed}"
    for n in range(kills):
        proc = runner.start(out, f"k{n}")
        if n == 0:
            stage = _kill_in_stage(proc, out, STAGES[seed % len(STAGES)], rng)
        else:
            stage = _kill_after(proc, rng.uniform(1.0, max(2.0, clean_s)), out)
        if stage is not None:
            report.kills += 1
            report.stages_hit[stage] += 1
        else:
            proc.wait()
    if runner.run(out, "final") != 0:
        report.failed_runs += 1
        report.mismatches.append(f"kill seed {seed}: the final run failed (see {runner.work}/homes)")
        return
    compare(reference, out, f"kill seed {seed}", report)


def concurrent_drill(runner: Runner, reference: Path, report: Drill) -> None:
    """Two runs of the same shard started together; both must succeed and the outputs match the reference."""
    out = runner.work / "concurrent"
    procs = [runner.start(out, f"c{n}") for n in range(2)]
    codes = [p.wait(timeout=1800) for p in procs]
    report.concurrent_runs += 2
    if any(codes):
        report.failed_runs += sum(1 for c in codes if c)
        report.mismatches.append(f"concurrent: exit codes {codes}")
    compare(reference, out, "concurrent", report)


def arrivals_drill(runner: Runner, reference: Path, clean_s: float, report: Drill) -> None:
    """Half the corpus is held back; it arrives while a run works on the shard and is indexed as the sensor does."""
    from asr_assets.stages import index_objects
    from resources.storage import LocalStore

    out = runner.work / "arrivals"
    held = runner.work / "held-back"
    held.mkdir(exist_ok=True)
    files = sorted(p for p in runner.source.rglob("*") if p.is_file())
    late = files[1::2]
    for path in late:
        dest = held / path.relative_to(runner.source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)  # a rename keeps size and mtime: the same object versions as the reference saw
    proc = runner.start(out, "a0")
    # They arrive while the run decodes: the index then holds rows the decode step never saw when its check runs
    # (a CI run that hit this window by chance failed that check). Timed, should the step pass unseen.
    deadline = time.monotonic() + max(1.0, clean_s)
    while _stage_now(out) != "audio_wav" and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    mid_decode = _stage_now(out) == "audio_wav"
    for path in late:
        os.replace(held / path.relative_to(runner.source), path)
    source = LocalStore(runner.source)
    index_objects(source, LocalStore(out), source.list(), 1)  # what the arrivals sensor does on its tick
    report.arrivals_mid_decode += mid_decode
    code = proc.wait(timeout=1800)
    report.arrival_drills += 1
    if code != 0 or runner.run(out, "a1") != 0:
        report.failed_runs += 1
        report.mismatches.append("arrivals: a run failed")
        return
    compare(reference, out, "arrivals", report, labels=False)


def run_chaos(work: Path, seeds: int, kills: int, concurrent: bool = True, arrivals: bool = True) -> dict:
    """Builds the corpus, the reference run and every drill under ``work``; returns the JSON line as a dict."""
    from asr_assets.sample_corpus import generate_corpus

    corpus = generate_corpus(work / "corpus", seed=0, num_files=7)
    runner = Runner(corpus.media_dir, work)
    reference = work / "reference"
    started = time.monotonic()
    if runner.run(reference, "ref") != 0:
        raise RuntimeError(f"the reference run failed; see {work}/homes/reference-ref/run.log")
    clean_s = time.monotonic() - started
    report = Drill()
    for seed in range(seeds):
        kill_drill(runner, reference, clean_s, seed, kills, report)
    if concurrent:
        concurrent_drill(runner, reference, report)
    if arrivals:
        arrivals_drill(runner, reference, clean_s, report)
    line = report.line()
    line["clean_run_s"] = round(clean_s, 1)
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=6, help="kill drills, one output root each (6: every stage)")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs per seed before the final run")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="asr-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        line = run_chaos(work, args.seeds, args.kills)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(line))
    sys.exit(0 if line["identical"] and not line["duplicates"] and not line["transient_dead_letters"] else 1)


if __name__ == "__main__":
    main()
