"""Silero VAD through onnxruntime: boundaries on real speech, the timestamp rules, merging, and no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asr_assets.media import DecodeJob, decode_media
from asr_assets.sample_corpus import Corpus
from asr_assets.vad import WINDOW, SileroVad, VadParams, merge_spans, silero_model_path, speech_timestamps

SR = 16_000


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad(silero_model_path())


def _decoded(corpus: Corpus, path: str, tmp_path: Path) -> np.ndarray:
    dst = tmp_path / "a.flac"
    result = decode_media(DecodeJob("m", path, corpus.media_dir / path, dst, 1 << 30, 3600.0))
    assert result.error_class is None
    return sf.read(dst, dtype="float32")[0]


def test_boundaries_match_the_known_silences(corpus: Corpus, vad: SileroVad, tmp_path: Path) -> None:
    raw = VadParams(speech_pad_ms=0)
    checked = 0
    for item in corpus.items:
        if item.broken or not item.path.endswith((".wav", ".flac", ".mp3")):
            continue
        audio = _decoded(corpus, item.path, tmp_path)
        spans = speech_timestamps(vad.speech_probs(audio), len(audio), raw)
        assert len(spans) == len(item.speech), (item.path, spans, item.speech)
        for (start, end), (true_start, true_end) in zip(spans, item.speech, strict=True):
            assert abs(start / SR - true_start) <= 0.15, (item.path, start / SR, true_start)
            assert abs(end / SR - true_end) <= 0.15, (item.path, end / SR, true_end)
        checked += 1
    assert checked >= 3


def test_padding_extends_each_segment(corpus: Corpus, vad: SileroVad, tmp_path: Path) -> None:
    item = next(i for i in corpus.items if i.path.endswith(".flac") and not i.broken)
    audio = _decoded(corpus, item.path, tmp_path)
    probs = vad.speech_probs(audio)
    raw = speech_timestamps(probs, len(audio), VadParams(speech_pad_ms=0))
    padded = speech_timestamps(probs, len(audio), VadParams(speech_pad_ms=100))
    assert padded == [(max(0, s - 1600), min(len(audio), e + 1600)) for s, e in raw]


def _probs(*runs: tuple[float, int]) -> np.ndarray:
    """Window probabilities from (probability, number of 32 ms windows) runs."""
    return np.concatenate([np.full(n, p, dtype=np.float32) for p, n in runs])


W = WINDOW
RAW = VadParams(speech_pad_ms=0)


@pytest.mark.parametrize(
    ("probs", "params", "expected"),
    [
        (_probs((0.0, 100)), RAW, []),
        (_probs((0.0, 10), (0.9, 20), (0.0, 30)), RAW, [(10 * W, 30 * W)]),
        # 5 windows (160 ms) is under min_speech (250 ms): dropped.
        (_probs((0.0, 10), (0.9, 5), (0.0, 30)), RAW, []),
        # A 320 ms pause is under min_silence (500 ms): bridged.
        (_probs((0.0, 10), (0.9, 20), (0.0, 10), (0.9, 20), (0.0, 30)), RAW, [(10 * W, 60 * W)]),
        # A 640 ms pause splits.
        (_probs((0.0, 10), (0.9, 20), (0.0, 20), (0.9, 20), (0.0, 30)), RAW, [(10 * W, 30 * W), (50 * W, 70 * W)]),
        # Hysteresis: 0.4 is under the threshold but over neg_threshold (0.35), so speech goes on.
        (_probs((0.0, 10), (0.9, 10), (0.4, 30), (0.0, 30)), RAW, [(10 * W, 50 * W)]),
        # Speech running to the end of the audio ends there.
        (_probs((0.0, 10), (0.9, 40)), RAW, [(10 * W, 50 * W)]),
        # Padding never overlaps: a 640 ms gap is under two 400 ms pads, so it is shared half and half; the first
        # start clamps at 0.
        (
            _probs((0.0, 10), (0.9, 20), (0.0, 20), (0.9, 20), (0.0, 30)),
            VadParams(speech_pad_ms=400, min_silence_ms=500),
            [(0, 40 * W), (40 * W, 70 * W + 6400)],
        ),
    ],
)
def test_speech_timestamps_rules(probs: np.ndarray, params: VadParams, expected: list) -> None:
    assert speech_timestamps(probs, len(probs) * W, params) == expected


def test_long_speech_is_split_at_its_longest_pause() -> None:
    # 50 s of speech with a 200 ms pause at ~18 s and a 300 ms pause at ~25 s: split at the longer one.
    probs = _probs((0.9, 560), (0.0, 6), (0.9, 220), (0.0, 9), (0.9, 765))
    spans = speech_timestamps(probs, len(probs) * W, VadParams(speech_pad_ms=0, max_segment_s=30.0))
    assert spans[0] == (0, 786 * W)
    assert all((e - s) / SR <= 30.0 for s, e in spans)
    assert spans[1][0] == 795 * W


def test_speech_without_pauses_is_cut_at_the_limit() -> None:
    probs = _probs((0.9, 3000))  # 96 s
    spans = speech_timestamps(probs, len(probs) * W, VadParams(speech_pad_ms=100, max_segment_s=30.0))
    assert len(spans) >= 4
    assert all((e - s) / SR <= 30.0 for s, e in spans)


@pytest.mark.parametrize(
    ("spans", "gap_s", "max_s", "expected"),
    [
        ([(0, 16000), (24000, 40000)], 0.0, 30.0, [(0, 16000), (24000, 40000)]),
        ([(0, 16000), (24000, 40000)], 0.5, 30.0, [(0, 40000)]),
        ([(0, 16000), (40000, 48000)], 0.5, 30.0, [(0, 16000), (40000, 48000)]),
        # Past max_segment_s the run is cut, at its longest pause (0.25 s here, not the 0.125 s one).
        ([(0, 16000), (20000, 30000), (32000, 40000)], 1.0, 2.0, [(0, 16000), (20000, 40000)]),
        # Five 1-s spans, pauses of 0.5 s but one of 1 s: two pieces (the fewest), cut at the 1-s pause.
        (
            [(0, 16000), (24000, 40000), (48000, 64000), (80000, 96000), (104000, 120000)],
            1.5,
            4.5,
            [(0, 64000), (80000, 120000)],
        ),
        # A span longer than the limit stays alone; its neighbours still merge.
        ([(0, 80000), (88000, 96000), (100000, 110000)], 1.0, 3.0, [(0, 80000), (88000, 110000)]),
    ],
)
def test_merge_spans(spans, gap_s: float, max_s: float, expected) -> None:
    assert merge_spans(spans, VadParams(merge_gap_s=gap_s, max_segment_s=max_s)) == expected


def test_vad_never_imports_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from asr_assets.vad import SileroVad, silero_model_path\n"
        "SileroVad(silero_model_path()).speech_probs(np.zeros(16000, np.float32))\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_sequence_export_matches_the_streaming_model(corpus: Corpus, vad: SileroVad, tmp_path: Path) -> None:
    """The streaming model run one window per call, carrying state and context as silero-vad's OnnxWrapper does."""
    import onnxruntime as ort

    item = next(i for i in corpus.items if i.path.endswith(".mp3") and not i.broken)
    audio = _decoded(corpus, item.path, tmp_path)[: 16000 * 5 + 123]  # a partial last window too
    session = ort.InferenceSession(
        str(silero_model_path().parent / "silero_vad.onnx"), providers=["CPUExecutionProvider"]
    )
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros((1, 64), np.float32)
    expected = []
    for start in range(0, len(audio), W):
        chunk = np.zeros((1, W), np.float32)
        piece = audio[start : start + W]
        chunk[0, : len(piece)] = piece
        x = np.concatenate([context, chunk], axis=1)
        out, state = session.run(None, {"input": x, "state": state, "sr": np.array(SR, np.int64)})
        context = x[:, -64:]
        expected.append(out[0, 0])
    assert np.array_equal(vad.speech_probs(audio), np.array(expected, np.float32))


