"""Deduplication and the evaluation-set guard: real ffmpeg variants of espeak-ng speech, the keep rule, and a pipeline
run where a re-encoded copy and a copy of an evaluation recording get their outcomes and every count reconciles."""

from __future__ import annotations

import json
import subprocess
import threading
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asr_assets import dedup, layout, lease
from asr_assets import fingerprint as fp
from asr_assets.checks import (
    reconcile_audio,
    reconcile_distilled,
    reconcile_features,
    reconcile_transcripts,
    reconcile_vad,
)
from asr_assets.dedup_index import FingerprintIndex, Hit, build_index_arrays
from asr_assets.definitions import all_assets, all_checks
from asr_assets.media import DecodeJob, decode_media, read_audio
from asr_assets.records import AUDIO_SCHEMA, FEATURE_SCHEMA, MEDIA_SCHEMA
from asr_assets.report import build_report
from asr_assets.stages.common import dead_letter_state
from asr_assets.stages.transcribe import TranscribeSettings, read_transcripts, transcribe_shard
from partitions import shard_partitions
from resources.storage import LocalStore, StorageResource, write_table
from resources.teachers import TeacherResource

TEXT = (
    "The ancient captain repaired the narrow bridge before dawn, and the village doctor measured the river after "
    "the storm. A golden letter crossed the market at noon while the quiet teacher watched the forest."
)
OTHER = "Seven heavy engines followed the silver train through the hollow valley while the children sang loudly."
EVAL_TEXT = "Our evaluation speaker reads this held out sentence about crimson windows and rapid gardens slowly."


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def speak(dst: Path, text: str, voice: str = "en-us") -> Path:
    _run(["espeak-ng", "-v", voice, "-s", "160", "-w", str(dst), text])
    return dst


def ffmpeg(src: Path, dst: Path, *args: str) -> Path:
    _run(["ffmpeg", "-v", "error", "-y", "-i", str(src), *args, str(dst)])
    return dst


def decoded(path: Path, tmp: Path) -> np.ndarray:
    """The file decoded as the pipeline decodes it."""
    dst = tmp / f"{path.name}.flac"
    result = decode_media(DecodeJob("m", str(path), path, dst, 1 << 30, 3600.0))
    assert result.error_class is None, result.error
    assert result.pcm_sha256 == fp.pcm_sha256(read_audio(dst))
    return read_audio(dst)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """An original, its ffmpeg variants, a 6 s clip of it re-encoded, and other voices reading the same text."""
    tmp = tmp_path_factory.mktemp("speech")
    src = speak(tmp / "orig.wav", TEXT)
    files = {
        "orig": src,
        "mp3-32k": ffmpeg(src, tmp / "v.mp3", "-c:a", "libmp3lame", "-b:a", "32k"),
        "aac-48k": ffmpeg(src, tmp / "v.m4a", "-c:a", "aac", "-b:a", "48k"),
        "opus-16k": ffmpeg(src, tmp / "v.opus", "-c:a", "libopus", "-b:a", "16k"),
        "gain+6": ffmpeg(src, tmp / "g6.wav", "-af", "volume=6dB"),
        "gain-6": ffmpeg(src, tmp / "gm6.wav", "-af", "volume=-6dB"),
        "8khz": ffmpeg(src, tmp / "r8.wav", "-ar", "8000"),
        "44khz": ffmpeg(src, tmp / "r44.wav", "-ar", "44100"),
        "clip": ffmpeg(src, tmp / "clip.mp3", "-ss", "3.3", "-t", "6", "-c:a", "libmp3lame", "-b:a", "64k"),
    }
    for voice in ("en-gb", "en-029", "en-us+f3"):
        files[f"voice:{voice}"] = speak(tmp / f"{voice}.wav", TEXT, voice)
    return {name: decoded(path, tmp) for name, path in files.items()}


def _index(prints: dict[str, fp.Fingerprint]) -> FingerprintIndex:
    names = list(prints)
    return FingerprintIndex([build_index_arrays([prints[n] for n in names])], names=names)


def test_variants_and_a_contained_clip_match_their_original(speech) -> None:
    index = _index({"orig": fp.fingerprint(speech["orig"]), "other": fp.fingerprint(decoded_other(speech))})
    for name in ("mp3-32k", "aac-48k", "opus-16k", "gain+6", "gain-6", "8khz", "44khz", "clip"):
        hit = index.lookup(fp.query_prints(speech[name]))
        assert hit is not None and hit.name == "orig", (name, index.hits(fp.sampled(fp.fingerprint(speech[name]))))
    clip = index.lookup(fp.query_prints(speech["clip"]))
    # The clip starts 3.3 s in: the matched offset places it there (32 ms frames).
    assert abs(clip.offset * fp.FRAME_S - 3.3) < 0.1


def decoded_other(speech) -> np.ndarray:
    """Unrelated speech in the same voice: the index holds more than one recording."""
    return speech["voice:en-gb"][::-1].copy()  # time-reversed: the same spectrum statistics, no shared landmarks


