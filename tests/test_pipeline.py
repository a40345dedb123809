"""The whole asset graph on a generated corpus: outputs, reconciliation, idempotence, and the Dagster CLI path."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import jiwer
import pyarrow.parquet as pq
import soundfile as sf

from asr_assets import layout
from asr_assets.checks import (
    reconcile_audio,
    reconcile_distilled,
    reconcile_features,
    reconcile_transcripts,
    reconcile_vad,
)
from asr_assets.distill import normalize_text
from asr_assets.sample_corpus import Corpus
from partitions import NUM_SHARDS, shard_of
from resources.storage import LocalStore
from tests.conftest import materialize_shard, uri_of

ASSETS = ["media_index", "audio_wav", "vad_segments", "segment_features", "transcripts", "distilled_dataset"]
EXPECTED_ERRORS = {
    "empty": "EmptyFile",
    "random": "UnsupportedFormat",
    "text": "UnsupportedFormat",
    "noaudio": "NoAudioStream",
}


def _shard_items(corpus: Corpus, shard: str):
    return [item for item in corpus.items if shard_of(uri_of(corpus, item.path), NUM_SHARDS) == shard]


def _metadata(result) -> dict[str, dict]:
    return {
        ev.materialization.asset_key.to_user_string(): {k: v.value for k, v in ev.materialization.metadata.items()}
        for ev in result.get_asset_materialization_events()
    }


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        # Lease records change on every run (who held which step, when): bookkeeping, not output.
        if p.is_file() and ".scratch" not in p.parts and p.relative_to(root).parts[0] != "leases"
    }


def test_every_asset_materializes_and_every_check_passes(pipeline_run) -> None:
    result, _, shard = pipeline_run
    assert result.success
    assert sorted(_metadata(result)) == sorted(ASSETS)
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 6
    assert all(c.passed for c in checks), [(c.asset_key, c.check_name, c.metadata) for c in checks if not c.passed]


def test_every_media_object_ends_in_exactly_one_outcome(pipeline_run, corpus: Corpus) -> None:
    _, out, shard = pipeline_run
    store = LocalStore(out)
    items = _shard_items(corpus, shard)
    audio = pq.read_table(out / layout.audio_manifest_key(shard)).to_pylist()
    assert sorted(r["uri"] for r in audio) == sorted(uri_of(corpus, i.path) for i in items)
    for reconcile in (reconcile_audio, reconcile_vad, reconcile_features, reconcile_transcripts, reconcile_distilled):
        report = reconcile(store, shard)
        assert report.passed, (reconcile.__name__, report.problems)
    decoded = [r for r in audio if r["status"] == "decoded"]
    assert len(decoded) == sum(1 for i in items if not i.broken)


def test_broken_files_are_dead_lettered_with_their_reason(pipeline_run, corpus: Corpus) -> None:
    _, out, shard = pipeline_run
    dead = {r["uri"]: r for r in pq.read_table(out / layout.dead_letter_key("audio_wav", shard)).to_pylist()}
    broken = [i for i in _shard_items(corpus, shard) if i.broken]
    assert broken, "the busiest shard should hold at least one broken sample"
    for item in broken:
        row = dead[uri_of(corpus, item.path)]
        assert row["error_class"] == EXPECTED_ERRORS[item.broken]
        assert row["stage"] == "audio_wav"
        assert item.path in row["message"]  # the message names the item


def test_kept_transcripts_match_the_references(pipeline_run, corpus: Corpus) -> None:
    _, out, shard = pipeline_run
    files_jsonl = out / layout.files_key(shard, layout.current_build(LocalStore(out), shard))
    files = {json.loads(line)["uri"]: json.loads(line) for line in files_jsonl.read_text().splitlines()}
    refs, hyps = [], []
    for item in _shard_items(corpus, shard):
        row = files[uri_of(corpus, item.path)]
        if item.broken:
            assert row["outcome"] == "failed"
            continue
        assert row["outcome"] == "transcribed"
        starts = [s["start"] for s in row["segments"]]
        assert starts == sorted(starts)
        refs.append(normalize_text(item.text))
        hyps.append(normalize_text(row["text"]))
    assert jiwer.wer(refs, hyps) <= 0.3, list(zip(refs, hyps, strict=True))


def test_webdataset_shards_hold_audio_and_labels(pipeline_run) -> None:
    _, out, shard = pipeline_run
    manifest = {r["key"]: r for r in pq.read_table(out / layout.distilled_manifest_key(shard)).to_pylist()}
    assert manifest
    seen = {}
    for tar_key in sorted({r["tar_key"] for r in manifest.values()}):
        with tarfile.open(out / tar_key) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                seen.setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert sorted(seen) == sorted(manifest)
    for key, files in seen.items():
        sample = json.loads(files["json"])
        audio, rate = sf.read(io.BytesIO(files["flac"]))
        assert rate == 16_000 and audio.ndim == 1
        assert abs(len(audio) / rate - sample["duration"]) < 1e-3
        assert sample["text"] == manifest[key]["text"] and sample["text"].strip()
        assert sample["vad_model_sha256"] and sample["teacher_settings_hash"] and sample["prompt_version"]


def test_segments_respect_the_length_limit(pipeline_run) -> None:
    _, out, shard = pipeline_run
    for row in pq.read_table(out / layout.features_key(shard)).to_pylist():
        assert 0 < row["duration_s"] <= 30.0


def test_second_materialization_does_no_work(pipeline_run, corpus: Corpus) -> None:
    _, out, shard = pipeline_run
    before = _hashes(out)
    result = materialize_shard(corpus, out, shard)
    meta = _metadata(result)
    for asset in ASSETS:
        processed = {k: v for k, v in meta[asset].items() if k.endswith("_processed")}
        assert set(processed.values()) == {0}, (asset, processed)
    assert _hashes(out) == before


def test_dagster_cli_materializes_a_partition(corpus: Corpus, busiest_shard: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text(Path("dagster.yaml").read_text())
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "ASR_SOURCE_URI": str(corpus.media_dir),
        "ASR_OUTPUT_ROOT": str(tmp_path / "out"),
    }
    dagster = Path(sys.executable).parent / "dagster"
    proc = subprocess.run(
        [
            str(dagster),
            "asset",
            "materialize",
            "-m",
            "asr_assets.definitions",
            "--select",
            "group:asr",
            "--partition",
            busiest_shard,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    evaluations = [line for line in log.splitlines() if "ASSET_CHECK_EVALUATION" in line]
    assert len(evaluations) == 6 and all(line.rstrip().endswith("passed.") for line in evaluations), evaluations
    assert "RUN_SUCCESS" in log
    store = LocalStore(tmp_path / "out")
    assert reconcile_distilled(store, busiest_shard).passed
    assert store.exists(layout.files_key(busiest_shard, layout.current_build(store, busiest_shard)))


def test_tars_roll_over_and_rebuild_byte_identically(pipeline_run, tmp_path: Path) -> None:
    import shutil

    from asr_assets.distill import PackSettings, default_rules, distill_shard

    _, out, shard = pipeline_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    store = LocalStore(copy)
    first_build = layout.current_build(store, shard)
    result = distill_shard(store, shard, default_rules(), PackSettings(target_tar_bytes=100_000))
    # Other packing: another build, in a folder of its own; the first stays (grace period) and is no longer named.
    assert result.committed and result.previous == first_build != result.build_id
    tars = sorted((copy / "distilled" / shard / result.build_id).glob("*.tar"))
    assert result.report.totals["tars"] == len(tars) > 1
    keys = pq.read_table(copy / layout.distilled_manifest_key(shard))["key"].to_pylist()
    assert len(keys) == result.report.totals["kept"]
    assert (copy / "distilled" / shard / first_build / "000000.tar").exists()
    first = {p.name: p.read_bytes() for p in tars}
    # The same build again, from scratch (no pointer: nothing to compare with): the same bytes.
    shutil.rmtree(copy / "distilled" / shard / result.build_id)
    store.delete(layout.distilled_current_key(shard))
    again = distill_shard(store, shard, default_rules(), PackSettings(target_tar_bytes=100_000))
    assert again.build_id == result.build_id
    assert {
        p.name: p.read_bytes() for p in sorted((copy / "distilled" / shard / again.build_id).glob("*.tar"))
    } == first
    # Back to one big tar: the first build's id and bytes again; the smaller target's build goes after the grace.
    back = distill_shard(store, shard, default_rules(), PackSettings(), keep_builds_hours=0)
    assert back.build_id == first_build
    assert {p.name for p in (copy / "distilled" / shard / back.build_id).glob("*.tar")} == {"000000.tar"}
    assert not list(store.list(f"{layout.distilled_builds_prefix(shard)}{result.build_id}/"))
