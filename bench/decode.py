"""Decode benchmark: the project's decode path (``asr_assets.media.decode_media``, what ``audio_wav`` runs in its
workers: PyAV in-process, 16 kHz mono 16-bit FLAC) against one ``ffmpeg`` CLI process per file.

Both paths decode the same generated files to 16 kHz mono in the same run, one file at a time on one core. Short files
(the sample corpus, two per container by default) and long files (an mp3 and an m4a of ``--long-minutes``) are
measured separately. Each pass over a group is repeated ``--repeat`` times, the two paths alternating which goes first,
and timed in CPU seconds of this process plus its children (the CLI processes) and in wall seconds; min and median are
reported, and the ratios (CLI / ours) use the CPU seconds of the same run.

The decoded PCM is compared too: ours (read back from its FLAC) against the CLI's float32 PCM (sample-count difference,
worst max abs difference, worst SNR of the difference), and against the CLI's PCM written through the same 16-bit
FLAC writer (files bit-identical after that quantization). The CLI is the system ffmpeg, PyAV bundles its own FFmpeg
build, so small decoder differences between the versions show up here. The last line printed is one JSON object.

    .venv/bin/python bench/decode.py [--files 14] [--long-minutes 10] [--repeat 5]
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

from asr_assets.media import DecodeJob, decode_media, read_audio
from asr_assets.sample_corpus import generate_corpus


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def decode_ours(src: Path, dst: Path) -> float:
    result = decode_media(DecodeJob("bench", str(src), src, dst, 1 << 40, 1e9))
    assert result.error_class is None, result.error
    return result.duration_s


def cli_pcm(src: Path) -> np.ndarray:
    """The ffmpeg CLI's 16 kHz mono float32 PCM of ``src`` (ffmpeg-python builds the argument list, no shell)."""
    out, _ = (
        ffmpeg.input(str(src))
        .output("pipe:", format="f32le", acodec="pcm_f32le", ac=1, ar=16000)
        .global_args("-nostdin", "-hide_banner", "-loglevel", "error")
        .run(capture_stdout=True, capture_stderr=True)
    )
    return np.frombuffer(out, dtype=np.float32)


def write_flac(audio: np.ndarray, dst: Path) -> None:
    """The same 16-bit FLAC the project writes, so both paths produce the same kind of output."""
    sf.write(dst, np.clip(audio, -1.0, 1.0), 16000, format="FLAC", subtype="PCM_16")


def decode_cli(src: Path, dst: Path) -> float:
    """The alternative design: one ffmpeg process per file, float32 PCM back on a pipe, then the same FLAC."""
    audio = cli_pcm(src)
    write_flac(audio, dst)
    return audio.shape[0] / 16000


def ffmpeg_run(*args: object) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *map(str, args)], check=True)


def time_group(files: list[Path], tmp: Path, repeat: int) -> dict:
    """Passes over ``files`` with each path, alternating which path goes first; CPU and wall seconds per pass."""
    paths = {"ours": decode_ours, "cli": decode_cli}
    cpu: dict[str, list[float]] = {name: [] for name in paths}
    wall: dict[str, list[float]] = {name: [] for name in paths}
    audio_s = 0.0
    for r in range(repeat):
        for name in list(paths)[:: 1 if r % 2 == 0 else -1]:
            start_cpu, start_wall = cpu_seconds(), time.perf_counter()
            audio_s = sum(paths[name](f, tmp / f"{name}.flac") for f in files)
            cpu[name].append(cpu_seconds() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
    result: dict = {"files": len(files), "audio_s": round(audio_s, 1)}
    for name in paths:
        result[f"{name}_cpu_s"] = {"min": round(min(cpu[name]), 3), "median": round(statistics.median(cpu[name]), 3)}
        result[f"{name}_wall_s"] = {"min": round(min(wall[name]), 3), "median": round(statistics.median(wall[name]), 3)}
    result["speedup_vs_cli_min"] = round(min(cpu["cli"]) / min(cpu["ours"]), 2)
    result["speedup_vs_cli_median"] = round(statistics.median(cpu["cli"]) / statistics.median(cpu["ours"]), 2)
    result["x_realtime_per_core"] = round(audio_s / min(cpu["ours"]), 1)
    return result


def compare_pcm(files: list[Path], tmp: Path) -> dict:
    """Our decoded samples against the CLI's, file by file (not timed)."""
    count_diffs, max_abs, snrs, identical = [], 0.0, [], 0
    by_container: dict[str, dict] = {}
    for f in files:
        decode_ours(f, tmp / "cmp-ours.flac")
        ours = read_audio(tmp / "cmp-ours.flac")
        ref = cli_pcm(f)
        write_flac(ref, tmp / "cmp-cli.flac")
        ref16 = read_audio(tmp / "cmp-cli.flac")
        count_diffs.append(int(ours.shape[0] - ref.shape[0]))
        n = min(ours.shape[0], ref.shape[0])
        diff = ours[:n].astype(np.float64) - ref[:n]
        max_abs = max(max_abs, float(np.abs(diff).max()))
        noise = float(np.sum(diff**2))
        snrs.append(float(10 * np.log10(np.sum(ref[:n].astype(np.float64) ** 2) / noise)) if noise else float("inf"))
        identical += int(ours.shape == ref16.shape and np.array_equal(ours, ref16))
        worst = by_container.setdefault(f.suffix.lstrip("."), {"max_abs_diff": 0.0, "min_snr_db": float("inf")})
        worst["max_abs_diff"] = round(max(worst["max_abs_diff"], float(np.abs(diff).max())), 6)
        worst["min_snr_db"] = round(min(worst["min_snr_db"], snrs[-1]), 1)
    return {
        "sample_count_diff": {"min": min(count_diffs), "max": max(count_diffs)},
        "max_abs_diff": round(max_abs, 6),
        "min_snr_db": round(min(snrs), 1),
        "identical_after_16bit": f"{identical}/{len(files)}",
        "by_container": by_container,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=14, help="short files (two of each container by default)")
    parser.add_argument("--long-minutes", type=float, default=10.0, help="length of each of the two long files")
    parser.add_argument("--repeat", type=int, default=5, help="passes over each group per path")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        corpus = generate_corpus(tmp / "corpus", num_files=args.files, include_broken=False)
        short = [corpus.media_dir / item.path for item in corpus.items]
        long_mp3, long_m4a = tmp / "long.mp3", tmp / "long.m4a"
        ffmpeg_run("-stream_loop", "-1", "-i", short[0], "-t", args.long_minutes * 60, "-c:a", "libmp3lame", long_mp3)
        ffmpeg_run("-i", long_mp3, long_m4a)
        groups = {"short": short, "long": [long_mp3, long_m4a]}
        results = {name: time_group(files, tmp, args.repeat) for name, files in groups.items()}
        for name, files in groups.items():
            results[name]["pcm_vs_cli"] = compare_pcm(files, tmp)

    for name, r in results.items():
        print(
            f"{name}: {r['files']} files, {r['audio_s'] / 60:.1f} min; CPU s: ours {r['ours_cpu_s']}, "
            f"CLI {r['cli_cpu_s']}; PCM vs CLI: {r['pcm_vs_cli']}"
        )
    print(json.dumps({"repeat": args.repeat, **results}))


if __name__ == "__main__":
    main()
