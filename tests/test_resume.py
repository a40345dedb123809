"""Resuming after a crash between two writes: no item runs twice, none ends with two outcomes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from asr_assets import layout
from asr_assets.checks import reconcile_audio, reconcile_features, reconcile_vad
from asr_assets.records import AUDIO_SCHEMA, VAD_MEDIA_SCHEMA
from asr_assets.sample_corpus import Corpus
from asr_assets.stages import DecodeSettings, PoolSettings, decode_shard, features_shard, vad_shard
from asr_assets.stages import PackSettings as AudioPackSettings
from asr_assets.vad import VadParams, silero_model_path
from resources.storage import LocalStore, read_table, write_table

POOL = PoolSettings(workers=2, timeout_s=120)


def _copy(pipeline_run, tmp_path: Path) -> tuple[LocalStore, str]:
    _, out, shard = pipeline_run
    shutil.copytree(out, tmp_path / "out")
    return LocalStore(tmp_path / "out"), shard


def test_vad_crash_after_segments_before_media_outcomes(pipeline_run, tmp_path: Path) -> None:
    store, shard = _copy(pipeline_run, tmp_path)
    media = read_table(store, layout.vad_media_key(shard), VAD_MEDIA_SCHEMA)
    victim = media["media_id"][0].as_py()
    before = pq.read_table(store.local_path(layout.segments_key(shard)))
    # The crash: segments were written, the media outcome for `victim` was not.
    write_table(store, layout.vad_media_key(shard), media.filter(pc.not_equal(media["media_id"], victim)))
    report = vad_shard(store, shard, VadParams(), silero_model_path(), POOL)
    assert report.processed == 1
    after = pq.read_table(store.local_path(layout.segments_key(shard)))
    assert sorted(after["segment_id"].to_pylist()) == sorted(before["segment_id"].to_pylist())
    assert reconcile_vad(store, shard).passed
    features_shard(store, shard, AudioPackSettings(), POOL)  # nothing new, nothing doubled
    assert reconcile_features(store, shard).passed


def test_decode_crash_after_dead_letters_before_manifest(pipeline_run, corpus: Corpus, tmp_path: Path) -> None:
    store, shard = _copy(pipeline_run, tmp_path)
    manifest = read_table(store, layout.audio_manifest_key(shard), AUDIO_SCHEMA)
    failed = manifest.filter(pc.equal(manifest["status"], "failed"))
    assert failed.num_rows
    # The crash: dead letters were written, the manifest rows of the failed items were not.
    write_table(store, layout.audio_manifest_key(shard), manifest.filter(pc.equal(manifest["status"], "decoded")))
    report = decode_shard(LocalStore(corpus.media_dir), store, shard, DecodeSettings(1 << 30, 3600.0), POOL)
    assert report.processed == 0
    assert reconcile_audio(store, shard).passed