def test_blocks_do_not_change_probabilities(corpus: Corpus, tmp_path: Path) -> None:
    item = next(i for i in corpus.items if i.path.endswith(".wav") and not i.broken)
    audio = _decoded(corpus, item.path, tmp_path)
    whole = SileroVad(silero_model_path(), block_windows=100_000).speech_probs(audio)
    assert np.array_equal(SileroVad(silero_model_path(), block_windows=7).speech_probs(audio), whole)


def test_an_unreadable_file_fails_alone_in_its_group(corpus: Corpus, tmp_path: Path) -> None:
    from asr_assets.vad import VadItem, VadJob, detect_speech

    item = next(i for i in corpus.items if i.path.endswith(".flac") and not i.broken)
    good = tmp_path / "good.flac"
    decode_media(DecodeJob("m", item.path, corpus.media_dir / item.path, good, 1 << 30, 3600.0))
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"not audio")
    gone = tmp_path / "gone.flac"  # an I/O error: the file is not there (a cache that lost it)
    items = (VadItem("a", good), VadItem("b", bad), VadItem("c", good), VadItem("d", gone))
    results = detect_speech(VadJob(items, VadParams(), silero_model_path()))
    assert [r.media_id for r in results] == ["a", "b", "c", "d"]
    # Reads but does not decode: waiting cannot fix it (permanent, naming the file); an I/O error may pass (transient).
    assert results[1].error_class == "CorruptAudio" and "media b" in results[1].error and "bad.flac" in results[1].error
    assert results[3].error_class == "UnreadableAudio"
    spans = [(s.start_s, s.end_s) for s in results[0].segments]
    assert spans and spans == [(s.start_s, s.end_s) for s in results[2].segments]
