"""Fault drills: a run killed with SIGKILL in the middle of audio_wav and of transcripts, re-run, ends identical to an
uninterrupted run; a full disk fails the step with a clear message and publishes nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf

import resources.storage
from asr_assets import dedup, layout
from asr_assets.checks import reconcile_audio, reconcile_distilled, reconcile_transcripts
from asr_assets.sample_corpus import Corpus
from asr_assets.stages import read_transcripts
from resources.storage import LocalStore
from resources.teachers import DEFAULT_SECOND_OPINION
from tests.conftest import materialize_shard
from tests.dagster_processes import ROOT

VOLATILE = {"seconds", "time"}  # wall-clock columns: when and how long, never what


def _materialize(
    env: dict[str, str], home: Path, select: str, shard: str, config: dict | None = None
) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    argv = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "asr_assets.definitions"]
    argv += ["--select", select, "--partition", shard]
    if config:
        argv += ["--config-json", json.dumps(config)]
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **env, "DAGSTER_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches the pool workers too
    )


def _run(env: dict[str, str], home: Path, select: str, shard: str, config: dict | None = None) -> None:
    proc = _materialize(env, home, select, shard, config)
    assert proc.wait(timeout=600) == 0, f"dagster asset materialize {select} {shard} failed"


def _kill_when(proc: subprocess.Popen, ready, timeout_s: float = 300) -> None:
    """SIGKILLs the run's whole process group as soon as ``ready()`` holds (polled every 20 ms)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, "the run finished before the drill could kill it"
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _labelled(part: Path) -> bool:
    """Whether a transcripts part holds a label from the teacher (not only segments skipped as known copies)."""
    reasons = pq.read_table(part, columns=["finish_reason"]).column("finish_reason").to_pylist()
    return any(not (reason or "").startswith(dedup.SKIPPED_FINISH) for reason in reasons)


def _table(path: Path, key: str) -> list[dict]:
    table = pq.read_table(path)
    table = table.drop_columns([c for c in table.column_names if c in VOLATILE])
    return sorted(table.to_pylist(), key=lambda r: r[key])


def _visible_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts[-8:])]


