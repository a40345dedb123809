"""One writer per output: the (shard, asset) lease, create-if-absent on both stores, per-run scratch, durable renames,
the per-partition run limit, and two CLI runs of one shard started together ending identical to a single run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import oss2
import pyarrow.parquet as pq
import pytest
import yaml

import resources.storage
from asr_assets import layout, lease
from asr_assets.sample_corpus import Corpus
from asr_assets.stages import index_objects, read_transcripts
from resources.storage import LocalStore, OssSettings, OssStore, RetryPolicy
from tests.conftest import materialize_shard
from tests.dagster_processes import ROOT
from tests.oss_server import OssServer

KEY_ID, SECRET, BUCKET = "LTAI5tLeaseKeyId", "Lease-Secret-Value-7", "lease-bucket"
SHARD = "shard-00001"

# A process that takes a lease and keeps it until its stdin closes; prints what happened.
HOLDER = """
import sys
from pathlib import Path
from asr_assets import lease
from resources.storage import LocalStore
root, shard, asset, run_id, go = sys.argv[1:6]
store = LocalStore(Path(root))
print("ready", flush=True)
while go and not Path(go).exists():
    pass
try:
    held = lease.take(store, shard, asset, run_id, wait=0)
except lease.LeaseHeld as exc:
    print("held", exc, flush=True)
    sys.exit(0)
