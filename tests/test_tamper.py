"""The asset checks can fail: each tamper with a finished shard's outputs is caught by the check that owns it."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from asr_assets import layout
from asr_assets.checks import (
    Reconciliation,
    reconcile_audio,
    reconcile_distilled,
    reconcile_features,
    reconcile_index,
    reconcile_transcripts,
    reconcile_vad,
)
from asr_assets.distill import PackSettings, default_rules, distill_shard
from resources.storage import LocalStore

RECONCILERS = (
    reconcile_index,
    reconcile_audio,
    reconcile_vad,
    reconcile_features,
    reconcile_transcripts,
    reconcile_distilled,
)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(src, dst)
    return dst


def _manifest(root: Path, shard: str) -> list[dict]:
    return pq.read_table(root / layout.distilled_manifest_key(shard)).to_pylist()


def _rewrite(path: Path, keep: Callable[[pa.Table], pa.Array]) -> None:
    """Rewrites a Parquet file with only the rows ``keep`` selects (every column kept as written)."""
    table = pq.read_table(path)
    pq.write_table(table.filter(keep(table)), path)


def _drop_rows(path: Path, column: str, ids: list[str]) -> None:
    _rewrite(path, lambda t: pc.invert(pc.is_in(t[column], value_set=pa.array(ids, pa.string()))))


def _files_path(root: Path, shard: str) -> Path:
    """files.jsonl of the shard's current build."""
    return root / layout.files_key(shard, layout.current_build(LocalStore(root), shard))


def _files(root: Path, shard: str) -> list[dict]:
    return [json.loads(line) for line in _files_path(root, shard).read_text().splitlines()]


def _write_files(root: Path, shard: str, records: list[dict]) -> None:
    _files_path(root, shard).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def _failing(root: Path, shard: str, reconcile) -> Reconciliation:
    report = reconcile(LocalStore(root), shard)
    assert not report.passed, f"{reconcile.__name__} missed the tamper"
    return report


def _assert_all_pass(root: Path, shard: str) -> None:
    for reconcile in RECONCILERS:
        report = reconcile(LocalStore(root), shard)
        assert report.passed, (reconcile.__name__, report.problems)


# ---------------------------------------------------------------------------------------------------------- tampers
# Each takes the copied output root and the shard, tampers with one thing, and returns what the problem must name
# (a tar, a key, a media id).


def _delete_tar(root: Path, shard: str) -> list[str]:
    tar_key = _manifest(root, shard)[0]["tar_key"]
    (root / tar_key).unlink()
    return [tar_key]


def _truncate_tar(root: Path, shard: str) -> list[str]:
    tar_key = _manifest(root, shard)[0]["tar_key"]
    path = root / tar_key
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return [tar_key]


def _corrupt_tar_header(root: Path, shard: str) -> list[str]:
    tar_key = _manifest(root, shard)[0]["tar_key"]
    path = root / tar_key
    data = bytearray(path.read_bytes())
    data[100:200] = b"\xff" * 100  # mode, uid, gid, size, mtime and checksum of the first header
    path.write_bytes(bytes(data))
    return [tar_key]


def _extra_tar(root: Path, shard: str) -> list[str]:
    tar_key = _manifest(root, shard)[0]["tar_key"]
    stray = layout.distilled_tar_key(shard, layout.current_build(LocalStore(root), shard), 999)
    shutil.copyfile(root / tar_key, root / stray)
    return [stray]


def _duplicate_manifest_row(root: Path, shard: str) -> list[str]:
    path = root / layout.distilled_manifest_key(shard)
    table = pq.read_table(path)
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), path)
    return [table["key"][0].as_py()]


def _remove_manifest_row(root: Path, shard: str) -> list[str]:
    row = _manifest(root, shard)[-1]
    _drop_rows(root / layout.distilled_manifest_key(shard), "key", [row["key"]])
    return [row["tar_key"], f"{row['key']}.flac"]


