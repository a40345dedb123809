"""Atomic dataset versions: every distilled_dataset build lives in its own folder and is committed by the current
pointer and the manifest; readers never see a half-written build, old builds go only after a grace period, a stale
run never moves the pointer back, and each build records what it added and removed, and why."""

from __future__ import annotations

import hashlib
import json
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from asr_assets import distill, layout
from asr_assets.checks import reconcile_distilled
from asr_assets.distill import (
    PackSettings,
    build_rules,
    commit_build,
    distill_shard,
    read_inputs,
    write_build,
)
from asr_assets.records import (
    AUDIO_SCHEMA,
    FEATURE_SCHEMA,
    MEDIA_SCHEMA,
    SAMPLE_RATE,
    SEGMENT_SCHEMA,
    TRANSCRIPT_SCHEMA,
    VAD_MEDIA_SCHEMA,
)
from resources.storage import LocalStore, read_table, write_table

SHARD = "shard-00000"
# Half of the shard's segments fall under its median confidence: a shard-fitted rule that moves with new arrivals.
RULES = build_rules(confidence_quantile=0.5, min_avg_logprob=-5.0)
PACK = PackSettings(target_tar_bytes=60_000)  # a few segments per tar: several tars per build


def _media_id(n: int) -> str:
    return f"{n:016x}"