print("won", held.generation, flush=True)
sys.stdin.read()
held.release()
"""


@pytest.fixture(autouse=True)
def _lease_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (lease.TTL_ENV, lease.WAIT_ENV, lease.INDEX_WAIT_ENV):
        monkeypatch.delenv(name, raising=False)


def _holder(root: Path, asset: str, run_id: str, go: Path | None = None, **env: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), SHARD, asset, run_id, str(go or "")],
        cwd=ROOT,
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def _records(root: Path, asset: str) -> dict[int, dict]:
    folder = root / "leases" / SHARD / asset
    return {int(p.stem): json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _write_record(store: LocalStore, asset: str, generation: int, **fields) -> None:
    now = datetime.now(UTC).isoformat()
    record = {
        "run_id": "other-run",
        "host": "elsewhere",
        "node": "0000000000000000",
        "pid": 1,
        "token": "t",
        "since": now,
        "heartbeat_at": now,
        "ttl_s": 300.0,
        "released": False,
    } | fields
    assert store.put_if_absent(f"leases/{SHARD}/{asset}/{generation:012d}.json", json.dumps(record).encode())


# ------------------------------------------------------------------------------------------------ put_if_absent


def test_put_if_absent_on_a_local_folder_has_exactly_one_winner(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert store.put_if_absent("a/b.json", b"first")
    assert not store.put_if_absent("a/b.json", b"second")
    assert store.read_bytes("a/b.json") == b"first"
    barrier, wins = threading.Barrier(16), []

    def race(n: int) -> None:
        barrier.wait()
        if store.put_if_absent("a/race.json", f"writer {n}".encode()):
            wins.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and store.read_bytes("a/race.json") == f"writer {wins[0]}".encode()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.json", "race.json"]  # no temporaries left


@pytest.fixture
def oss(tmp_path: Path):
    with OssServer(KEY_ID, SECRET, BUCKET) as server:
        settings = OssSettings(server.endpoint, KEY_ID, SECRET, tmp_path / "cache", 1 << 30, RetryPolicy(attempts=3))
        yield server, OssStore(BUCKET, "out", settings)


def test_put_if_absent_on_oss_refuses_an_existing_key_like_oss(oss) -> None:
    server, store = oss
    assert store.put_if_absent("a/b.json", b"first")
    assert not store.put_if_absent("a/b.json", b"second")
    assert server.objects["out/a/b.json"].data == b"first"
    store.put_bytes("a/b.json", b"overwritten")  # a plain put still replaces
    assert store.read_bytes("a/b.json") == b"overwritten"
    bucket = oss2.Bucket(oss2.Auth(KEY_ID, SECRET), server.endpoint, BUCKET)
    with pytest.raises(oss2.exceptions.ServerError) as refused:
        bucket.put_object("out/a/b.json", b"x", headers={"x-oss-forbid-overwrite": "true"})
    assert (refused.value.status, refused.value.code) == (409, "FileAlreadyExists")
    with pytest.raises(oss2.exceptions.InvalidArgument):
        bucket.put_object("out/a/c.json", b"x", headers={"x-oss-forbid-overwrite": "yes"})
    assert "out/a/c.json" not in server.objects
    # A multipart upload completing onto an existing key is refused alike.
    upload = bucket.init_multipart_upload("out/a/b.json").upload_id
    part = bucket.upload_part("out/a/b.json", upload, 1, b"parts")
    with pytest.raises(oss2.exceptions.ServerError):
        bucket.complete_multipart_upload(
            "out/a/b.json",
            upload,
            [oss2.models.PartInfo(1, part.etag)],
            headers={"x-oss-forbid-overwrite": "true"},
        )
    assert server.objects["out/a/b.json"].data == b"overwritten"

    barrier, wins = threading.Barrier(8), []

    def race(n: int) -> None:
        barrier.wait()
        if store.put_if_absent("a/race.json", f"writer {n}".encode()):
            wins.append(n)

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and server.objects["out/a/race.json"].data == f"writer {wins[0]}".encode()


# ------------------------------------------------------------------------------------------------------ leases


def test_a_held_lease_fails_fast_naming_its_holder_and_frees_on_release(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    holder = _holder(tmp_path, "audio_wav", "run-1234")
    assert holder.stdout.readline().split() == ["won", "1"]
    with pytest.raises(lease.LeaseHeld) as held:
        lease.take(store, SHARD, "audio_wav", "run-5678")
    message = str(held.value)
    for part in ("audio_wav on shard-00001", "run run-1234", socket.gethostname(), f"pid {holder.pid}", "since"):
        assert part in message, message
    assert "last heartbeat" in message and lease.WAIT_ENV in message and lease.TTL_ENV in message
    assert list(_records(tmp_path, "audio_wav")) == [1]  # the refused taker wrote nothing
    # Another asset of the same shard is another lease.
    with lease.hold(store, SHARD, "vad_segments", "run-5678") as other:
        assert other.generation == 1
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0
    assert _records(tmp_path, "audio_wav")[1]["released"]
    with lease.hold(store, SHARD, "audio_wav", "run-5678") as mine:
        assert mine.generation == 2
    records = _records(tmp_path, "audio_wav")
    assert records[2]["run_id"] == "run-5678" and records[2]["released"]


def test_waiting_takes_the_lease_once_its_holder_releases_it(tmp_path: Path) -> None:
    holder = _holder(tmp_path, "transcripts", "run-first")
    assert holder.stdout.readline().split() == ["won", "1"]
    threading.Timer(1.0, holder.stdin.close).start()
    with lease.hold(LocalStore(tmp_path), SHARD, "transcripts", "run-second", wait=120) as mine:
        assert mine.generation == 2
        assert holder.wait(timeout=60) == 0
    assert [r["run_id"] for r in _records(tmp_path, "transcripts").values()] == ["run-first", "run-second"]


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(tmp_path: Path) -> None:
    holder = _holder(tmp_path, "audio_wav", "run-killed")
    assert holder.stdout.readline().split() == ["won", "1"]
    os.kill(holder.pid, signal.SIGKILL)  # never releases
    holder.wait()
    assert not _records(tmp_path, "audio_wav")[1]["released"]
    with lease.hold(LocalStore(tmp_path), SHARD, "audio_wav", "run-next") as mine:
        assert mine.generation == 2
    # A record of this very process that it no longer holds (its release failed to reach the store) frees at once too.
    _write_record(LocalStore(tmp_path), "audio_wav", 3, node=lease._NODE, pid=os.getpid())
    with lease.hold(LocalStore(tmp_path), SHARD, "audio_wav", "run-next") as mine:
        assert mine.generation == 4


def test_another_machines_holder_blocks_until_its_heartbeat_expires(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    _write_record(store, "vad_segments", 1)  # fresh heartbeat, unknown machine: its pid says nothing here
    with pytest.raises(lease.LeaseHeld, match="run other-run on host elsewhere"):
        lease.take(store, SHARD, "vad_segments")
    stale = (datetime.now(UTC) - timedelta(seconds=301)).isoformat()
    _write_record(store, "vad_segments", 2, heartbeat_at=stale)
    _write_record(store, "vad_segments", 3, heartbeat_at=stale, ttl_s=600.0)  # its own ttl counts: still held
    with pytest.raises(lease.LeaseHeld):
        lease.take(store, SHARD, "vad_segments")
    _write_record(store, "vad_segments", 4, heartbeat_at=stale)
    with lease.hold(store, SHARD, "vad_segments") as mine:
        assert mine.generation == 5
    # Old generations are pruned: the highest and the one before it stay.
    assert list(_records(tmp_path, "vad_segments")) == [4, 5]


def test_racing_processes_for_one_generation_have_exactly_one_winner(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    stale = (datetime.now(UTC) - timedelta(seconds=3600)).isoformat()
    _write_record(store, "segment_features", 1, heartbeat_at=stale)  # expired: every racer sees generation 2 free
    go = tmp_path / "go"
    racers = [_holder(tmp_path, "segment_features", f"racer-{n}", go) for n in range(4)]
    go.touch()
    results = [r.stdout.readline().split() for r in racers]
    assert sorted(r[0] for r in results) == ["held", "held", "held", "won"], results
    assert [r for r in results if r[0] == "won"][0][1] == "2"
    for racer in racers:
        racer.stdin.close()
        assert racer.wait(timeout=60) == 0
    records = _records(tmp_path, "segment_features")
    assert list(records) == [1, 2] and records[2]["released"]


def test_lost_lease_stops_writes_and_is_left_to_its_new_holder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(lease.TTL_ENV, "1.5")  # heartbeats every 0.5 s
    store = LocalStore(tmp_path)
    held = lease.take(store, SHARD, "transcripts", "run-slow")
    out = lease.GuardedStore(store, held.check)
    out.put_bytes("transcripts/x.bin", b"while held")
    # Another run takes over (as after this process stalled past its ttl): the next heartbeat notices.
    _write_record(store, "transcripts", held.generation + 1, run_id="run-new")
    deadline = time.monotonic() + 30
    while True:
        try:
            held.check()
        except lease.LeaseLost as exc:
            assert "taken over by run run-new" in str(exc) and "transcripts on shard-00001" in str(exc)
            break
        assert time.monotonic() < deadline, "the heartbeat never noticed the takeover"
        time.sleep(0.1)
    with pytest.raises(lease.LeaseLost):
        out.put_bytes("transcripts/y.bin", b"after the takeover")
    assert not (tmp_path / "transcripts" / "y.bin").exists()
    new = _records(tmp_path, "transcripts")[held.generation + 1]
    held.release()
    assert _records(tmp_path, "transcripts")[held.generation + 1] == new  # the new holder's record is untouched
    assert not _records(tmp_path, "transcripts")[held.generation]["released"]


def test_a_lease_that_cannot_be_renewed_stops_writes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(lease.TTL_ENV, "1.5")
    broken = threading.Event()

    def storage_down() -> None:
        if broken.is_set():
            raise OSError("the output store is unreachable")

    store = lease.GuardedStore(LocalStore(tmp_path), storage_down)  # the heartbeat writes fail once it is set
    with lease.hold(store, SHARD, "audio_wav") as held:
        held.check()
        broken.set()
        deadline = time.monotonic() + 30
        with pytest.raises(lease.LeaseLost, match="could not be renewed"):
            while time.monotonic() < deadline:
                held.check()
                time.sleep(0.1)
        broken.clear()


def test_the_lease_is_reentrant_within_a_thread_but_another_thread_is_another_writer(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with lease.hold(store, SHARD, "media_index", "run-1") as outer:
        # A step calling code that takes the same lease (media_index -> index_objects) gets the same one back.
        with lease.hold(LocalStore(tmp_path), SHARD, "media_index", "run-1", wait=0) as inner:
            assert inner is outer
        # A sensor tick and a rescan on two threads of one code server are two writers: the second waits or fails.
        errors: list[BaseException] = []

        def other_thread() -> None:
            try:
                lease.take(LocalStore(tmp_path), SHARD, "media_index", "tick-2", wait=0.3).release()
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
        assert len(errors) == 1 and isinstance(errors[0], lease.LeaseHeld), errors
        assert not _records(tmp_path, "media_index")[1]["released"]
    assert _records(tmp_path, "media_index")[1]["released"]


def test_indexing_outside_a_step_waits_a_bounded_time_then_fails_clearly(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for n in range(40):
        (source / f"{n:03d}.wav").write_bytes(b"x")
    out_root = tmp_path / "out"
    src, out = LocalStore(source), LocalStore(out_root)
    holder = _holder(out_root, "media_index", "run-backfill")
    assert holder.stdout.readline().split() == ["won", "1"]
    with pytest.raises(lease.LeaseHeld, match="run run-backfill"):
        index_objects(src, out, src.list(), 4, lease_wait_s=0.5)
    assert not (out_root / "index").exists()  # the tick wrote nothing, to no shard
    holder.stdin.close()
    assert holder.wait(timeout=60) == 0
    assert sum(index_objects(src, out, src.list(), 4, lease_wait_s=0.5).values()) == 40
    for folder in (out_root / "leases").glob("*/media_index"):
        records = sorted(folder.glob("*.json"))
        assert json.loads(records[-1].read_text())["released"], folder


# -------------------------------------------------------------------------------------------- scratch and fsync


def test_scratch_is_private_to_each_store_and_swept_when_its_process_is_gone(tmp_path: Path) -> None:
    a, b = LocalStore(tmp_path), LocalStore(tmp_path)
    assert a.scratch_dir() != b.scratch_dir() and a.scratch_dir() == a.scratch_dir()
    assert a.scratch_dir().parent == tmp_path / ".scratch"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = a.scratch_dir().name.split("-")[0]
    stale = tmp_path / ".scratch" / f"{host}-{dead.stdout.strip()}-deadbeef"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "half.flac").write_bytes(b"half")
    elsewhere = tmp_path / ".scratch" / f"0badc0de-{dead.stdout.strip()}-deadbeef"  # another machine's: kept
    elsewhere.mkdir()
    assert b.sweep_stale_scratch() == 1
    assert not stale.exists() and elsewhere.exists() and a.scratch_dir().exists() and b.scratch_dir().exists()
    (a.scratch_dir() / "x").write_bytes(b"x")
    mine = a.scratch_dir()
    a.discard_scratch()
    assert not mine.exists() and b.scratch_dir().exists()


def test_local_publishes_sync_the_file_before_the_rename_and_the_folder_after(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(resources.storage.os, "fsync", fsync)
    store = LocalStore(tmp_path)
    src = store.scratch_dir() / "built.bin"
    src.write_bytes(b"built")  # not synced by its writer
    store.put_file("x/z.bin", src)
    assert len(synced) == 2 and Path(synced[0]).name.startswith(".z.bin.") and synced[1] == str(tmp_path / "x")
    synced.clear()
    assert store.put_if_absent("x/new.json", b"{}")
    assert len(synced) == 2 and Path(synced[0]).name.startswith(".new.json.") and synced[1] == str(tmp_path / "x")


# ------------------------------------------------------------------------------------------ per-partition runs


def test_one_run_per_partition_in_the_instance_and_the_helm_values(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # dagster.yaml reads it
    (tmp_path / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        queue = instance.get_concurrency_config().run_queue_config
    expected = [{"key": "dagster/partition", "limit": 1, "value": {"applyLimitPerUniqueValue": True}}]
    assert queue.tag_concurrency_limits == expected
    values = yaml.safe_load((ROOT / "deploy/helm/values.yaml").read_text())
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "QueuedRunCoordinator"
    assert coordinator["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"] == expected


# --------------------------------------------------------------------------- two CLI runs of one shard at once

VOLATILE = {"seconds", "time", "discovered_at"}  # when and how long, never what


def _materialize(
    env: dict[str, str], home: Path, select: str, shard: str, config: dict | None = None, capture: bool = False
) -> subprocess.Popen:
    """``dagster asset materialize`` in its own process (and instance), its output kept when ``capture``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())
    argv = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m", "asr_assets.definitions"]
    argv += ["--select", select, "--partition", shard]
    if config:
        argv += ["--config-json", json.dumps(config)]
    output = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **env, "DAGSTER_HOME": str(home)},
        stdout=output,
        stderr=subprocess.STDOUT if capture else subprocess.DEVNULL,
    )