def _remove_flac_member(root: Path, shard: str) -> list[str]:
    row = _manifest(root, shard)[0]
    path = root / row["tar_key"]
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers() if m.name != f"{row['key']}.flac"]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as dst:
        for member, data in members:
            dst.addfile(member, io.BytesIO(data))
    return [row["tar_key"], row["key"]]


def _edit_json_member(root: Path, shard: str) -> list[str]:
    row = _manifest(root, shard)[0]
    path = root / row["tar_key"]
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{row['key']}.json")
        start, size = member.offset_data, member.size
    data = bytearray(path.read_bytes())
    sample = data[start : start + size]
    # Same length, so the tar stays well formed: only the label changes.
    edited = sample.replace(json.dumps(row["text"]).encode(), json.dumps("X" + row["text"][1:]).encode())
    assert edited != sample and len(edited) == size
    data[start : start + size] = edited
    path.write_bytes(bytes(data))
    return [row["tar_key"], f"{row['key']}.json: text"]


def _pointer_deleted(root: Path, shard: str) -> list[str]:
    (root / layout.distilled_current_key(shard)).unlink()
    return [layout.distilled_current_key(shard)]


def _manifest_replaced(root: Path, shard: str) -> list[str]:
    """The users' manifest swapped for a copy written differently (same rows): no longer the current build's."""
    path = root / layout.distilled_manifest_key(shard)
    pq.write_table(pq.read_table(path), path, compression="gzip")
    return [layout.distilled_manifest_key(shard), layout.current_build(LocalStore(root), shard)]


def _delete_audio_dead_letter(root: Path, shard: str) -> list[str]:
    path = root / layout.dead_letter_key("audio_wav", shard)
    media_id = pq.read_table(path)["item_id"][0].as_py()
    _drop_rows(path, "item_id", [media_id])
    return [media_id]


def _outcome_edited(root: Path, shard: str) -> list[str]:
    records = _files(root, shard)
    rec = next(r for r in records if r["outcome"] == "transcribed")
    rec["outcome"] = "no_speech"
    _write_files(root, shard, records)
    return [rec["media_id"]]


def _failed_outcome_edited(root: Path, shard: str) -> list[str]:
    records = _files(root, shard)
    rec = next(r for r in records if r["outcome"] == "failed")
    rec["outcome"], rec["failure"] = "transcribed", None
    _write_files(root, shard, records)
    return [rec["media_id"]]


def _kept_status_edited(root: Path, shard: str) -> list[str]:
    records = _files(root, shard)
    seg = next(s for r in records for s in r["segments"] if s["status"] == "kept")
    seg["status"] = "dropped:empty_text"
    _write_files(root, shard, records)
    return [seg["segment_id"]]


def _file_line_removed(root: Path, shard: str) -> list[str]:
    records = _files(root, shard)
    _write_files(root, shard, records[1:])
    return [records[0]["media_id"]]


# (tamper, the check that must fail, what its problem says)
TAMPERS = [
    (_delete_tar, reconcile_distilled, "missing, yet named by"),
    (_truncate_tar, reconcile_distilled, "truncated"),
    (_corrupt_tar_header, reconcile_distilled, "unreadable (bad header at byte 0"),
    (_extra_tar, reconcile_distilled, "tars not named by the manifest"),
    (_duplicate_manifest_row, reconcile_distilled, "duplicate dataset keys"),
    (_remove_manifest_row, reconcile_distilled, "not in the manifest"),
    (_remove_flac_member, reconcile_distilled, "manifest rows without a .flac member"),
    (_edit_json_member, reconcile_distilled, "whose .json disagrees with the manifest"),
    (_pointer_deleted, reconcile_distilled, "is missing: no dataset build was committed"),
    (_manifest_replaced, reconcile_distilled, "is not the manifest of the current build"),
    (_delete_audio_dead_letter, reconcile_audio, "media without an outcome"),
    (
        _delete_audio_dead_letter,
        reconcile_distilled,
        "files.jsonl says failed (stage audio_wav), the stage tables say pending",
    ),
    (_outcome_edited, reconcile_distilled, "files.jsonl says no_speech (stage None), the stage tables say transcribed"),
    (
        _failed_outcome_edited,
        reconcile_distilled,
        "files.jsonl says transcribed (stage None), the stage tables say failed",
    ),
    (_kept_status_edited, reconcile_distilled, "files.jsonl says dropped:empty_text, expected kept"),
    (_file_line_removed, reconcile_distilled, "indexed files (files.jsonl) without an outcome"),
]


