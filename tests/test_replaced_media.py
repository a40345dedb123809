"""A replaced object end to end: the whole graph on one shard, the object replaced under the same name, the graph
again. The new version is processed as new media; the old version's samples leave the dataset (``superseded``)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from asr_assets import layout
from asr_assets.sample_corpus import Corpus
from partitions import NUM_SHARDS, shard_of
from resources.storage import LocalStore
from tests.conftest import materialize_shard


def test_a_replaced_object_is_processed_again_and_its_old_samples_retired(corpus: Corpus, tmp_path: Path) -> None:
    good = [item.path for item in corpus.items if not item.broken]
    src = tmp_path / "media"
    src.mkdir()
    name = "talk.wav"
    shutil.copy(corpus.media_dir / good[0], src / name)
    shard = shard_of(LocalStore(src).uri_of(name), NUM_SHARDS)
    mine = dataclasses.replace(corpus, media_dir=src)
    out = tmp_path / "out"
    assert materialize_shard(mine, out, shard).success
    store = LocalStore(out)
    (old,) = layout.read_index(store, shard).to_pylist()
    old_samples = pq.read_table(out / layout.distilled_manifest_key(shard)).to_pylist()
    assert old_samples and {s["media_id"] for s in old_samples} == {old["media_id"]}

    shutil.copy(corpus.media_dir / good[1], src / name)  # another recording under the same name
    result = materialize_shard(mine, out, shard)
    assert result.success
    assert all(c.passed for c in result.get_asset_check_evaluations())
    index = layout.read_index(store, shard).to_pylist()
    assert [r["uri"] for r in index] == [old["uri"]] * 2
    new = index[1]
    assert new["media_id"] != old["media_id"] and layout.retired_media(layout.read_index(store, shard)) == {
        old["media_id"]
    }
    samples = pq.read_table(out / layout.distilled_manifest_key(shard)).to_pylist()
    assert samples and {s["media_id"] for s in samples} == {new["media_id"]}
    build = layout.current_build(store, shard)
    files = {
        r["media_id"]: r
        for r in map(
            json.loads,
            (out / layout.files_key(shard, build)).read_text().splitlines(),
        )
    }
    assert files[old["media_id"]]["outcome"] == "superseded" and files[old["media_id"]]["failure"] is None
    assert files[new["media_id"]]["outcome"] == "transcribed"
    decisions = pq.read_table(out / layout.decisions_key(shard, build)).to_pylist()
    assert {d["drop_reason"] for d in decisions if d["media_id"] == old["media_id"]} == {"superseded"}
    assert {s["status"] for s in files[old["media_id"]]["segments"]} == {"dropped:superseded"}


def test_a_version_replaced_before_decoding_is_superseded_not_decoded_from_the_new_bytes(
    corpus: Corpus, tmp_path: Path
) -> None:
    from asr_assets.checks import reconcile_audio
    from asr_assets.records import AUDIO_SCHEMA
    from asr_assets.stages import DecodeSettings, PoolSettings, build_index, decode_shard
    from resources.storage import read_table

    good = [item.path for item in corpus.items if not item.broken]
    src = tmp_path / "media"
    src.mkdir()
    shutil.copy(corpus.media_dir / good[0], src / "talk.wav")
    source, out = LocalStore(src), LocalStore(tmp_path / "out")
    shard = shard_of(source.uri_of("talk.wav"), NUM_SHARDS)
    build_index(source, out, shard, NUM_SHARDS)
    shutil.copy(corpus.media_dir / good[1], src / "talk.wav")  # replaced before audio_wav ever ran
    build_index(source, out, shard, NUM_SHARDS)
    old, new = layout.read_index(out, shard).to_pylist()
    decode_shard(source, out, shard, DecodeSettings(1 << 30, 3600.0), PoolSettings(workers=1, timeout_s=120))
    rows = {r["media_id"]: r for r in read_table(out, layout.audio_manifest_key(shard), AUDIO_SCHEMA).to_pylist()}
    assert rows[old["media_id"]]["status"] == "superseded" and rows[old["media_id"]]["audio_key"] is None
    assert rows[new["media_id"]]["status"] == "decoded"
    assert layout.read_dead_letters(out, "audio_wav", shard).num_rows == 0
    assert reconcile_audio(out, shard).passed