def _rows(root: Path, key: str, sort_by: str) -> list[dict]:
    path = root / key
    if not path.exists():
        return []
    table = pq.read_table(path)
    table = table.drop_columns([c for c in table.column_names if c in VOLATILE])
    return sorted(table.to_pylist(), key=lambda r: r[sort_by])


def _outputs(root: Path, shard: str) -> dict:
    store = LocalStore(root)
    transcripts = read_transcripts(store, shard)
    build = layout.current_build(store, shard)
    index = layout.read_index(store, shard).drop_columns(["discovered_at"])
    outputs = {
        "index": sorted(index.to_pylist(), key=lambda r: r["media_id"]),
        "audio_wav": _rows(root, layout.audio_manifest_key(shard), "media_id"),
        "vad_media": _rows(root, layout.vad_media_key(shard), "media_id"),
        "segments": _rows(root, layout.segments_key(shard), "segment_id"),
        "features": _rows(root, layout.features_key(shard), "segment_id"),
        "transcripts": sorted(transcripts.to_pylist(), key=lambda r: r["segment_id"]),
        "distilled": _rows(root, layout.distilled_manifest_key(shard), "key"),
        "decisions": _rows(root, layout.decisions_key(shard, build), "segment_id"),
        "files": (root / layout.files_key(shard, build)).read_bytes(),
        "flacs": {p.name: p.read_bytes() for p in sorted((root / "audio_wav" / shard).glob("*.flac"))},
        "tars": [p.read_bytes() for p in sorted((root / "distilled" / shard / build).glob("*.tar"))],
    }
    for stage in layout.STAGES:
        outputs[f"dead_letter/{stage}"] = _rows(root, layout.dead_letter_key(stage, shard), "item_id")
    return outputs