def test_the_untampered_copy_passes_every_check(pipeline_run, tmp_path: Path) -> None:
    _, out, shard = pipeline_run
    _assert_all_pass(_copy(out, tmp_path), shard)


@pytest.mark.parametrize(
    ("tamper", "reconcile", "says"), TAMPERS, ids=[f"{t.__name__[1:]}-{r.__name__}" for t, r, _ in TAMPERS]
)
def test_a_tamper_fails_its_check_and_names_the_problem(
    pipeline_run, tmp_path: Path, tamper, reconcile, says: str
) -> None:
    _, out, shard = pipeline_run
    root = _copy(out, tmp_path)
    names = tamper(root, shard)
    problems = _failing(root, shard, reconcile).problems
    assert any(says in p and all(n in p for n in names) for p in problems), (says, names, problems)


# ------------------------------------------------------------------------------------- segments that failed a stage


@pytest.fixture(scope="module")
def segment_failures(pipeline_run, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the finished shard where segments failed, re-distilled: (root, shard, all-failed file, other file).

    Every segment of one file is dead-lettered (its first by ``segment_features``, the rest by ``transcripts``);
    one segment of another file is dead-lettered by ``transcripts``.
    """
    _, out, shard = pipeline_run
    root = _copy(out, tmp_path_factory.mktemp("segment-failures"))
    segments = pq.read_table(root / layout.segments_key(shard)).sort_by(
        [("media_id", "ascending"), ("index", "ascending")]
    )
    per_media: dict[str, list[dict]] = {}
    for s in segments.to_pylist():
        per_media.setdefault(s["media_id"], []).append(s)
    by_size = sorted(per_media, key=lambda m: (len(per_media[m]), m))
    all_failed, some_failed = by_size[0], by_size[-1]
    assert all_failed != some_failed and len(per_media[some_failed]) >= 2, "needs two files, one with 2+ segments"
    first, *rest = per_media[all_failed]
    at_transcripts = [*rest, per_media[some_failed][-1]]

    store = LocalStore(root)
    _drop_rows(root / layout.features_key(shard), "segment_id", [first["segment_id"]])
    for part in store.list(layout.transcripts_prefix(shard)):
        _drop_rows(root / part.key, "segment_id", [s["segment_id"] for s in [first, *at_transcripts]])
    for stage, failed in (("segment_features", [first]), ("transcripts", at_transcripts)):
        rows = [
            layout.dead_letter(s["segment_id"], "", stage, "RuntimeError", f"{stage}: segment {s['segment_id']}: boom")
            for s in failed
        ]
        layout.append_dead_letters(store, stage, shard, rows)
    distill_shard(store, shard, default_rules(), PackSettings())
    return root, shard, all_failed, some_failed


def test_a_file_whose_every_segment_failed_is_failed_with_the_first_failure(segment_failures) -> None:
    root, shard, all_failed, some_failed = segment_failures
    _assert_all_pass(root, shard)
    files = {r["media_id"]: r for r in _files(root, shard)}
    failed = files[all_failed]
    assert failed["outcome"] == "failed"
    first = failed["segments"][0]["segment_id"]
    assert failed["failure"] == {
        "stage": "segment_features",
        "error_class": "RuntimeError",
        "error": f"segment_features: segment {first}: boom",
    }
    assert [s["status"] for s in failed["segments"]] == ["failed:segment_features"] + ["failed:transcripts"] * (
        len(failed["segments"]) - 1
    )
    assert failed["text"] == ""
    partly = files[some_failed]
    assert partly["outcome"] == "transcribed" and partly["failure"] is None
    assert partly["segments"][-1]["status"] == "failed:transcripts"
    assert partly["text"] and all(s["status"] == "kept" for s in partly["segments"][:-1])
    parquet = pq.read_table(
        root / layout.files_parquet_key(shard, layout.current_build(LocalStore(root), shard))
    ).to_pylist()
    assert {r["media_id"]: r["outcome"] for r in parquet} == {m: r["outcome"] for m, r in files.items()}


@pytest.mark.parametrize(
    ("stage", "reconcile", "words"),
    [
        ("segment_features", reconcile_features, "segments without an outcome"),
        ("transcripts", reconcile_transcripts, "featured segments without an outcome"),
    ],
)
def test_a_deleted_segment_dead_letter_fails_its_stage_check_and_the_files_check(
    segment_failures, tmp_path: Path, stage: str, reconcile, words: str
) -> None:
    src, shard, _, _ = segment_failures
    root = _copy(src, tmp_path)
    path = root / layout.dead_letter_key(stage, shard)
    segment_id = pq.read_table(path)["item_id"][0].as_py()
    _drop_rows(path, "item_id", [segment_id])
    problems = _failing(root, shard, reconcile).problems
    assert any(words in p and segment_id in p for p in problems), problems
    problems = _failing(root, shard, reconcile_distilled).problems
    assert any(segment_id in p and "files.jsonl" in p for p in problems), problems


# ------------------------------------------------------------------------------ rows indexed while a step ran


def test_rows_indexed_while_a_step_ran_are_the_next_runs_work_and_a_row_it_saw_is_not(
    pipeline_run, tmp_path: Path
) -> None:
    """A sensor indexes new arrivals while a run decodes or builds the shard: the checks count them as indexed since
    (the next run's work) instead of failing the run, yet a row in a part the step did read and left without an outcome
    still fails them. A chaos drill caught the run failing on exactly this."""
    from asr_assets.records import MEDIA_SCHEMA
    from resources.storage import write_table

    _, out, shard = pipeline_run
    root = _copy(out, tmp_path)
    store = LocalStore(root)
    row = {**layout.read_index(store, shard).to_pylist()[0], "media_id": "f" * 32, "uri": "late/arrival.wav"}
    late_part = layout.index_part_key(shard, row["media_id"])
    write_table(store, late_part, pa.Table.from_pylist([row], MEDIA_SCHEMA))
    audio, distilled = reconcile_audio(store, shard), reconcile_distilled(store, shard)
    assert audio.passed and distilled.passed, (audio.problems, distilled.problems)
    assert audio.counts["indexed_since"] == 1 and distilled.counts["index_parts_since"] == 1

    # The same row in a part the steps say they read: lost, not late.
    seen_key = layout.audio_index_seen_key(shard)
    seen = json.loads(store.read_bytes(seen_key))
    store.put_bytes(seen_key, json.dumps({"index_parts": [*seen["index_parts"], late_part]}).encode())
    info_key = layout.build_info_key(shard, layout.current_build(store, shard))
    info = json.loads(store.read_bytes(info_key))
    store.put_bytes(info_key, json.dumps({**info, "index_parts": [*info["index_parts"], late_part]}).encode())
    for reconcile, says in (
        (reconcile_audio, "1 media without an outcome"),
        (reconcile_distilled, "1 indexed files (files.jsonl) without an outcome"),
    ):
        problems = _failing(root, shard, reconcile).problems
        assert any(says in p and row["media_id"] in p for p in problems), problems