def test_other_voices_saying_the_same_words_do_not_match(speech) -> None:
    index = _index({"orig": fp.fingerprint(speech["orig"])})
    for name in [n for n in speech if n.startswith("voice:")]:
        assert index.lookup(fp.query_prints(speech[name])) is None, (name, index.best(fp.fingerprint(speech[name])))


def test_exact_hash_is_equal_only_for_identical_audio(speech) -> None:
    assert fp.pcm_sha256(speech["orig"]) == fp.pcm_sha256(speech["orig"].copy())
    assert fp.pcm_sha256(speech["orig"]) != fp.pcm_sha256(speech["gain-6"])


def _fake_shard(out: LocalStore, shard: str, uri: str, media_id: str, x: np.ndarray, segment_s: float = 5) -> None:
    """A shard holding one decoded file cut into ``segment_s`` segments, with its fingerprint rows, as
    segment_features leaves them."""
    write_table(out, layout.audio_manifest_key(shard), pa.Table.from_pylist([_audio(uri, media_id, x)], AUDIO_SCHEMA))
    dedup.append_fingerprints(out, shard, _print_rows(media_id, x, segment_s))


def _audio(uri: str, media_id: str, x: np.ndarray) -> dict:
    return {f.name: None for f in AUDIO_SCHEMA} | {
        "media_id": media_id,
        "uri": uri,
        "status": "decoded",
        "duration_s": len(x) / fp.SAMPLE_RATE,
        "detected_format": "wav",
        "seconds": 0.0,
        "pcm_sha256": fp.pcm_sha256(x),
    }


def _print_rows(media_id: str, x: np.ndarray, segment_s: float = 5) -> pa.Table:
    rows = []
    step = int(segment_s * fp.SAMPLE_RATE)
    for i, start in enumerate(range(0, len(x) - fp.SAMPLE_RATE, step)):
        seg = x[start : start + step]
        hashes, times, sizes = fp.stored_prints(seg, round(start / fp.HOP))
        rows.append(
            {
                "segment_id": f"{media_id}-{i}",
                "media_id": media_id,
                "start_s": start / fp.SAMPLE_RATE,
                "duration_s": len(seg) / fp.SAMPLE_RATE,
                "hashes": hashes,
                "times": times,
                "grid_sizes": sizes,
            }
        )
    return pa.Table.from_pylist(rows, schema=dedup.FINGERPRINT_SCHEMA)


@pytest.mark.parametrize("order", [("shard-00000", "shard-00001"), ("shard-00001", "shard-00000")])
def test_keep_rule_does_not_depend_on_which_shard_ran_first(speech, tmp_path: Path, order) -> None:
    out = LocalStore(tmp_path)
    copies = {
        "shard-00000": ("file:///z/copy.mp3", "m-z", speech["mp3-32k"]),
        "shard-00001": ("file:///a/orig.wav", "m-a", speech["orig"]),
    }
    for shard in order:  # the shards' features are written in either order before the index runs
        _fake_shard(out, shard, *copies[shard])
    report = dedup.update_index(out, list(order))
    dups = dedup.read_duplicates(out).to_pylist()
    assert report.duplicates["re_encode"] == len(dups) > 0
    # The smallest uri is kept, whichever shard came first; the copy's segments point at the original's.
    assert {d["media_id"] for d in dups} == {"m-z"}
    assert {d["duplicate_of_uri"] for d in dups} == {"file:///a/orig.wav"}
    assert all(d["duplicate_of"].startswith("m-a-") and d["kind"] == "re_encode" for d in dups)
    # A later run adds nothing and recomputes nothing.
    again = dedup.update_index(out, list(order))
    assert again.new_segments == 0 and len(dedup.read_duplicates(out)) == len(dups)


def _materialize(
    out: Path, media: Path, selection: list[str], partition: str | None = None, config=None, raise_on_error=True
):
    return dg.materialize(
        [*all_assets, *all_checks],
        selection=selection,
        resources={
            "storage": StorageResource(source_uri=str(media), output_root=str(out)),
            "teacher": TeacherResource(second_opinion="off"),
        },
        partition_key=partition,
        run_config=config or {},
        raise_on_error=raise_on_error,
    )


