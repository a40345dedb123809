"""Decode benchmark: the project's in-process PyAV decoder against one ``ffmpeg`` CLI process per file.

Both paths decode the same generated files (every sample-corpus container, plus long files) to 16 kHz mono in the same
run, one file at a time on one core, and are timed in CPU seconds (this process plus its children), so the ratio holds
on a noisy shared machine. The last line printed is one JSON object:
``{"x_realtime_per_core": .., "speedup_vs_ffmpeg_cli": .., "short_file_ms": ..}``.

    .venv/bin/python bench/decode.py [--files 14] [--long-minutes 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import ffmpeg
import numpy as np
import soundfile as sf

from asr_assets.media import DecodeJob, decode_media
from asr_assets.sample_corpus import generate_corpus


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def decode_pyav(src: Path, dst: Path) -> float:
    result = decode_media(DecodeJob("bench", str(src), src, dst, 1 << 40, 1e9))
    assert result.error_class is None, result.error
    return result.duration_s


def decode_cli(src: Path, dst: Path) -> float:
    """The alternative design: one ffmpeg process per file (ffmpeg-python builds the argument list, no shell), float32
    PCM back on a pipe, then the same 16-bit FLAC written as the project writes it, so both produce the same output."""
    out, _ = (
        ffmpeg.input(str(src))
        .output("pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=16000)
        .global_args("-nostdin", "-hide_banner", "-loglevel", "error")
        .run(capture_stdout=True, capture_stderr=True)
    )
    audio = np.frombuffer(out, dtype=np.float32)
    sf.write(dst, np.clip(audio, -1.0, 1.0), 16000, format="FLAC", subtype="PCM_16")
    return audio.shape[0] / 16000


def make_long(src: Path, minutes: float, dst: Path) -> None:
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-stream_loop",
            "-1",
            "-i",
            str(src),
            "-t",
            str(minutes * 60),
            "-c:a",
            "libmp3lame",
            str(dst),
        ],
        check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=14, help="short files (two of each container by default)")
    parser.add_argument("--long-minutes", type=float, default=10.0, help="length of each long file")
    parser.add_argument("--repeat", type=int, default=3, help="passes over the set per path (best is kept)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        corpus = generate_corpus(tmp / "corpus", num_files=args.files, include_broken=False)
        files = [corpus.media_dir / item.path for item in corpus.items]
        long_mp3 = tmp / "long.mp3"
        make_long(files[0], args.long_minutes, long_mp3)
        long_m4a = tmp / "long.m4a"
        subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(long_mp3), str(long_m4a)], check=True
        )
        files += [long_mp3, long_m4a]

        def run(path_fn) -> tuple[float, float]:
            best_cpu, audio_s = float("inf"), 0.0
            for _ in range(args.repeat):
                start = cpu_seconds()
                audio_s = sum(path_fn(f) for f in files)
                best_cpu = min(best_cpu, cpu_seconds() - start)
            return best_cpu, audio_s

        pyav_cpu, pyav_audio = run(lambda f: decode_pyav(f, tmp / "out.flac"))
        cli_cpu, cli_audio = run(lambda f: decode_cli(f, tmp / "out-cli.flac"))
        assert abs(pyav_audio - cli_audio) < 0.1 * len(files), (pyav_audio, cli_audio)

        short = files[0]
        walls = []
        for _ in range(20):
            start = time.perf_counter()
            decode_pyav(short, tmp / "short.flac")
            walls.append(time.perf_counter() - start)
        short_cli = []
        for _ in range(20):
            start = time.perf_counter()
            decode_cli(short, tmp / "short-cli.flac")
            short_cli.append(time.perf_counter() - start)

    print(f"files: {len(files)}, audio: {pyav_audio / 60:.1f} min")
    print(f"CPU seconds to 16 kHz FLAC: pyav in-process {pyav_cpu:.2f}, one ffmpeg process per file {cli_cpu:.2f}")
    print(
        f"short file ({short.name}): pyav {statistics.median(walls) * 1000:.1f} ms, "
        f"ffmpeg CLI {statistics.median(short_cli) * 1000:.1f} ms"
    )
    print(
        json.dumps(
            {
                "x_realtime_per_core": round(pyav_audio / pyav_cpu, 1),
                "speedup_vs_ffmpeg_cli": round(cli_cpu / pyav_cpu, 2),
                "short_file_ms": round(statistics.median(walls) * 1000, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
