"""DNSMOS benchmark: the cost of scoring segments with ``asr_assets.dnsmos`` on one thread, unbatched and batched.

Speech from the generated sample corpus, decoded to 16 kHz, cut two ways: the segments the pipeline's VAD defaults
produce (mostly shorter than the model's 9.01 s window, so each costs one tiled window), and 30 s chunks of all the
speech end to end (the longest segment, 4 windows each). Then the same windows are fed 1, 2, 4 and 8 per
onnxruntime call. Timed in CPU seconds of this process (one intra-op thread). The last line printed is one JSON object:
``{"x_realtime_per_core_segments": .., "x_realtime_per_core_30s": .., "ms_per_window": {"1": .., ...},
"batched_speedup": ..}`` (x realtime = seconds of segment audio scored per CPU second; ``batched_speedup``: the best
batch size's time per window against one window per call).

    .venv/bin/python bench/dnsmos.py [--files 20] [--batches 1,2,4,8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from asr_assets.dnsmos import Dnsmos, model_path, windows
from asr_assets.media import DecodeJob, decode_media, read_audio
from asr_assets.records import SAMPLE_RATE
from asr_assets.sample_corpus import generate_corpus
from asr_assets.vad import SileroVad, VadParams, merge_spans, silero_model_path, speech_timestamps

CHUNK_S = 30.0


def cpu() -> float:
    return time.process_time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--batches", default="1,2,4,8")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        corpus = generate_corpus(tmp / "corpus", num_files=args.files, include_broken=False)
        audios = []
        for i, item in enumerate(corpus.items):
            decode_media(DecodeJob("b", item.path, corpus.media_dir / item.path, tmp / f"{i}.flac", 1 << 40, 1e9))
            audios.append(read_audio(tmp / f"{i}.flac"))
    vad, params = SileroVad(silero_model_path()), VadParams()
    segments = [
        audio[start:end]
        for audio in audios
        for start, end in merge_spans(speech_timestamps(vad.speech_probs(audio), audio.shape[0], params), params)
    ]
    speech = np.concatenate(segments)
    step = int(CHUNK_S * SAMPLE_RATE)
    chunks = [speech[i : i + step] for i in range(0, speech.shape[0] - step + 1, step)]

    model = Dnsmos(model_path())
    model.score(segments[0])  # session warm-up
    results = {}
    for name, clips in (("segments", segments), ("30s", chunks)):
        audio_s = sum(c.shape[0] for c in clips) / SAMPLE_RATE
        start = cpu()
        for clip in clips:
            model.score(clip)
        seconds = cpu() - start
        count = sum(windows(c).shape[0] for c in clips)
        print(f"{name}: {len(clips)} clips, {audio_s / 60:.1f} min, {count} windows, {seconds:.1f} CPU s")
        results[f"x_realtime_per_core_{name}"] = round(audio_s / seconds, 1)

    inputs = np.concatenate([windows(c) for c in chunks])
    per_window = {}
    for batch in batches:
        batched = Dnsmos(model_path(), batch_windows=batch)
        batched.raw(inputs[:batch])  # warm-up: the first call sizes the session's buffers
        start = cpu()
        batched.raw(inputs)
        per_window[str(batch)] = round(1000 * (cpu() - start) / inputs.shape[0], 1)
        print(f"batch {batch}: {per_window[str(batch)]} ms per window ({inputs.shape[0]} windows)")
    results["ms_per_window"] = per_window
    results["batched_speedup"] = round(per_window["1"] / min(per_window.values()), 2) if "1" in per_window else None
    print(json.dumps(results))


if __name__ == "__main__":
    main()
