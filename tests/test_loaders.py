"""The WebDataset shards load with the libraries trainers use: `webdataset` and Hugging Face `datasets`."""

from __future__ import annotations

import io
import json

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from asr_assets import layout


def _manifest(pipeline_run) -> tuple[dict[str, dict], list[str]]:
    _, out, shard = pipeline_run
    rows = {r["key"]: r for r in pq.read_table(out / layout.distilled_manifest_key(shard)).to_pylist()}
    tars = sorted({str(out / r["tar_key"]) for r in rows.values()})
    return rows, tars


def _decode_flac(data: bytes) -> tuple[np.ndarray, int]:
    """With PyAV, as a trainer without libsndfile would."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
        return samples, stream.rate


def test_webdataset_library_reads_audio_and_text(pipeline_run) -> None:
    wds = pytest.importorskip("webdataset")
    manifest, tars = _manifest(pipeline_run)
    seen = {}
    for sample in wds.WebDataset(tars, shardshuffle=False):
        meta = json.loads(sample["json"])
        audio, rate = sf.read(io.BytesIO(sample["flac"]))
        assert rate == 16_000 and abs(len(audio) / rate - meta["duration"]) < 1e-3
        seen[sample["__key__"]] = meta["text"]
    assert seen == {key: row["text"] for key, row in manifest.items()}


def test_hugging_face_datasets_loads_the_shards(pipeline_run, tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    manifest, tars = _manifest(pipeline_run)
    # Audio is kept as bytes: the Audio feature needs torchcodec, whose PyPI build needs a CUDA torch (README).
    features = datasets.Features(
        {
            "__key__": datasets.Value("string"),
            "__url__": datasets.Value("string"),
            "flac": datasets.Value("binary"),
            "json": {
                "text": datasets.Value("string"),
                "duration": datasets.Value("float64"),
                "source_uri": datasets.Value("string"),
                "teacher_model": datasets.Value("string"),
            },
        }
    )
    ds = datasets.load_dataset(
        "webdataset", data_files={"train": tars}, split="train", features=features, cache_dir=str(tmp_path / "hf-cache")
    )
    assert ds.num_rows == len(manifest)
    for row in ds:
        expected = manifest[row["__key__"]]
        assert row["json"]["text"] == expected["text"]
        assert row["json"]["source_uri"] == expected["source_uri"]
        audio, rate = _decode_flac(row["flac"])
        assert rate == 16_000 and abs(len(audio) / rate - expected["duration"]) < 1e-3
        assert np.abs(audio).max() > 0.01
