"""The faster-whisper teacher: one call per segment vs shared 30-s windows, and threads vs replicas.

On real speech (Asterisk prompts from Debian packages, ``asr_assets.real_speech``), Whisper tiny.en, beam 5, through
the production ``FasterWhisperTeacher``:

- ``solo``: one window per segment (``pack_window_s`` 0); ``packed``: the segments packed into 30-s windows as the
  transcripts stage cuts them (``pack_windows``), words assigned back by timestamps. Both on every core (one
  single-threaded replica per core). WER of each against the references.
- ``threads``: the same packed windows on one replica with every core as intra-op threads (CTranslate2's usual setup,
  and faster-whisper's default) against ``replicas``, one single-threaded replica per core fed in parallel.

The two sides of each comparison alternate over ``--repeat`` rounds; min and median seconds. Prints one JSON line.

    .venv/bin/python bench/teacher_windows.py [--prompts 48] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jiwer  # noqa: E402

from asr_assets.distill import canonical_text  # noqa: E402
from asr_assets.real_speech import asterisk_utterances, select  # noqa: E402
from resources.teachers.base import TeacherInput, TeacherSettings, create_engine, pack_windows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("data/cache-debs"))
    args = parser.parse_args()
    utts = select(asterisk_utterances(args.cache.resolve(), "en"), args.prompts)
    windows = pack_windows([u.audio.shape[0] / 16000 for u in utts], 30.0)
    window_of = {k: f"w{n}" for n, w in enumerate(windows) for k in w}
    packed = [TeacherInput(u.uid, u.audio, "en", window_of[k]) for k, u in enumerate(utts)]
    cores = len(os.sched_getaffinity(0))
    engines = {
        "solo": create_engine("faster-whisper", TeacherSettings(language="en", options={"pack_window_s": 0})),
        "packed": create_engine("faster-whisper", TeacherSettings(language="en")),
        "threads": create_engine("faster-whisper", TeacherSettings(language="en", threads=1)),
    }
    # One replica, every core as intra-op threads: what CTranslate2 does by default.
    import ctranslate2

    from resources.teachers.whisper import shipped_model_path

    model, _ = engines["threads"]._model_for("en")
    model.model = ctranslate2.models.Whisper(
        str(shipped_model_path()), device="cpu", compute_type="int8", intra_threads=cores
    )
    times: dict[str, list[float]] = {"solo": [], "packed": [], "threads": [], "replicas": []}
    texts: dict[str, list[str]] = {}
    for engine in engines.values():  # warm-up: first-call allocations out of the timings
        engine.transcribe(packed[:2])
    for round_ in range(args.repeat):
        pairs = [
            [("solo", engines["solo"]), ("packed", engines["packed"])],
            [("threads", engines["threads"]), ("replicas", engines["packed"])],
        ]
        for pair in pairs:
            for name, engine in pair if round_ % 2 == 0 else pair[::-1]:  # alternate which goes first
                started = time.perf_counter()
                labels = engine.transcribe(packed)
                times[name].append(time.perf_counter() - started)
                if name in ("solo", "packed"):
                    texts[name] = [r.text for r in labels]
    truth = [canonical_text(u.text) for u in utts]

    def wer(name: str) -> float:
        return round(jiwer.wer(truth, [canonical_text(t) or "-" for t in texts[name]]), 4)

    summary = {k: {"min": round(min(v), 2), "median": round(statistics.median(v), 2)} for k, v in times.items()}
    print(
        json.dumps(
            {
                "segments": len(utts),
                "windows": len(windows),
                "audio_s": round(sum(u.audio.shape[0] for u in utts) / 16000, 1),
                "cores": cores,
                "seconds": summary,
                "packed_speedup": round(summary["solo"]["median"] / summary["packed"]["median"], 2),
                "replicas_speedup_vs_threads": round(summary["threads"]["median"] / summary["replicas"]["median"], 2),
                "wer_solo": wer("solo"),
                "wer_packed": wer("packed"),
            }
        )
    )


if __name__ == "__main__":
    main()
