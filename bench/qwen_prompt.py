"""Prompt overhead of the Qwen3-Omni teacher per second of audio, for VAD segments as cut and as merged.

Runs the real vLLM engine (its CPU build, ``make test-vllm``'s environment) on the tiny random-weight Qwen3-Omni of the
tests, through the production ``VllmTeacher``: the prompt is rendered by the model's processor and its audio
placeholder expanded by vLLM, so the audio tokens per second are the real model's. It measures the prompt tokens of one
request per segment length, fits ``tokens = template + rate * seconds``, and applies that to the segment lengths of a
real run (``--vad-root``: an output root whose ``vad_segments`` tables to read) as cut (``merge_gap_s`` 0) and as
``vad_segments`` merges them for a vLLM teacher. It also times the engine on the same audio cut both ways (the tiny
model's compute is negligible, so this is the per-request cost of the engine itself; one output token per request,
since the text to decode is the same however the audio is cut).

    .venv-vllm/bin/python bench/qwen_prompt.py --vad-root data/bench-e2e/out

The template here is tokenized by the tiny model's byte-level tokenizer (one token per byte): the real model's BPE
needs fewer, so the template share printed is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from asr_assets.vad import VadParams, merge_spans  # noqa: E402
from resources.teachers.base import SAMPLE_RATE, TeacherInput, TeacherSettings, create_engine  # noqa: E402
from resources.teachers.vllm_engine import VllmEngineSettings, VllmOptions, VllmSamplingSettings  # noqa: E402
from tests.tiny_qwen3_omni import build_tiny_qwen3_omni  # noqa: E402


def segment_lengths(vad_root: Path, merge_gap_s: float) -> list[float]:
    """Segment lengths in seconds of every file in ``vad_root``'s vad_segments tables, merged with ``merge_gap_s``."""
    lengths = []
    params = VadParams(merge_gap_s=merge_gap_s)
    for table in sorted((vad_root / "vad_segments").glob("shard-*[0-9].parquet")):
        rows = pq.read_table(table, columns=["media_id", "start_s", "end_s"]).to_pylist()
        by_media: dict[str, list[tuple[int, int]]] = {}
        for r in rows:
            by_media.setdefault(r["media_id"], []).append(
                (round(r["start_s"] * SAMPLE_RATE), round(r["end_s"] * SAMPLE_RATE))
            )
        for spans in by_media.values():
            lengths += [(e - s) / SAMPLE_RATE for s, e in merge_spans(sorted(spans), params)]
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vad-root", type=Path, required=True)
    parser.add_argument("--merge-gap-s", type=float, default=1.0)
    args = parser.parse_args()

    model = build_tiny_qwen3_omni(Path(tempfile.mkdtemp(prefix="tiny-qwen3-omni-")))
    engine_settings = VllmEngineSettings(
        enforce_eager=True, max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=4096
    )
    options = VllmOptions(
        engine_settings, VllmSamplingSettings(max_tokens_base=1, max_tokens_per_second=0.0)
    ).as_options()
    teacher = create_engine("vllm", TeacherSettings(model=str(model), language="en", options=options))
    rng = np.random.default_rng(0)

    probe = [2.0, 5.0, 10.0, 20.0, 30.0]
    tokens = []
    for seconds in probe:
        before = teacher.stats.prompt_tokens
        teacher.transcribe(
            [TeacherInput("p", rng.standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32) * 0.1, "en")]
        )
        tokens.append(teacher.stats.prompt_tokens - before)
    rate, template = np.polyfit(probe, tokens, 1)

    result = {"template_tokens": round(float(template), 1), "audio_tokens_per_s": round(float(rate), 2)}
    for name, gap in (("as_cut", 0.0), ("merged", args.merge_gap_s)):
        lengths = segment_lengths(args.vad_root, gap)
        audio_s = sum(lengths)
        prompt = sum(template + rate * s for s in lengths)
        clips = [rng.standard_normal(int(s * SAMPLE_RATE)).astype(np.float32) * 0.1 for s in lengths]
        started = time.perf_counter()
        for k in range(0, len(clips), 64):
            teacher.transcribe([TeacherInput(f"s{k + j}", c, "en") for j, c in enumerate(clips[k : k + 64])])
        seconds = time.perf_counter() - started
        result[name] = {
            "segments": len(lengths),
            "mean_s": round(audio_s / max(len(lengths), 1), 2),
            "prompt_tokens_per_audio_s": round(prompt / max(audio_s, 1e-9), 2),
            "template_share": round(len(lengths) * template / max(prompt, 1e-9), 3),
            "engine_s_per_audio_min": round(60 * seconds / max(audio_s, 1e-9), 3),
        }
    result["prompt_tokens_ratio_merged_vs_cut"] = round(
        result["merged"]["prompt_tokens_per_audio_s"] / result["as_cut"]["prompt_tokens_per_audio_s"], 3
    )
    teacher.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