def test_pipeline_skips_known_copies_and_drops_them_with_their_reason(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    evals = tmp_path / "eval"
    evals.mkdir()
    orig = speak(media / "a_orig.wav", TEXT)
    ffmpeg(orig, media / "b_copy.mp3", "-c:a", "libmp3lame", "-b:a", "64k")
    speak(media / "c_other.wav", OTHER, "en-gb")
    held_out = speak(evals / "held_out.wav", EVAL_TEXT, "en-gb-scotland")
    ffmpeg(held_out, media / "d_leaked.opus", "-c:a", "libopus", "-b:a", "32k")
    out = tmp_path / "out"
    shards = shard_partitions.get_partition_keys()
    cpu = ["media_index", "audio_wav", "vad_segments", "segment_features"]
    for shard in shards:
        assert _materialize(out, media, cpu, shard).success
    config = {"ops": {"eval_sets": {"config": {"eval_sets": f"heldout={evals}"}}}}
    assert _materialize(out, media, ["eval_sets", "audio_fingerprints"], config=config).success
    for shard in shards:
        result = _materialize(out, media, ["transcripts", "distilled_dataset"], shard)
        assert result.success
        assert all(c.passed for c in result.get_asset_check_evaluations())

    store = LocalStore(out)
    files, decisions, skipped = {}, {}, {}
    for shard in shards:
        for reconcile in (
            reconcile_audio,
            reconcile_vad,
            reconcile_features,
            reconcile_transcripts,
            reconcile_distilled,
        ):
            assert reconcile(store, shard).passed, (shard, reconcile.__name__, reconcile(store, shard).problems)
        build = layout.current_build(store, shard)
        if build is None:
            continue
        for line in (out / layout.files_key(shard, build)).read_text().splitlines():
            rec = json.loads(line)
            files[rec["uri"].rsplit("/", 1)[-1]] = rec
        for d in pq.read_table(out / layout.decisions_key(shard, build)).to_pylist():
            decisions[d["segment_id"]] = d
        for part in (out / "transcripts" / shard).glob("*.parquet"):
            for t in pq.read_table(part).to_pylist():
                skipped[t["segment_id"]] = t["finish_reason"]

    copy, leaked, kept = files["b_copy.mp3"], files["d_leaked.opus"], files["a_orig.wav"]
    assert copy["duplicate_of"] == kept["uri"] and copy["duplicate_kind"] == "re_encode" and copy["similarity"] > 0.2
    assert {s["status"] for s in copy["segments"]} == {"dropped:duplicate"}
    assert {s["status"] for s in leaked["segments"]} == {"dropped:eval_contamination"}
    assert {s["eval_set"] for s in leaked["segments"]} == {"heldout"}
    assert kept["duplicate_of"] is None and "kept" in {s["status"] for s in kept["segments"]}
    assert "kept" in {s["status"] for s in files["c_other.wav"]["segments"]}
    # Never given to the teacher: their outcome is the skip, and the decision carries what dedup found.
    for s in copy["segments"]:
        assert skipped[s["segment_id"]] == "skipped:duplicate" and s["text"] is None  # no label, not an empty one
        d = decisions[s["segment_id"]]
        assert d["drop_reason"] == "duplicate" and d["duplicate_of"] and d["duplicate_kind"] == "re_encode"
    for s in leaked["segments"]:
        assert skipped[s["segment_id"]] == "skipped:eval_contamination"
    for s in kept["segments"]:
        assert not skipped[s["segment_id"]].startswith("skipped:")

    report, _ = build_report(store, shards)
    assert report.dedup["teacher_hours_saved"] > 0
    assert report.dedup["duplicates_by_kind"]["re_encode"]["segments"] == len(copy["segments"])
    assert report.dedup["eval_matches"]["heldout"]["segments"] == len(leaked["segments"])
    assert report.dropped_by_reason["duplicate"] == len(copy["segments"])
    assert report.dropped_by_reason["eval_contamination"] == len(leaked["segments"])
    # Skipped copies have no detected language: they are accounted as undetermined, not under an empty name.
    assert "" not in report.languages
    skipped_n = len(copy["segments"]) + len(leaked["segments"])
    assert report.languages["und"]["transcribed"] == skipped_n and report.languages["und"]["kept"] == 0


def test_identical_audio_is_exact_and_a_clip_is_contained(speech, tmp_path: Path) -> None:
    out = LocalStore(tmp_path)
    _fake_shard(out, "shard-00000", "file:///a/orig.wav", "m-a", speech["orig"])
    _fake_shard(out, "shard-00001", "file:///b/same.flac", "m-b", speech["orig"].copy())
    _fake_shard(out, "shard-00002", "file:///c/clip.mp3", "m-c", speech["clip"])
    dedup.update_index(out, ["shard-00000", "shard-00001", "shard-00002"])
    kinds = {(d["media_id"], d["kind"], d["duplicate_of_uri"]) for d in dedup.read_duplicates(out).to_pylist()}
    assert kinds == {("m-b", "exact", "file:///a/orig.wav"), ("m-c", "contained_clip", "file:///a/orig.wav")}


def _features_of(out: LocalStore, shard: str, ids: set[str]) -> None:
    """Writes a feature row for each of these fingerprinted segments of the shard, as segment_features would."""
    prints = pq.read_table(out.local_path(dedup.fingerprints_key(shard))).to_pylist()
    rows = [
        {f.name: None for f in FEATURE_SCHEMA}
        | {
            "segment_id": r["segment_id"],
            "media_id": r["media_id"],
            "start_s": r["start_s"],
            "end_s": r["start_s"] + r["duration_s"],
            "duration_s": r["duration_s"],
            "audio_key": f"segment_features/{shard}/audio-part-0.flac",
            "audio_offset": i,
            "audio_frames": round(r["duration_s"] * fp.SAMPLE_RATE),
        }
        for i, r in enumerate(p for p in prints if p["segment_id"] in ids)
    ]
    write_table(out, layout.features_key(shard), pa.Table.from_pylist(rows, schema=FEATURE_SCHEMA))


def test_a_skipped_copy_loses_its_retried_dead_letter(speech, tmp_path: Path) -> None:
    out = LocalStore(tmp_path)
    _fake_shard(out, "shard-00000", "file:///a/orig.wav", "m-a", speech["orig"])
    _fake_shard(out, "shard-00001", "file:///z/copy.mp3", "m-z", speech["mp3-32k"])
    dedup.update_index(out, ["shard-00000", "shard-00001"])
    copies = {d["segment_id"] for d in dedup.read_duplicates(out).to_pylist()}
    assert copies
    _features_of(out, "shard-00001", copies)
    # An earlier run failed on these segments (pending: the next run retries them), and they are known copies now.
    letters = [layout.dead_letter(i, "file:///z/copy.mp3", "transcripts", "EngineCallFailed", "boom") for i in copies]
    layout.append_dead_letters(out, "transcripts", "shard-00001", letters)
    assert dead_letter_state(out, "transcripts", "shard-00001", set()).retried == copies

    def no_teacher():
        raise AssertionError("a known copy never reaches the teacher")

    report = transcribe_shard(out, "shard-00001", no_teacher, TranscribeSettings())
    assert report.totals["skipped_duplicates"] == len(copies)
    # One outcome each: the skip row, and no dead letter left beside it.
    assert set(read_transcripts(out, "shard-00001")["segment_id"].to_pylist()) == copies
    assert layout.read_dead_letters(out, "transcripts", "shard-00001").num_rows == 0
    check = reconcile_transcripts(out, "shard-00001")
    assert check.passed, check.problems


@pytest.mark.parametrize("live", ["m-1", "m-2"])
def test_a_replaced_object_is_not_a_duplicate_of_its_older_version(speech, tmp_path: Path, live: str) -> None:
    out = LocalStore(tmp_path)
    uri, old = "file:///a/talk.mp3", ({"m-1", "m-2"} - {live}).pop()
    # The object was replaced by a re-encode of itself: two versions of one uri, the older one retired.
    versions = {old: speech["orig"], live: speech["mp3-32k"]}
    index = [
        {f.name: None for f in MEDIA_SCHEMA}
        | {"media_id": m, "uri": uri, "discovered_at": datetime(2026, 1, day, tzinfo=UTC)}
        for day, m in ((1, old), (2, live))
    ]
    write_table(out, layout.index_part_key("shard-00000", old), pa.Table.from_pylist(index, schema=MEDIA_SCHEMA))
    assert layout.retired_media(layout.read_index(out, "shard-00000")) == {old}
    audio = [_audio(uri, m, x) for m, x in versions.items()]
    write_table(out, layout.audio_manifest_key("shard-00000"), pa.Table.from_pylist(audio, schema=AUDIO_SCHEMA))
    dedup.append_fingerprints(out, "shard-00000", pa.concat_tables([_print_rows(m, x) for m, x in versions.items()]))
    dedup.update_index(out, ["shard-00000"])
    dups = dedup.read_duplicates(out).to_pylist()
    # The live version keeps every segment; nothing is a duplicate of itself or of its own file.
    assert not [d for d in dups if d["media_id"] == live]
    assert all(d["duplicate_of"] != d["segment_id"] and not d["duplicate_of"].startswith(d["media_id"]) for d in dups)
    assert all(d["duplicate_of"].startswith(live) for d in dups)


def test_a_second_index_writer_is_refused_while_one_holds_the_index(speech, tmp_path: Path) -> None:
    out = tmp_path / "out"
    store = LocalStore(out)
    _fake_shard(store, "shard-00000", "file:///a/orig.wav", "m-a", speech["orig"])
    taken, done = threading.Event(), threading.Event()

    def first_writer() -> None:
        # Another thread is another writer (leases are re-entrant per thread only): it holds the index's lease.
        with lease.hold(store, dedup.INDEX_LEASE_SHARD, "audio_fingerprints", "first-run"):
            taken.set()
            done.wait(60)

    thread = threading.Thread(target=first_writer)
    thread.start()
    try:
        assert taken.wait(60)
        result = _materialize(out, tmp_path, ["audio_fingerprints"], raise_on_error=False)
        assert not result.success
        failure = str(result.get_step_failure_events()[0].event_specific_data.error)
        assert "LeaseHeld" in failure and "first-run" in failure
        assert dedup.read_state(store)["generations"] == 0  # the refused run wrote nothing
    finally:
        done.set()
        thread.join()
    # Once the first writer is done, the next run indexes.
    assert _materialize(out, tmp_path, ["audio_fingerprints"]).success
    assert dedup.read_state(store)["generations"] == 1


def test_a_skipped_copy_stands_in_with_its_kept_label_when_references_are_split() -> None:
    from asr_assets.calibrate import audit_segments
    from asr_assets.report import _stand_in_copies

    reference = "the cat sat on the mat please turn off the lights"
    segs_of = {
        "file:///a": [("a-0", "please turn off the lights", "en")],
        "file:///b": [("b-0", "the cat sat on the mat", "en"), ("b-1", None, "en")],
    }
    stand_ins = _stand_in_copies(segs_of, {"b-1": "a-0"})
    assert stand_ins == {"b-1"} and segs_of["file:///b"][1] == ("b-1", "please turn off the lights", "en")
    audited = audit_segments(segs_of, {"file:///b": reference})
    # The labelled segment is measured against its own words only: no deletions borrowed from the skipped copy.
    assert audited["b-0"].errors == 0 and audited["b-0"].ref_words == 6


def test_a_new_version_is_not_dropped_through_a_copy_of_the_version_it_replaced(speech, tmp_path: Path) -> None:
    out = LocalStore(tmp_path)
    uri = "file:///a/talk.wav"
    versions = {"m-old": speech["orig"], "m-new": speech["gain-6"]}

    def index_row(media_id: str, day: int) -> dict:
        row = {f.name: None for f in MEDIA_SCHEMA}
        return row | {"media_id": media_id, "uri": uri, "discovered_at": datetime(2026, 1, day, tzinfo=UTC)}

    write_table(
        out, layout.index_part_key("shard-00000", "m-old"), pa.Table.from_pylist([index_row("m-old", 1)], MEDIA_SCHEMA)
    )
    _fake_shard(out, "shard-00000", uri, "m-old", versions["m-old"])
    _fake_shard(out, "shard-00001", "file:///z/copy.mp3", "m-z", speech["mp3-32k"])
    dedup.update_index(out, ["shard-00000", "shard-00001"])
    assert {d["media_id"] for d in dedup.read_duplicates(out).to_pylist()} == {"m-z"}  # a copy of the old version
    # The object is replaced: the old version is retired, the copy's chain now ends at a version no longer kept.
    write_table(
        out, layout.index_part_key("shard-00000", "m-new"), pa.Table.from_pylist([index_row("m-new", 2)], MEDIA_SCHEMA)
    )
    audio = [_audio(uri, m, x) for m, x in versions.items()]
    write_table(out, layout.audio_manifest_key("shard-00000"), pa.Table.from_pylist(audio, schema=AUDIO_SCHEMA))
    dedup.append_fingerprints(out, "shard-00000", _print_rows("m-new", versions["m-new"]))
    report = dedup.update_index(out, ["shard-00000", "shard-00001"])
    assert report.new_segments > 0
    assert "m-new" not in {d["media_id"] for d in dedup.read_duplicates(out).to_pylist()}


def _eval_table(files: dict[str, np.ndarray]) -> pa.Table:
    """An evaluation-set registry (as eval_sets writes it) of decoded audio, one set named "heldout"."""
    rows = []
    for uri, x in files.items():
        hashes, times, sizes = fp.stored_prints(x)
        rows.append(
            {
                "eval_set": "heldout",
                "uri": uri,
                "duration_s": len(x) / fp.SAMPLE_RATE,
                "hashes": hashes,
                "times": times,
                "grid_sizes": sizes,
                "fingerprint_version": fp.VERSION,
            }
        )
    return pa.Table.from_pylist(rows, schema=dedup.EVAL_INDEX_SCHEMA)


def test_an_evaluation_file_registered_later_is_found_through_the_index_and_dropped_with_its_set(
    speech, tmp_path: Path
) -> None:
    """Evaluation files added after the training segments were indexed are looked up in the global index (no pass over
    every segment): the segments overlapping the clip match, a distinct recording of the same text does not, and the
    matches go when the file is no longer registered."""
    out = LocalStore(tmp_path / "out")
    _fake_shard(out, "shard-00000", "file:///train/orig.wav", "m-orig", speech["orig"])
    assert dedup.update_index(out, ["shard-00000"]).new_segments > 0
    assert dedup.read_state(out)["eval_checked"] == []

    # The 6 s clip (an mp3 of 3.3-9.3 s) and another voice reading the same text, registered only now.
    evals = _eval_table({"file:///eval/clip.mp3": speech["clip"], "file:///eval/other.wav": speech["voice:en-gb"]})
    report = dedup.update_index(out, ["shard-00000"], evals)
    assert report.new_segments == 0
    matches = dedup.read_eval_matches(LocalStore(tmp_path / "out")).to_pylist()
    # 5-10 s holds 4.3 s of the clip; what a lookup finds is what checking the segments one by one finds.
    assert "m-orig-1" in {m["segment_id"] for m in matches}
    assert {m["eval_uri"] for m in matches} == {"file:///eval/clip.mp3"}
    direct = LocalStore(tmp_path / "direct")
    _fake_shard(direct, "shard-00000", "file:///train/orig.wav", "m-orig", speech["orig"])
    dedup.update_index(direct, ["shard-00000"], evals)
    by_segment = dedup.read_eval_matches(LocalStore(tmp_path / "direct")).to_pylist()
    assert {m["segment_id"] for m in matches} == {m["segment_id"] for m in by_segment}
    assert report.eval_matches["heldout"] == len(matches)
    assert dedup.read_state(out)["eval_checked"] == sorted(
        [["heldout", "file:///eval/clip.mp3"], ["heldout", "file:///eval/other.wav"]]
    )
    # Nothing new: nothing is looked up or written again.
    assert dedup.update_index(out, ["shard-00000"], evals).eval_matches == {}
    assert len(dedup.read_eval_matches(LocalStore(tmp_path / "out"))) == len(matches)

    # The clip is unregistered: its matches go (the segments are training data again).
    dedup.update_index(out, ["shard-00000"], evals.slice(1))
    assert dedup.read_eval_matches(LocalStore(tmp_path / "out")).num_rows == 0
    assert dedup.shard_outcomes(out, "shard-00000") == {}


def test_a_short_evaluation_clip_inside_a_long_segment_is_caught(speech, tmp_path: Path) -> None:
    """A 2 s evaluation clip is a small share of a 30 s segment's landmarks; what counts is the share of the shorter."""
    out = LocalStore(tmp_path)
    x = speech["orig"]
    long_segment = np.concatenate([x, speech["voice:en-029"]])[: 30 * fp.SAMPLE_RATE]
    _fake_shard(out, "shard-00000", "file:///train/long.wav", "m-long", long_segment, segment_s=30)
    clip = x[4 * fp.SAMPLE_RATE : 6 * fp.SAMPLE_RATE]
    evals = _eval_table({"file:///eval/short.wav": clip, "file:///eval/other.wav": speech["voice:en-gb"]})
    report = dedup.update_index(out, ["shard-00000"], evals)
    assert report.eval_matches["heldout"] == 1
    (match,) = dedup.read_eval_matches(LocalStore(tmp_path)).to_pylist()
    assert match["segment_id"] == "m-long-0" and match["eval_uri"] == "file:///eval/short.wav"
    assert dedup.shard_outcomes(out, "shard-00000")["m-long-0"]["reason"] == dedup.EVAL_CONTAMINATION


def test_an_index_of_another_fingerprint_version_is_refused_with_what_to_do(speech, tmp_path: Path) -> None:
    out = LocalStore(tmp_path)
    _fake_shard(out, "shard-00000", "file:///train/orig.wav", "m-orig", speech["orig"])
    out.put_bytes(dedup.STATE_KEY, json.dumps({"generations": 1, "eval_version": ""}).encode())  # an older index
    with pytest.raises(ValueError, match="pair-v0 fingerprints.*remove dedup/"):
        dedup.update_index(out, ["shard-00000"])


def test_a_lookup_reads_a_bounded_number_of_postings_and_still_finds_copies() -> None:
    """A query's hashes are consulted rarest first within POSTING_BUDGET. A copy whose landmarks are rare is found
    however common the rest of the query is; and where every landmark is as common as every other (posting lists of
    3,000, the budget covering about half of a 70-landmark query), copies sharing a quarter to a half of the query
    are still found, and random queries match nothing."""
    from asr_assets import dedup_index

    rng = np.random.default_rng(0)

    def index_of(hashes: np.ndarray, refs: np.ndarray, times: np.ndarray) -> FingerprintIndex:
        order = np.argsort(hashes, kind="stable")
        return FingerprintIndex([(hashes[order], refs[order].astype(np.uint32), times[order].astype(np.uint32))])

    # Rare landmarks among common ones.
    common = rng.integers(0, fp.SAMPLE_LIMIT, 60, dtype=np.uint64)
    rare = rng.integers(0, fp.SAMPLE_LIMIT, 12, dtype=np.uint64)
    postings = 5_000  # per common hash: 300,000 postings in all, more than twice the budget
    index = index_of(
        np.concatenate([np.repeat(common, postings), rare]),
        np.concatenate([rng.integers(100, 10_000, len(common) * postings), np.full(len(rare), 7)]),
        np.concatenate([rng.integers(0, 1 << 20, len(common) * postings), 500 + np.arange(len(rare))]),
    )
    query = fp.Fingerprint(np.concatenate([common, rare]), np.arange(72, dtype=np.uint32))
    found_refs, _, consulted = index.postings(query)
    assert len(found_refs) <= dedup_index.POSTING_BUDGET < len(common) * postings
    assert consulted >= len(rare)
    hit = index.lookup(query)
    assert hit is not None and hit.ref == 7 and hit.votes == len(rare)

    # Every landmark equally common: 400 values with 3,000 postings each, copies planted at three shares.
    values = rng.integers(0, fp.SAMPLE_LIMIT, 400, dtype=np.uint64)
    hashes = np.repeat(values, 3_000)
    refs = rng.integers(1_000, 1_000_000, len(hashes))
    times = rng.integers(0, 1 << 20, len(hashes))
    queries = []
    for n, share in enumerate((0.25, 0.33, 0.5) * 4):
        k = round(share * 70)
        where = rng.choice(len(hashes), k, replace=False)
        refs[where], times[where] = n, 1000 + np.arange(k)
        noise = rng.choice(values, 70 - k)
        queries.append((n, fp.Fingerprint(np.concatenate([hashes[where], noise]), np.arange(70, dtype=np.uint32))))
    index = index_of(hashes, refs, times)
    assert all(len(index.postings(q)[0]) <= dedup_index.POSTING_BUDGET < 70 * 3_000 for _, q in queries)
    assert [(index.lookup(q) or Hit(-1, "", 0, 0.0, 0)).ref for _, q in queries] == [n for n, _ in queries]
    randoms = [fp.Fingerprint(rng.choice(values, 70), np.arange(70, dtype=np.uint32)) for _ in range(20)]
    assert all(index.lookup(q) is None for q in randoms)


class _CountingStore(LocalStore):
    """A local store that remembers which keys were read."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[str] = []

    def read_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        return super().read_bytes(key)

    def local_path(self, key: str, max_bytes: int | None = None, version: str = "") -> Path:
        self.reads.append(key)
        return super().local_path(key, max_bytes, version)


def test_a_run_reads_only_the_fingerprints_of_shards_that_changed(speech, tmp_path: Path) -> None:
    out = _CountingStore(tmp_path)
    _fake_shard(out, "shard-00000", "file:///a/orig.wav", "m-a", speech["orig"])
    _fake_shard(out, "shard-00001", "file:///b/other.wav", "m-b", speech["voice:en-gb"])
    shards = ["shard-00000", "shard-00001"]
    assert dedup.update_index(out, shards).new_segments > 0
    out.reads.clear()
    assert dedup.update_index(out, shards).new_segments == 0
    assert not [k for k in out.reads if k.endswith(".fingerprints.parquet")], out.reads

    _fake_shard(out, "shard-00001", "file:///b/copy.mp3", "m-c", speech["mp3-32k"])  # a new file on one shard
    out.reads.clear()
    report = dedup.update_index(out, shards)
    assert [k for k in out.reads if k.endswith(".fingerprints.parquet")] == [dedup.fingerprints_key("shard-00001")]
    assert report.new_segments == len(_print_rows("m-c", speech["mp3-32k"])) and report.duplicates["re_encode"] >= 2


ASR = ["media_index", "audio_wav", "vad_segments", "segment_features", "transcripts", "distilled_dataset"]


def test_shard_runs_alone_skip_copies_and_a_later_evaluation_set_makes_their_datasets_pending(tmp_path: Path) -> None:
    """What the sensors run: group:asr shard by shard, no dedup pass. The transcripts step brings the index up to
    date first, so a copy is skipped before the teacher; an evaluation set registered afterwards changes a built
    shard's outcomes, pending_work asks for its dataset again, and the next run drops the leaked segments."""
    from asr_assets.sensors import pending_work

    media, evals, out = tmp_path / "media", tmp_path / "eval", tmp_path / "out"
    media.mkdir()
    evals.mkdir()
    orig = speak(media / "a_orig.wav", TEXT)
    ffmpeg(orig, media / "b_copy.mp3", "-c:a", "libmp3lame", "-b:a", "64k")
    other = speak(media / "c_other.wav", OTHER, "en-gb")
    ffmpeg(other, evals / "other_heldout.opus", "-c:a", "libopus", "-b:a", "32k")
    shards = shard_partitions.get_partition_keys()
    for shard in shards:
        assert _materialize(out, media, ASR, shard).success
    store = LocalStore(out)
    finish = {}
    for shard in shards:
        finish |= {r["segment_id"]: r["finish_reason"] for r in read_transcripts(store, shard).to_pylist()}
    skipped = {sid for sid, reason in finish.items() if reason == "skipped:duplicate"}
    dups = dedup.read_duplicates(store).to_pylist()
    # One of the two copies (whichever shard was labelled first is the first indexed) never reached the teacher.
    assert skipped and skipped == {d["segment_id"] for d in dups}
    assert len({d["media_id"] for d in dups}) == 1
    assert all(pending_work(store, shard)["distilled_dataset"] == 0 for shard in shards)

    config = {"ops": {"eval_sets": {"config": {"eval_sets": f"heldout={evals}"}}}}
    assert _materialize(out, media, ["eval_sets", "audio_fingerprints"], config=config).success
    leaked = dedup.read_eval_matches(store).to_pylist()
    assert leaked and {m["uri"].rsplit("/", 1)[-1] for m in leaked} == {"c_other.wav"}
    (leaked_shard,) = {m["shard"] for m in leaked}
    assert {s: pending_work(store, s)["distilled_dataset"] for s in shards} == {
        s: int(s == leaked_shard) for s in shards
    }
    result = _materialize(out, media, ASR, leaked_shard)
    assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
    assert pending_work(store, leaked_shard)["distilled_dataset"] == 0
    decisions = pq.read_table(out / layout.decisions_key(leaked_shard, layout.current_build(store, leaked_shard)))
    reasons = dict(zip(decisions["segment_id"].to_pylist(), decisions["drop_reason"].to_pylist(), strict=True))
    assert {reasons[m["segment_id"]] for m in leaked} == {dedup.EVAL_CONTAMINATION}


@pytest.mark.parametrize("start_s", [1.0, 3.3, 6.53])
def test_registering_an_evaluation_file_later_finds_what_registering_it_first_finds(
    speech, tmp_path: Path, start_s: float
) -> None:
    """Clips of 2, 3 and 6 s at offsets off the indexed segments' frame grid: looked up in the index after the
    segments were indexed, they match the same segments as when every new segment is checked against them, and every
    segment sharing 2.5 s or more with a clip is among them."""
    x = speech["orig"]
    for length_s in (2, 3, 6):
        a = int(start_s * fp.SAMPLE_RATE)
        clip = {f"file:///eval/clip-{start_s}-{length_s}.wav": x[a : a + length_s * fp.SAMPLE_RATE]}
        later = LocalStore(tmp_path / f"later-{length_s}")
        direct = LocalStore(tmp_path / f"direct-{length_s}")
        for out in (later, direct):
            _fake_shard(out, "shard-00000", "file:///train/orig.wav", "m-orig", x)
        dedup.update_index(later, ["shard-00000"])
        dedup.update_index(later, ["shard-00000"], _eval_table(clip))
        dedup.update_index(direct, ["shard-00000"], _eval_table(clip))
        found = {store: set(dedup.shard_outcomes(store, "shard-00000")) for store in (later, direct)}
        assert found[later] == found[direct], (length_s, found)
        # Any 5 s segment sharing 2.5 s or more of the clip matches.
        end_s = min(start_s + length_s, len(x) / fp.SAMPLE_RATE)
        for i in range(3):
            if min(end_s, 5 * i + 5) - max(start_s, 5 * i) >= 2.5:
                assert f"m-orig-{i}" in found[direct], (length_s, i, found)


class _DiesBeforeCommit(LocalStore):
    """A store whose next write of the index's state fails, as if the run died just before its commit."""

    die = True

    def put_bytes(self, key: str, data: bytes) -> None:
        if key == dedup.STATE_KEY and self.die:
            self.die = False
            raise OSError("killed before the commit")
        super().put_bytes(key, data)


def test_a_run_killed_before_its_commit_leaves_the_next_run_to_record_the_changed_outcomes(
    speech, tmp_path: Path
) -> None:
    """The matches of an evaluation file registered later are written before state.json commits them; a run that
    dies in between must not leave the next one thinking nothing changed (the shard's dataset would keep the copy)."""
    out = _DiesBeforeCommit(tmp_path)
    out.die = False
    _fake_shard(out, "shard-00000", "file:///train/orig.wav", "m-orig", speech["orig"])
    dedup.update_index(out, ["shard-00000"])
    before = dedup.read_state(out)
    evals = _eval_table({"file:///eval/clip.mp3": speech["clip"]})
    out.die = True
    with pytest.raises(OSError, match="killed before the commit"):
        dedup.update_index(out, ["shard-00000"], evals)
    assert dedup.read_state(out) == before and dedup.shard_outcomes(out, "shard-00000") == {}
    report = dedup.update_index(out, ["shard-00000"], evals)
    state = dedup.read_state(out)
    assert report.touched_shards == ["shard-00000"] and state["outcomes_changed"]["shard-00000"] == state["revision"]
    assert dedup.shard_outcomes(out, "shard-00000")


def test_a_dataset_is_stale_when_its_shard_outcomes_changed_after_it_or_came_from_another_index() -> None:
    state = {"index_id": "new", "outcomes_changed": {"s1": 5}}
    built = {"dedup_index_id": "new", "dedup_revision": 5}
    assert not dedup.dataset_is_stale(built, "s1", state)
    assert dedup.dataset_is_stale({**built, "dedup_revision": 4}, "s1", state)
    # The index was removed and rebuilt: its revisions count anew, so a higher old number proves nothing.
    assert dedup.dataset_is_stale({"dedup_index_id": "old", "dedup_revision": 57}, "s1", state)
    assert not dedup.dataset_is_stale({"dedup_index_id": "old", "dedup_revision": 57}, "s2", state)  # no outcomes
    assert not dedup.dataset_is_stale(None, "s1", state)  # nothing built yet: other pending work says so


def test_labelling_goes_on_when_the_dedup_index_cannot_be_updated(tmp_path: Path) -> None:
    """An index the code refuses (another fingerprint version) fails audio_fingerprints, not the teacher's step."""
    media, out = tmp_path / "media", tmp_path / "out"
    media.mkdir()
    speak(media / "a.wav", OTHER)
    shard = next(
        s
        for s in shard_partitions.get_partition_keys()
        if _materialize(out, media, ["media_index"], s).success and layout.read_index(LocalStore(out), s).num_rows
    )
    assert _materialize(out, media, ["audio_wav", "vad_segments", "segment_features"], shard).success
    LocalStore(out).put_bytes(dedup.STATE_KEY, json.dumps({"generations": 1}).encode())  # an older index
    result = _materialize(out, media, ["transcripts"], shard)
    assert result.success and read_transcripts(LocalStore(out), shard).num_rows > 0
    assert not _materialize(out, media, ["audio_fingerprints"], raise_on_error=False).success