def _add_media(store: LocalStore, logprobs: list[float], first: int = 0) -> None:
    """Appends one media per logprob to every upstream table: 1.2 s of a tone, one segment, one transcript each."""
    rng = np.random.default_rng(first)
    index, audio, vad, segments, features, transcripts = [], [], [], [], [], []
    for n, logprob in enumerate(logprobs, start=first):
        media_id = _media_id(n)
        segment_id = f"{media_id}-00000"
        audio_key = layout.audio_key(SHARD, media_id)
        t = np.arange(int(1.2 * SAMPLE_RATE)) / SAMPLE_RATE
        pcm = 0.1 * np.sin(2 * np.pi * (200 + 10 * n) * t) + 0.01 * rng.standard_normal(t.size)
        store.local_path(audio_key).parent.mkdir(parents=True, exist_ok=True)
        sf.write(store.local_path(audio_key), pcm.astype(np.float32), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        uri = f"file:///media/{n:04d}.wav"
        index.append({"media_id": media_id, "uri": uri, "key": f"{n:04d}.wav", "size": 1, "mtime": 0.0})
        index[-1] |= {"extension": "wav", "discovered_at": datetime(2026, 1, 1, tzinfo=UTC)}
        audio.append(
            {"media_id": media_id, "uri": uri, "status": "decoded", "audio_key": audio_key, "duration_s": 1.2}
            | {"detected_format": "wav", "seconds": 0.0}
        )
        vad.append({"media_id": media_id, "duration_s": 1.2, "speech_s": 1.0, "num_segments": 1})
        segments.append(
            {"segment_id": segment_id, "media_id": media_id, "index": 0, "start_s": 0.0, "end_s": 1.2}
            | {"vad_model_sha256": "0" * 64, "vad_params": "{}", "speech_s": 1.0}
        )
        features.append(
            {"segment_id": segment_id, "media_id": media_id, "start_s": 0.0, "end_s": 1.2, "duration_s": 1.2}
            | {"rms_dbfs": -20.0, "clip_ratio": 0.0, "audio_key": audio_key, "audio_offset": 0}
            | {"audio_frames": t.size}
        )
        transcripts.append(
            {"segment_id": segment_id, "media_id": media_id, "text": f"sample number {n} says hello", "language": "en"}
            | {"num_tokens": 6, "avg_logprob": logprob, "no_speech_prob": 0.01, "compression_ratio": 1.1}
            | {"finish_reason": "stop", "model_id": "teacher", "engine": "fake", "settings_hash": "s"}
            | {"prompt_version": "p"}
        )
    part = len(list(store.list(layout.index_prefix(SHARD))))
    write_table(store, layout.index_part_key(SHARD, part), pa.Table.from_pylist(index, MEDIA_SCHEMA))
    for key, schema, rows in (
        (layout.audio_manifest_key(SHARD), AUDIO_SCHEMA, audio),
        (layout.vad_media_key(SHARD), VAD_MEDIA_SCHEMA, vad),
        (layout.segments_key(SHARD), SEGMENT_SCHEMA, segments),
        (layout.features_key(SHARD), FEATURE_SCHEMA, features),
    ):
        write_table(store, key, pa.concat_tables([read_table(store, key, schema), pa.Table.from_pylist(rows, schema)]))
    part = len(list(store.list(layout.transcripts_prefix(SHARD))))
    write_table(store, layout.transcript_part_key(SHARD, part), pa.Table.from_pylist(transcripts, TRANSCRIPT_SCHEMA))


def _retire(store: LocalStore, media_id: str) -> None:
    """The media and everything made from it leave the shard."""
    _drop(store, layout.index_prefix(SHARD), "media_id", [media_id])
    for key in (layout.audio_manifest_key(SHARD), layout.vad_media_key(SHARD), layout.segments_key(SHARD)):
        _drop(store, key, "media_id", [media_id])
    _drop(store, layout.features_key(SHARD), "media_id", [media_id])
    _drop(store, layout.transcripts_prefix(SHARD), "media_id", [media_id])


def _drop(store: LocalStore, prefix_or_key: str, column: str, ids: list[str]) -> None:
    """Removes rows from every Parquet object under a prefix (or one key)."""
    for info in list(store.list(prefix_or_key)):
        table = pq.read_table(store.local_path(info.key))
        write_table(store, info.key, table.filter(pc.invert(pc.is_in(table[column], pa.array(ids)))))


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    """A shard of 8 labelled segments, confidence -0.1 (best) to -0.8."""
    s = LocalStore(tmp_path / "out")
    _add_media(s, [-0.1 * (n + 1) for n in range(8)])
    return s


def _snapshot(store: LocalStore, skip_pointer: bool = False) -> dict[str, bytes]:
    return {
        info.key: store.read_bytes(info.key)
        for info in store.list("distilled/")
        if not (skip_pointer and info.key.endswith(".current.json"))
    }


def _manifest(store: LocalStore) -> list[dict]:
    return pq.read_table(store.local_path(layout.distilled_manifest_key(SHARD))).to_pylist()


def _readable(store: LocalStore) -> list[str]:
    """The manifest's keys, after checking every row is in the tar it names (as a trainer would read it)."""
    rows = _manifest(store)
    for tar_key in {r["tar_key"] for r in rows}:
        with tarfile.open(store.local_path(tar_key)) as tar:
            names = set(tar.getnames())
        assert {f"{r['key']}.{ext}" for r in rows if r["tar_key"] == tar_key for ext in ("flac", "json")} == names
    return sorted(r["key"] for r in rows)


def _folders(store: LocalStore) -> set[str]:
    return {info.key.split("/")[2] for info in store.list(layout.distilled_builds_prefix(SHARD))}


def test_a_build_lives_in_its_own_folder_and_the_pointer_and_manifest_commit_it(store: LocalStore) -> None:
    result = distill_shard(store, SHARD, RULES, PACK)
    assert result.committed and result.previous is None and result.current == result.build_id
    current = layout.read_current(store, SHARD)
    assert current["build_id"] == result.build_id and current["previous"] is None
    assert current["counts"]["kept"] == 4 and current["counts"]["tars"] > 1
    assert all(r["tar_key"].startswith(f"distilled/{SHARD}/{result.build_id}/") for r in _manifest(store))
    assert store.read_bytes(layout.distilled_manifest_key(SHARD)) == store.read_bytes(
        layout.build_manifest_key(SHARD, result.build_id)
    )
    assert len(_readable(store)) == 4
    assert reconcile_distilled(store, SHARD).passed, reconcile_distilled(store, SHARD).problems
    assert result.changes["samples_added"] == 4 and result.changes["added_by_reason"] == {"new": 4}


def test_an_unchanged_rerun_is_a_noop_and_the_same_inputs_give_the_same_bytes(store: LocalStore, tmp_path: Path):
    first = distill_shard(store, SHARD, RULES, PACK)
    before = _snapshot(store)
    again = distill_shard(store, SHARD, RULES, PACK)
    assert not again.committed and again.build_id == first.build_id
    assert again.changes["samples_added"] == again.changes["samples_removed"] == 0
    assert again.report.totals == first.report.totals
    assert _snapshot(store) == before  # pointer included: nothing rewritten
    # Another output root with the same inputs: the same build id and byte-identical files (the pointer aside: it
    # says when).
    other = LocalStore(tmp_path / "other")
    _add_media(other, [-0.1 * (n + 1) for n in range(8)])
    assert distill_shard(other, SHARD, RULES, PACK).build_id == first.build_id
    assert _snapshot(other, skip_pointer=True) == _snapshot(store, skip_pointer=True)


def test_a_build_killed_before_its_commit_leaves_the_previous_build_whole(store: LocalStore, monkeypatch) -> None:
    first = distill_shard(store, SHARD, RULES, PACK)
    pointer, manifest, keys = (
        store.read_bytes(layout.distilled_current_key(SHARD)),
        store.read_bytes(layout.distilled_manifest_key(SHARD)),
        _readable(store),
    )
    _add_media(store, [-0.05, -0.06], first=8)

    def killed(*_args, **_kwargs):
        raise SystemExit("killed after the tars, before the pointer and the manifest")

    monkeypatch.setattr(distill, "commit_build", killed)
    with pytest.raises(SystemExit):
        distill_shard(store, SHARD, RULES, PACK, keep_builds_hours=0)
    monkeypatch.undo()
    assert len(_folders(store)) == 2, "the new build's tars were written"
    assert store.read_bytes(layout.distilled_current_key(SHARD)) == pointer
    assert store.read_bytes(layout.distilled_manifest_key(SHARD)) == manifest
    assert _readable(store) == keys  # every tar the manifest names is there, unchanged

    second = distill_shard(store, SHARD, RULES, PACK)
    assert second.committed and second.previous == first.build_id and second.build_id != first.build_id
    assert reconcile_distilled(store, SHARD).passed
    assert {first.build_id, second.build_id} == _folders(store)


def test_a_run_killed_between_the_pointer_and_the_manifest_is_repaired_by_the_next(store, monkeypatch) -> None:
    distill_shard(store, SHARD, RULES, PACK)
    keys = _readable(store)
    _add_media(store, [-0.05, -0.06], first=8)
    put_bytes = LocalStore.put_bytes

    def put_bytes_until_the_manifest(self, key: str, data: bytes) -> None:
        if key == layout.distilled_manifest_key(SHARD):
            raise SystemExit("killed")
        put_bytes(self, key, data)

    monkeypatch.setattr(LocalStore, "put_bytes", put_bytes_until_the_manifest)
    with pytest.raises(SystemExit):
        distill_shard(store, SHARD, RULES, PACK)
    monkeypatch.undo()
    assert _readable(store) == keys, "the manifest still names the previous build, whose tars are all there"
    assert not reconcile_distilled(store, SHARD).passed  # the pointer moved: the check sees the stale manifest
    result = distill_shard(store, SHARD, RULES, PACK)
    assert not result.committed  # nothing to build again: the manifest is republished from the build's copy
    assert len(_readable(store)) == 5 and reconcile_distilled(store, SHARD).passed


def test_a_replaced_build_stays_for_the_grace_period_then_goes(store: LocalStore) -> None:
    first = distill_shard(store, SHARD, RULES, PACK)
    old_tars = {r["tar_key"] for r in _manifest(store)}
    _add_media(store, [-0.05], first=8)
    second = distill_shard(store, SHARD, RULES, PACK, keep_builds_hours=24)
    assert second.build_id != first.build_id
    assert all(store.exists(k) for k in old_tars), "a reader of the old manifest can still read its tars"
    assert layout.read_current(store, SHARD)["retired"] == {first.build_id: pytest.approx(_now(), abs=60)}
    distill_shard(store, SHARD, RULES, PACK, keep_builds_hours=24)  # a no-op inside the grace period
    assert _folders(store) == {first.build_id, second.build_id}
    distill_shard(store, SHARD, RULES, PACK, keep_builds_hours=0)  # the grace period is over
    assert _folders(store) == {second.build_id}
    assert not any(store.exists(k) for k in old_tars)
    assert reconcile_distilled(store, SHARD).passed


def _now() -> float:
    return datetime.now(UTC).timestamp()


def test_the_single_build_layout_is_retired_like_an_old_build(store: LocalStore) -> None:
    legacy = [f"distilled/{SHARD}/000000.tar", f"distilled/{SHARD}.decisions.parquet", f"distilled/{SHARD}.state.json"]
    for key in legacy:
        store.put_bytes(key, b"from before build folders")
    distill_shard(store, SHARD, RULES, PACK, keep_builds_hours=24)
    assert all(store.exists(k) for k in legacy), "retired now: kept for the grace period"
    distill_shard(store, SHARD, RULES, PACK, keep_builds_hours=0)
    assert not any(store.exists(k) for k in legacy)


def test_changes_name_every_sample_added_and_removed_and_why(store: LocalStore) -> None:
    first = distill_shard(store, SHARD, RULES, PACK)
    kept = {r["key"] for r in _manifest(store)}
    assert kept == {f"{_media_id(n)}-00000" for n in range(4)}  # the four most confident
    retired, dead, gone, refit = (f"{_media_id(n)}-00000" for n in range(4))  # refit: the least confident kept
    # Media 0 leaves the shard; media 1's segment is dead-lettered by transcripts; media 2's transcript is gone.
    _retire(store, _media_id(0))
    _drop(store, layout.transcripts_prefix(SHARD), "segment_id", [dead, gone])
    layout.append_dead_letters(store, "transcripts", SHARD, [layout.dead_letter(dead, "", "transcripts", "X", "x")])
    # Six new, very confident segments: the shard's median confidence rises above media 3's.
    _add_media(store, [-0.01 * (n + 1) for n in range(6)], first=8)

    second = distill_shard(store, SHARD, RULES, PACK)
    changes = pq.read_table(store.local_path(layout.changes_key(SHARD, second.build_id))).to_pylist()
    by_segment = {r["segment_id"]: (r["change"], r["reason"], r["refit"]) for r in changes}
    assert by_segment == {
        retired: ("removed", "media_retired", False),
        dead: ("removed", "dead_lettered:transcripts", False),
        gone: ("removed", "transcript_gone", False),
        refit: ("removed", "dropped:low_confidence", True),
        **{f"{_media_id(n)}-00000": ("added", "new", False) for n in range(8, 14)},
    }
    assert second.previous == first.build_id
    assert second.changes["samples_added"] == 6 and second.changes["samples_removed"] == 4
    assert second.changes["removed_by_reason"] == {
        "dead_lettered:transcripts": 1,
        "dropped:low_confidence": 1,
        "media_retired": 1,
        "transcript_gone": 1,
    }
    assert second.changes["removed_by_refit"] == {"low_confidence": 1}
    summary = json.loads(store.read_bytes(layout.changes_summary_key(SHARD, second.build_id)))
    assert summary == second.changes | {"build_id": second.build_id, "previous": first.build_id}

    # Two media re-segmented (their segments replaced, none labelled yet): the median falls back to media 3's
    # confidence, which is kept again.
    replaced = [f"{_media_id(n)}-00000" for n in (8, 9)]
    for key in (layout.segments_key(SHARD), layout.features_key(SHARD), layout.transcripts_prefix(SHARD)):
        _drop(store, key, "segment_id", replaced)
    third = distill_shard(store, SHARD, RULES, PACK)
    assert third.changes["removed_by_reason"] == {"media_superseded": 2}
    assert third.changes["added_by_reason"] == {"was_dropped:low_confidence": 1}
    assert reconcile_distilled(store, SHARD).passed


def test_a_stale_build_never_moves_the_pointer_back_nor_deletes_the_current_build(store: LocalStore) -> None:
    stale_inputs = read_inputs(store, SHARD)  # a slow run reads the shard...
    _add_media(store, [-0.05], first=8)
    newer = distill_shard(store, SHARD, RULES, PACK)  # ...another reads it later and commits first
    pointer = store.read_bytes(layout.distilled_current_key(SHARD))
    manifest = store.read_bytes(layout.distilled_manifest_key(SHARD))
    newer_files = _snapshot(store)

    fingerprint = distill._fingerprint(stale_inputs, RULES, PACK)
    stale = write_build(store, SHARD, stale_inputs, RULES, PACK, fingerprint)
    result = commit_build(store, stale, keep_builds_hours=0)
    assert not result.committed and result.current == newer.build_id != stale.build_id
    assert store.read_bytes(layout.distilled_current_key(SHARD)) == pointer
    assert store.read_bytes(layout.distilled_manifest_key(SHARD)) == manifest
    assert all(store.read_bytes(k) == v for k, v in newer_files.items()), "the current build is untouched"
    assert reconcile_distilled(store, SHARD).passed
    # The stale build's folder was never current: the next run removes it once the grace period is over.
    distill_shard(store, SHARD, RULES, PACK, keep_builds_hours=0)
    assert _folders(store) == {newer.build_id}


def test_the_asset_reports_the_build_and_its_changes(store: LocalStore, tmp_path: Path) -> None:
    import dagster as dg

    from asr_assets.assets import distilled_dataset
    from resources.storage import StorageResource

    storage = StorageResource(source_uri=str(tmp_path), output_root=str(store.root))
    config = {"ops": {"distilled_dataset": {"config": {"confidence_quantile": 0.5, "min_avg_logprob": -5.0}}}}
    instance = dg.DagsterInstance.ephemeral()

    def run():
        result = dg.materialize(
            [distilled_dataset],
            resources={"storage": storage},
            partition_key=SHARD,
            run_config=config,
            instance=instance,
        )
        return result.asset_materializations_for_node("distilled_dataset")[0].metadata, result.run_id

    first_meta, _ = run()
    _add_media(store, [-0.01, -0.02, -0.03, -0.04], first=8)
    second_meta, run_id = run()
    assert first_meta["samples_added"].value == 4 and first_meta["committed"].value
    assert second_meta["previous_build"].value == first_meta["build_id"].value
    assert second_meta["samples_added"].value == 4 and second_meta["samples_removed"].value == 2
    assert second_meta["removed_by_reason"].value == {"dropped:low_confidence": 2}
    build = second_meta["build_id"].value
    assert second_meta["files_jsonl"].value.endswith(layout.files_key(SHARD, build))
    assert (
        hashlib.sha256(store.read_bytes(layout.distilled_manifest_key(SHARD))).hexdigest()
        == (layout.read_current(store, SHARD)["manifest_sha256"])
    )


def test_a_build_that_lost_files_before_its_commit_is_not_committed(store: LocalStore) -> None:
    first = distill_shard(store, SHARD, RULES, PACK)
    pointer = store.read_bytes(layout.distilled_current_key(SHARD))
    _add_media(store, [-0.05], first=8)
    inputs = read_inputs(store, SHARD)
    build = write_build(store, SHARD, inputs, RULES, PACK, distill._fingerprint(inputs, RULES, PACK))
    store.delete(layout.distilled_tar_key(SHARD, build.build_id, 0))  # e.g. another run's clean-up
    with pytest.raises(RuntimeError, match=f"build {build.build_id} lost 1 of its files.*nothing was committed"):
        commit_build(store, build, keep_builds_hours=24)
    assert store.read_bytes(layout.distilled_current_key(SHARD)) == pointer
    assert layout.current_build(store, SHARD) == first.build_id