def test_two_cli_runs_of_one_shard_at_once_end_identical_to_a_single_run(
    corpus: Corpus, busiest_shard: str, tmp_path: Path
) -> None:
    shard = busiest_shard
    # One worker per CPU stage: rows in one order in every run, so segments are packed (and their audio offsets
    # known) alike. The pool yields outcomes as they complete.
    config = {"ops": {op: {"config": {"workers": 1}} for op in ("audio_wav", "vad_segments", "segment_features")}}
    single = tmp_path / "single"
    assert materialize_shard(corpus, single, shard, config).success

    both = tmp_path / "both"
    env = {
        "ASR_SOURCE_URI": str(corpus.media_dir),
        "ASR_OUTPUT_ROOT": str(both),
        "ASR_CACHE_DIR": str(tmp_path / "cache"),
        lease.WAIT_ENV: "900",  # the later run waits for each step of the earlier one instead of failing
    }
    runs = [_materialize(env, tmp_path / f"home-{n}", "group:asr", shard, config) for n in range(2)]
    assert [run.wait(timeout=900) for run in runs] == [0, 0]

    ours, theirs = _outputs(both, shard), _outputs(single, shard)
    for name, value in theirs.items():
        assert ours[name] == value, name
    assert ours["tars"] and ours["transcripts"] and ours["dead_letter/audio_wav"]
    for name, column in (("index", "media_id"), ("features", "segment_id"), ("transcripts", "segment_id")):
        ids = [r[column] for r in ours[name]]
        assert len(ids) == len(set(ids)), f"duplicate ids in {name}"
    # Each run took every step's lease in turn (the one before the highest is kept) and released it; no scratch
    # folder is left behind.
    for asset in layout.FOLDERS:
        records = {
            int(p.stem): json.loads(p.read_text()) for p in sorted((both / "leases" / shard / asset).glob("*.json"))
        }
        assert list(records) == [1, 2] and all(r["released"] for r in records.values()), asset
        assert records[1]["run_id"] != records[2]["run_id"] and all(r["run_id"] for r in records.values())
    assert not list((both / ".scratch").glob("*"))

    # A third run while this process holds audio_wav's lease, failing fast: it names the holder, writes nothing.
    manifest = (both / layout.audio_manifest_key(shard)).read_bytes()
    with lease.hold(LocalStore(both), shard, "audio_wav", "run-holding-it"):
        run = _materialize({**env, lease.WAIT_ENV: "0"}, tmp_path / "home-3", "audio_wav", shard, capture=True)
        text = run.communicate(timeout=600)[0].decode(errors="replace")
        assert run.returncode != 0
    for part in (f"audio_wav on {shard}", "run run-holding-it", f"pid {os.getpid()}", lease.WAIT_ENV):
        assert part in text, text[-3000:]
    assert (both / layout.audio_manifest_key(shard)).read_bytes() == manifest


