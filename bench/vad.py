"""VAD benchmark: the project's VAD against silero-vad's own ``get_speech_timestamps`` (ONNX) on the same audio.

Needs torch for the reference path (silero-vad's module imports it), so it runs in the bench environment:
``make bench-env`` then ``.venv-bench/bin/python bench/vad.py [--files 20] [--long-minutes 10] [--repeat 5]``. Both
paths run on one thread in this process over the same decoded audio, ``--repeat`` times each, alternating which goes
first, timed in CPU seconds (and wall seconds); min and median of each are reported, and the ratios (stock / ours) use
the same run's figures. ``identical`` is true when every timestamp of every file, for every parameter set, matches
the stock function exactly, and the per-window probabilities match its ONNX model's window by window. The last line
printed is one JSON object: ``{"x_realtime_per_core", "speedup_vs_silero_min", "speedup_vs_silero_median",
"ours_cpu_s", "silero_cpu_s", "identical", ...}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from silero_vad import get_speech_timestamps, load_silero_vad

from asr_assets.media import DecodeJob, decode_media, read_audio
from asr_assets.sample_corpus import generate_corpus
from asr_assets.vad import SileroVad, VadParams, silero_model_path, speech_timestamps

PARAM_SETS = [
    VadParams(),  # the project's defaults
    VadParams(min_silence_ms=100, speech_pad_ms=30),  # silero-vad's defaults, but splitting at 30 s
    VadParams(threshold=0.3, min_speech_ms=100, min_silence_ms=200, speech_pad_ms=0, max_segment_s=8.0),
]


def stock_kwargs(p: VadParams) -> dict:
    return {
        "threshold": p.threshold,
        "neg_threshold": p.neg_threshold,
        "min_speech_duration_ms": p.min_speech_ms,
        "min_silence_duration_ms": p.min_silence_ms,
        "speech_pad_ms": p.speech_pad_ms,
        "max_speech_duration_s": p.max_segment_s,
        "min_silence_at_max_speech": p.min_silence_at_max_speech_ms,
        "sampling_rate": 16000,
    }


def cpu() -> float:
    return time.process_time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--long-minutes", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=5, help="timed passes over all the audio per path")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        corpus = generate_corpus(tmp / "corpus", num_files=args.files, include_broken=False)
        audios = []
        for item in corpus.items:
            dst = tmp / f"{len(audios)}.flac"
            decode_media(DecodeJob("b", item.path, corpus.media_dir / item.path, dst, 1 << 40, 1e9))
            audios.append(read_audio(dst))
        long_src = tmp / "long.mp3"
        subprocess.run(
            [
                "ffmpeg",
                "-nostdin",
                "-loglevel",
                "error",
                "-y",
                "-stream_loop",
                "-1",
                "-i",
                str(corpus.media_dir / corpus.items[0].path),
                "-t",
                str(args.long_minutes * 60),
                str(long_src),
            ],
            check=True,
        )
        decode_media(DecodeJob("b", "long", long_src, tmp / "long.flac", 1 << 40, 1e9))
        audios.append(read_audio(tmp / "long.flac"))
    audio_s = sum(a.shape[0] for a in audios) / 16000

    stock_model = load_silero_vad(onnx=True)
    ours = SileroVad(silero_model_path())

    def run_stock() -> list:
        return [get_speech_timestamps(torch.from_numpy(a), stock_model, **stock_kwargs(PARAM_SETS[0])) for a in audios]

    def run_ours() -> list:
        return [speech_timestamps(ours.speech_probs(a), a.shape[0], PARAM_SETS[0]) for a in audios]

    paths = {"silero": run_stock, "ours": run_ours}
    cpu_s: dict[str, list[float]] = {name: [] for name in paths}
    wall_s: dict[str, list[float]] = {name: [] for name in paths}
    outputs: dict[str, list] = {}
    for r in range(args.repeat):
        for name in list(paths)[:: 1 if r % 2 == 0 else -1]:
            start, start_wall = cpu(), time.perf_counter()
            outputs[name] = paths[name]()
            cpu_s[name].append(cpu() - start)
            wall_s[name].append(time.perf_counter() - start_wall)
    stock, mine = outputs["silero"], outputs["ours"]

    identical = all([(s["start"], s["end"]) for s in st] == m for st, m in zip(stock, mine, strict=True))
    for params in PARAM_SETS[1:]:
        for a in audios[:-1]:
            ref = [
                (s["start"], s["end"])
                for s in get_speech_timestamps(torch.from_numpy(a), stock_model, **stock_kwargs(params))
            ]
            identical &= ref == speech_timestamps(ours.speech_probs(a), a.shape[0], params)
    # Window probabilities of the stock ONNX wrapper, as get_speech_timestamps computes them.
    for a in audios[:5]:
        stock_model.reset_states()
        padded = np.pad(a, (0, -a.shape[0] % 512))
        ref = np.array(
            [stock_model(torch.from_numpy(padded[i : i + 512]), 16000).item() for i in range(0, padded.shape[0], 512)],
            np.float32,
        )
        identical &= bool(np.array_equal(ref, ours.speech_probs(a)))

    def summary(values: list[float]) -> dict:
        return {"min": round(min(values), 3), "median": round(statistics.median(values), 3)}

    print(f"audio: {audio_s / 60:.1f} min in {len(audios)} files, {args.repeat} passes per path")
    print(f"CPU s min/median: silero stock {summary(cpu_s['silero'])}, ours {summary(cpu_s['ours'])}")
    print(
        json.dumps(
            {
                "audio_s": round(audio_s, 1),
                "repeat": args.repeat,
                "x_realtime_per_core": round(audio_s / min(cpu_s["ours"]), 1),
                "speedup_vs_silero_min": round(min(cpu_s["silero"]) / min(cpu_s["ours"]), 2),
                "speedup_vs_silero_median": round(
                    statistics.median(cpu_s["silero"]) / statistics.median(cpu_s["ours"]), 2
                ),
                "ours_cpu_s": summary(cpu_s["ours"]),
                "silero_cpu_s": summary(cpu_s["silero"]),
                "ours_wall_s": summary(wall_s["ours"]),
                "silero_wall_s": summary(wall_s["silero"]),
                "identical": bool(identical),
            }
        )
    )


if __name__ == "__main__":
    main()