def _leftover_temp(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp") if ".scratch" not in p.parts]


@pytest.fixture(scope="module")
def long_media(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten 2-3 minute files in five containers: decoding them takes seconds, long enough to be killed midway."""
    folder = tmp_path_factory.mktemp("long") / "media"
    folder.mkdir()
    sources = [i for i in corpus.items if not i.broken]
    for n in range(10):
        src = corpus.media_dir / sources[n % len(sources)].path
        ext = ["mp3", "m4a", "flac", "ogg", "wav"][n % 5]
        subprocess.run(
            [
                "ffmpeg",
                "-v",
                "error",
                "-stream_loop",
                str(10 + n),
                "-i",
                str(src),
                "-ac",
                "1",
                str(folder / f"long-{n}.{ext}"),
            ],
            check=True,
        )
    shutil.copy(corpus.media_dir / "broken_text.flac", folder / "broken_text.flac")
    return folder


def test_sigkill_in_the_middle_of_audio_wav_then_rerun_matches_an_uninterrupted_run(
    long_media: Path, tmp_path: Path
) -> None:
    # One shard holds every file; one worker makes decoding sequential and long enough to stop halfway.
    base = {"ASR_SOURCE_URI": str(long_media), "ASR_NUM_SHARDS": "1", "ASR_CACHE_DIR": str(tmp_path / "cache")}
    config = {"ops": {"audio_wav": {"config": {"workers": 1}}}}
    select, shard = "media_index,audio_wav", "shard-00000"
    clean, drill = tmp_path / "clean", tmp_path / "drill"
    _run({**base, "ASR_OUTPUT_ROOT": str(clean)}, tmp_path / "home-clean", select, shard, config)

    proc = _materialize({**base, "ASR_OUTPUT_ROOT": str(drill)}, tmp_path / "home-drill", select, shard, config)
    decoded = drill / "audio_wav" / shard
    _kill_when(proc, lambda: decoded.is_dir() and len(list(decoded.glob("*.flac"))) >= 3)
    manifest = drill / layout.audio_manifest_key(shard)
    assert not manifest.exists() or pq.read_table(manifest).num_rows < 11, "the kill did not land mid-stage"

    _run({**base, "ASR_OUTPUT_ROOT": str(drill)}, tmp_path / "home-drill", select, shard, config)
    assert reconcile_audio(LocalStore(drill), shard).passed
    assert _table(manifest, "media_id") == _table(clean / layout.audio_manifest_key(shard), "media_id")
    assert _table(drill / layout.dead_letter_key("audio_wav", shard), "item_id") == _table(
        clean / layout.dead_letter_key("audio_wav", shard), "item_id"
    )
    flacs = sorted(p.name for p in decoded.glob("*.flac"))
    assert flacs == sorted(p.name for p in (clean / "audio_wav" / shard).glob("*.flac")) and len(flacs) == 10
    for name in flacs:
        assert (decoded / name).read_bytes() == (clean / "audio_wav" / shard / name).read_bytes()
    assert not [p for p in _visible_files(drill) if p.name.endswith(".tmp")]
    assert not _leftover_temp(drill)


def test_sigkill_in_the_middle_of_transcripts_then_rerun_matches_an_uninterrupted_run(
    pipeline_run, corpus: Corpus, tmp_path: Path
) -> None:
    _, clean, shard = pipeline_run
    drill = tmp_path / "drill"
    env = {
        "ASR_SOURCE_URI": str(corpus.media_dir),
        "ASR_OUTPUT_ROOT": str(drill),
        "ASR_CACHE_DIR": str(tmp_path / "c"),
        # As in the reference run: a second opinion on every label (written in the same checkpoint part).
        "ASR_SECOND_OPINION": DEFAULT_SECOND_OPINION,
    }
    home = tmp_path / "home"
    # One teacher window per wave (several segments share one: the faster-whisper teacher packs them): every window
    # is its own checkpoint part, so the kill lands between two of them.
    dnsmos = {"segment_features": {"config": {"dnsmos_fraction": 1.0}}}
    proc = _materialize(env, home, "group:asr", shard, {"ops": {"transcripts": {"config": {"wave_size": 1}}, **dnsmos}})
    parts = drill / "transcripts" / shard
    # Segments the dedup index knows as copies are written as one part of skip rows before the teacher starts: the
    # kill waits for a part of the teacher's labels.
    _kill_when(proc, lambda: parts.is_dir() and any(_labelled(p) for p in parts.glob("part-*.parquet")))
    total = pq.read_table(clean / layout.features_key(shard)).num_rows
    written = sorted(parts.glob("part-*.parquet"), key=lambda p: p.stat().st_mtime_ns)
    first = next(k for k, part in enumerate(written) if _labelled(part))
    if read_transcripts(LocalStore(drill), shard).num_rows == total and len(written) > first + 1:
        # A shard of a few windows can be labelled before the kill lands; a part is the commit, so removing the
        # later ones leaves exactly what a kill right after the first labelled part would have left.
        for part in written[first + 1 :]:
            part.unlink()
    assert 2 <= read_transcripts(LocalStore(drill), shard).num_rows < total, "the kill did not land mid-stage"
    assert not (drill / layout.distilled_manifest_key(shard)).exists()

    _run(env, home, "group:asr", shard, {"ops": dnsmos})
    store, reference = LocalStore(drill), LocalStore(clean)
    assert reconcile_transcripts(store, shard).passed and reconcile_distilled(store, shard).passed
    ours = sorted(read_transcripts(store, shard).to_pylist(), key=lambda r: r["segment_id"])
    theirs = sorted(read_transcripts(reference, shard).to_pylist(), key=lambda r: r["segment_id"])
    assert len(ours) == total  # no duplicates, no gaps
    assert ours == theirs
    assert _table(drill / layout.distilled_manifest_key(shard), "key") == _table(
        clean / layout.distilled_manifest_key(shard), "key"
    )
    build = layout.current_build(store, shard)
    assert build == layout.current_build(reference, shard)  # same inputs and settings: the same build
    tars = sorted((drill / "distilled" / shard / build).glob("*.tar"))
    assert tars and [t.read_bytes() for t in tars] == [
        t.read_bytes() for t in sorted((clean / "distilled" / shard / build).glob("*.tar"))
    ]
    assert not _leftover_temp(drill)


@pytest.fixture
def small_disk(pipeline_run, tmp_path: Path):
    """A disk with room for half of what the shard's uninterrupted run wrote, so it fills up partway whatever the shard
    holds: a tmpfs of that size (a real full disk: the kernel says ENOSPC to every writer, pool workers included) or,
    where mounting is not allowed (no root, no CAP_SYS_ADMIN), a write hook that refuses writes past that budget with
    ENOSPC, as a full disk would."""
    _, clean, _ = pipeline_run
    room = sum(p.stat().st_size for p in clean.rglob("*") if p.is_file() and ".scratch" not in p.parts) // 2
    mount = tmp_path / "disk"
    mount.mkdir()
    size = f"size={max(64, room // 1024)}k"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode == 0:
        print(f"full disk: a tmpfs of {size}")
        yield mount, lambda: None
        subprocess.run(["umount", "-l", str(mount)], check=False)
        return
    budget = {"bytes": room}
    put_file, put_bytes = resources.storage.LocalStore.put_file, resources.storage.LocalStore.put_bytes

    def spend(store, key: str, size: int) -> None:
        budget["bytes"] -= size
        if budget["bytes"] < 0:
            raise store._full(key) from OSError(errno.ENOSPC, "No space left on device")

    def limited_file(self, key: str, src: Path) -> None:
        try:
            spend(self, key, Path(src).stat().st_size)
        except OSError:
            Path(src).unlink(missing_ok=True)
            raise
        put_file(self, key, src)

    def limited_bytes(self, key: str, data: bytes) -> None:
        spend(self, key, len(data))
        put_bytes(self, key, data)

    def release() -> None:
        resources.storage.LocalStore.put_file, resources.storage.LocalStore.put_bytes = put_file, put_bytes

    print(f"full disk: a write hook (mount refused: {mounted.stderr.decode(errors='replace').strip()})")
    resources.storage.LocalStore.put_file, resources.storage.LocalStore.put_bytes = limited_file, limited_bytes
    try:
        yield mount, release
    finally:
        release()


def test_a_full_disk_fails_the_step_clearly_and_publishes_nothing_half_written(
    small_disk, pipeline_run, corpus: Corpus, busiest_shard: str, tmp_path: Path
) -> None:
    from dagster import DagsterEventType

    small_disk, release = small_disk
    result = materialize_shard(corpus, small_disk, busiest_shard, raise_on_error=False)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE]
    assert len(failures) == 1
    message = failures[0].step_failure_data.error.message + str(failures[0].step_failure_data.error.cause or "")
    assert "no space left" in message.lower() and busiest_shard in message, message
    # The full disk is the machine's failure, not the files': nothing was dead-lettered for it. Whatever was
    # dead-lettered is exactly what the uninterrupted run dead-lettered, for the same reasons.
    _, clean, _ = pipeline_run
    for stage in layout.STAGES:
        dead = small_disk / layout.dead_letter_key(stage, busiest_shard)
        if dead.exists():
            ours = {r["item_id"]: r["error_class"] for r in pq.read_table(dead).to_pylist()}
            theirs = {
                r["item_id"]: r["error_class"] for r in pq.read_table(clean / dead.relative_to(small_disk)).to_pylist()
            }
            assert ours.items() <= theirs.items(), (stage, ours, theirs)
    # Whatever is visible is whole: every Parquet file reads, every FLAC decodes, no temp names.
    for path in _visible_files(small_disk):
        assert not path.name.endswith(".tmp")
        if path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".flac":
            sf.read(path)
    # With space again (the same files on a larger disk), re-running the partition finishes the job.
    bigger = tmp_path / "bigger"
    shutil.copytree(small_disk, bigger, ignore=shutil.ignore_patterns(".scratch"))
    release()
    assert materialize_shard(corpus, bigger, busiest_shard).success
    for reconcile in (reconcile_audio, reconcile_transcripts, reconcile_distilled):
        assert reconcile(LocalStore(bigger), busiest_shard).passed
