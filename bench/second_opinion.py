"""Second-opinion cost: the second engine against the teacher on the same pipeline segments, in the same run.

Builds one shard of the sample corpus through the CPU chain (decode, VAD, features), then labels its segments with the
CPU teacher (Whisper tiny.en, its default beam) and with the second opinion (Whisper base multilingual) at each beam
size asked for, timing each engine's ``transcribe`` calls only (models are loaded first). The last line printed is one
JSON object: ``{"segments": .., "audio_s": .., "teacher": {"segments_per_s": .., "x_realtime": ..}, "second_beam1":
{..., "mean_disagreement": ..}, ...}``.

    .venv/bin/python bench/second_opinion.py [--files 12] [--beams 1,5] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from asr_assets import layout
from asr_assets.media import read_audio
from asr_assets.records import FEATURE_SCHEMA, SAMPLE_RATE
from asr_assets.sample_corpus import generate_corpus
from asr_assets.second_opinion import disagreement
from asr_assets.stages import (
    DecodeSettings,
    PackSettings,
    PoolSettings,
    build_index,
    decode_shard,
    features_shard,
    vad_shard,
)
from asr_assets.vad import VadParams, silero_model_path
from resources.storage import LocalStore, read_table
from resources.teachers import DEFAULT_SECOND_OPINION, TeacherResource
from resources.teachers.base import TeacherEngine, TeacherInput, TeacherSettings, create_engine


def segments(media: Path, out: Path) -> list[TeacherInput]:
    """The featured segments of a one-shard run of the CPU chain, as teacher inputs in storage order."""
    source, store, shard = LocalStore(media), LocalStore(out), "shard-00000"
    pool = PoolSettings(workers=2, timeout_s=600)
    build_index(source, store, shard, 1)
    decode_shard(source, store, shard, DecodeSettings(1 << 40, 1e9), pool)
    vad_shard(store, shard, VadParams(), silero_model_path(), pool)
    features_shard(store, shard, PackSettings(), pool)
    rows = read_table(store, layout.features_key(shard), FEATURE_SCHEMA).to_pylist()
    return [
        TeacherInput(
            r["segment_id"], read_audio(store.local_path(r["audio_key"]), r["audio_offset"], r["audio_frames"]), "en"
        )
        for r in rows
    ]


def timed(engine: TeacherEngine, inputs: list[TeacherInput]) -> tuple[list[str], dict]:
    started = time.perf_counter()
    results = engine.transcribe(inputs)
    seconds = time.perf_counter() - started
    audio_s = sum(len(i.audio) for i in inputs) / SAMPLE_RATE
    texts = [r.text if hasattr(r, "text") else "" for r in results]
    rates = {"seconds": round(seconds, 2), "segments_per_s": round(len(inputs) / seconds, 3)}
    return texts, rates | {"x_realtime": round(audio_s / seconds, 1), "model_id": engine.model_id}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--beams", default="1,5", help="second-opinion beam sizes to measure")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        corpus = generate_corpus(tmp / "corpus", num_files=args.files, include_broken=False)
        inputs = segments(corpus.media_dir, tmp / "out")
    default = TeacherResource(threads=args.threads)
    teacher = create_engine(default.engine, default.settings())
    teacher.transcribe(inputs[:1])  # warm-up: first-call allocations are not the steady state
    reference, result = timed(teacher, inputs)
    teacher.close()
    summary: dict = {
        "segments": len(inputs),
        "audio_s": round(sum(len(i.audio) for i in inputs) / SAMPLE_RATE, 1),
        "teacher": result,
    }
    engine_name, _, model = DEFAULT_SECOND_OPINION.partition(":")
    for beam in (int(b) for b in args.beams.split(",")):
        second = create_engine(engine_name, TeacherSettings(model=model, beam_size=beam, threads=args.threads))
        second.transcribe(inputs[:1])
        texts, result = timed(second, inputs)
        second.close()
        scores = [disagreement(ref, hyp, "en") for ref, hyp in zip(reference, texts, strict=True)]
        result["mean_disagreement"] = round(sum(scores) / len(scores), 4)
        result["cost_vs_teacher"] = round(result["seconds"] / summary["teacher"]["seconds"], 2)
        summary[f"second_beam{beam}"] = result
        print(f"beam {beam}: " + ", ".join(f"{s:.2f}" for s in sorted(scores, reverse=True)[:8]), "(worst 8)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