def test_two_threads_racing_for_a_free_lease_never_hold_it_together(tmp_path: Path, monkeypatch) -> None:
    # The loser of the put_if_absent race reads the winner's record before the winner has registered it: it must see
    # a live holder of this very process, not a stale record of its own pid. A slow prune (a slow store) right after
    # the winning put widens that window so the race is met every time.
    prune = lease.Lease._prune

    def slow_prune(self) -> None:
        time.sleep(0.2)
        prune(self)

    monkeypatch.setattr(lease.Lease, "_prune", slow_prune)
    for trial in range(5):
        store_root = tmp_path / f"t{trial}"
        barrier, spans, lock = threading.Barrier(2), [], threading.Lock()

        def contender(name: str, root: Path = store_root, barrier=barrier, spans=spans, lock=lock) -> None:
            barrier.wait()
            held = lease.take(LocalStore(root), SHARD, "media_index", name, wait=10)
            start = time.monotonic()
            time.sleep(0.1)
            end = time.monotonic()
            held.release()
            with lock:
                spans.append((start, end))

        threads = [threading.Thread(target=contender, args=(f"tick-{n}",)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        (a_start, a_end), (b_start, b_end) = sorted(spans)
        assert a_end <= b_start, f"trial {trial}: both threads held the lease at once"
