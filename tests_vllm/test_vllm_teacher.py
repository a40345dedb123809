"""The vLLM teacher on the real engine: prompts, batching and ordering, rejection of one request, resume, the asset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.compute as pc
import pytest

from asr_assets import layout
from asr_assets.assets import audio_wav, media_index, segment_features, vad_segments
from asr_assets.checks import reconcile_distilled, reconcile_transcripts
from asr_assets.records import FEATURE_SCHEMA
from asr_assets.sample_corpus import Corpus
from asr_assets.stages import TranscribeSettings, _transcribe, read_transcripts, transcribe_shard
from partitions import NUM_SHARDS, shard_key, shard_of
from resources.storage import LocalStore, StorageResource, read_table
from resources.teachers import TeacherResource
from resources.teachers.base import TeacherError, TeacherInput, TeacherOutput, create_engine
from resources.teachers.vllm_engine import VllmTeacher
from tests.conftest import uri_of
from tests_vllm.conftest import teacher_settings

AUDIO_PLACEHOLDER = "<|audio_start|><|audio_pad|><|audio_end|>"
CPU_STAGES = [media_index, audio_wav, vad_segments, segment_features]


def _noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    tone = 0.1 * np.sin(2 * np.pi * (150 + 40 * seed) * t)
    return (tone + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def test_prompts_come_from_the_processor_chat_template(engine: VllmTeacher) -> None:
    english, chinese = engine.prompt("en"), engine.prompt("zh")
    assert english == (
        f"<|im_start|>user\n{AUDIO_PLACEHOLDER}Transcribe the English audio into text.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert chinese.startswith(f"<|im_start|>user\n{AUDIO_PLACEHOLDER}请将这段中文语音转换为纯文本。")
    assert english.count("<|audio_pad|>") == 1  # one audio per prompt; vLLM expands it to the audio's tokens
    assert engine.prompt_version == "qwen3-omni-asr-v1"


def test_each_segment_gets_the_instruction_of_its_detected_language(engine: VllmTeacher) -> None:
    """With ASR_LANGUAGE=auto the segments of one batch come in different languages: each request's prompt carries
    its own language's instruction, and a segment whose detection was unsure (language "") or whose language the
    instructions do not name gets the language-neutral one."""
    assert engine.prompt("es").endswith("Transcribe the Spanish audio into text.<|im_end|>\n<|im_start|>assistant\n")
    assert "请将这段中文语音转换为纯文本。" in engine.prompt("zh")
    assert "Transcribe the audio into text.<|im_end|>" in engine.prompt("")
    seen: list[str] = []
    generate = engine._llm.generate

    def spy(requests, params, **kwargs):
        seen.extend(r["prompt"] for r in requests)
        return generate(requests, params, **kwargs)

    engine._llm.generate = spy
    try:
        languages = ["es", "zh", "", "xx", "de"]
        batch = [TeacherInput(f"l-{k}", _noise(1.5, k), lang) for k, lang in enumerate(languages)]
        results = engine.transcribe(batch)
    finally:
        engine._llm.generate = generate
    assert seen == [engine.prompt(lang) for lang in ["es", "zh", "", "", "de"]]
    assert [r.language for r in results] == ["es", "zh", "", "", "de"]


def test_a_batch_of_mixed_lengths_returns_one_result_per_segment_in_order(engine: VllmTeacher) -> None:
    durations = [3.0, 0.5, 6.0, 1.5, 9.0, 2.0]
    batch = [TeacherInput(f"seg-{i}", _noise(d, i), "en") for i, d in enumerate(durations)]
    first = engine.transcribe(batch)
    again = engine.transcribe(batch)
    assert len(first) == len(batch) and all(isinstance(r, TeacherOutput) for r in first)
    budgets = [engine.options.sampling.max_tokens(d) for d in durations]
    assert len(set(budgets)) == len(budgets)
    # Random weights rarely emit the end token, so most segments run to their own duration-bound budget: a result in
    # the wrong slot would show the wrong count.
    at_budget = [r.num_tokens == b for r, b in zip(first, budgets, strict=True) if r.finish_reason == "length"]
    assert len(at_budget) >= 4 and all(at_budget)
    assert all(r.num_tokens <= b for r, b in zip(first, budgets, strict=True))
    assert all(r.avg_logprob is not None and r.avg_logprob < 0 for r in first)
    # Greedy decoding with a seed: the same labels twice.
    assert [(r.text, r.num_tokens) for r in first] == [(r.text, r.num_tokens) for r in again]
    # Throughput and the KV-cache reading (sampled from vLLM's own gauges while generate ran) for logs and Prometheus.
    metrics = engine.metrics()
    assert metrics["segments_per_s"] > 0 and metrics["output_tokens_per_s"] > 0 and metrics["engine_load_s"] > 0
    assert 0.0 <= metrics["kv_cache_usage"] <= 1.0


def test_the_prompt_grows_with_the_audio(engine: VllmTeacher) -> None:
    counts = []
    for seconds in (1.0, 4.0, 10.0, 20.0):
        before = engine.stats.prompt_tokens
        engine.transcribe([TeacherInput(f"len-{seconds}", _noise(seconds, 1), "en")])
        counts.append(engine.stats.prompt_tokens - before)
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    per_second = (counts[-1] - counts[0]) / 19.0
    assert 10 <= per_second <= 16, counts  # Qwen3-Omni's audio encoder: ~13 tokens per second of speech


def test_a_request_the_engine_rejects_costs_only_its_segment(engine: VllmTeacher) -> None:
    # 200 s of audio is ~2600 prompt tokens: over this engine's max_model_len (2048), so vLLM refuses the request.
    too_long = TeacherInput("too-long", _noise(200.0, 2), "en")
    with pytest.raises(Exception, match=r"(?i)longer than|too long|exceed|max_model_len|maximum"):
        engine.transcribe([too_long])
    batch = [TeacherInput("a", _noise(1.0, 3), "en"), too_long, TeacherInput("b", _noise(2.0, 4), "en")]
    results = _transcribe(engine, batch)
    assert isinstance(results[0], TeacherOutput) and isinstance(results[2], TeacherOutput)
    assert isinstance(results[1], TeacherError) and "too-long" in str(results[1])


def test_a_bad_configuration_fails_before_the_engine_loads(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        create_engine("vllm", teacher_settings(tmp_path / "no-model-here"))
    settings = teacher_settings(tiny_model)
    with pytest.raises(ValueError, match="no instruction for language 'xx'"):
        create_engine("vllm", type(settings)(model=settings.model, language="xx", options=settings.options))


def _cpu_stages(corpus: Corpus, out: Path, shard: str) -> None:
    storage = StorageResource(source_uri=str(corpus.media_dir), output_root=str(out))
    # The faster-whisper resource: its vad_segments default keeps the VAD's own segments (no merging), as counted below.
    resources = {"storage": storage, "teacher": TeacherResource(language="en")}
    dg.materialize(CPU_STAGES, resources=resources, partition_key=shard, raise_on_error=True)


class Killed(Exception):
    """Stands in for the step dying between two waves."""


def test_a_killed_step_resumes_and_labels_each_segment_once(
    engine: VllmTeacher, corpus: Corpus, busiest_shard: str, tmp_path: Path
) -> None:
    _cpu_stages(corpus, tmp_path, busiest_shard)
    out = LocalStore(tmp_path)
    featured = read_table(out, layout.features_key(busiest_shard), FEATURE_SCHEMA)
    assert featured.num_rows >= 4
    settings = TranscribeSettings(wave_size=2, batch_size=2, language="en")

    def die_after_first_wave(report) -> None:
        raise Killed

    with pytest.raises(Killed):
        transcribe_shard(out, busiest_shard, lambda: engine, settings, on_wave=die_after_first_wave)
    assert read_transcripts(out, busiest_shard).num_rows == 2  # the first wave's part is committed
    report = transcribe_shard(out, busiest_shard, lambda: engine, settings)
    assert report.processed == featured.num_rows - 2  # only what the killed run had not labelled
    labels = read_transcripts(out, busiest_shard)
    assert reconcile_transcripts(out, busiest_shard).passed
    assert sorted(labels["segment_id"].to_pylist()) == sorted(featured["segment_id"].to_pylist())
    assert set(labels["engine"].to_pylist()) == {"vllm"}
    assert set(labels["settings_hash"].to_pylist()) == {engine.settings_hash}
    assert set(labels["prompt_version"].to_pylist()) == {"qwen3-omni-asr-v1"}
    assert set(labels["finish_reason"].to_pylist()) <= {"stop", "length"}
    assert pc.min(labels["num_tokens"]).as_py() > 0


def _dagster(args: list[str], env: dict[str, str], home: Path) -> subprocess.CompletedProcess:
    home.mkdir(exist_ok=True)
    cli = Path(sys.executable).parent / "dagster"
    return subprocess.run(
        [str(cli), *args, "-m", "asr_assets.definitions"],
        env={**os.environ, **env, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_asr_teacher_vllm_materializes_a_partition_end_to_end(
    tiny_model: Path, corpus: Corpus, busiest_shard: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    env = {
        "ASR_TEACHER": "vllm",
        "ASR_TEACHER_MODEL": str(tiny_model),
        "ASR_SOURCE_URI": str(corpus.media_dir),
        "ASR_OUTPUT_ROOT": str(out),
    }
    done = _dagster(
        ["asset", "materialize", "--select", "group:asr", "--partition", busiest_shard], env, tmp_path / "home"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = LocalStore(out)
    labels = read_transcripts(store, busiest_shard)
    assert labels.num_rows > 0 and set(labels["engine"].to_pylist()) == {"vllm"}
    assert set(labels["model_id"].to_pylist()) == {f"{tiny_model.name}@" + labels["model_id"][0].as_py().split("@")[1]}
    assert reconcile_transcripts(store, busiest_shard).passed
    # Garbage text from random weights: most labels are dropped, and every drop has its reason.
    assert reconcile_distilled(store, busiest_shard).passed


def test_one_run_labels_a_range_of_shards_with_one_engine(tiny_model: Path, corpus: Corpus, tmp_path: Path) -> None:
    good = Counter(shard_of(uri_of(corpus, item.path), NUM_SHARDS) for item in corpus.items if not item.broken)
    # The two neighbouring shards (a range is contiguous) holding the most speech files.
    first, second = max(
        ((shard_key(i), shard_key(i + 1)) for i in range(NUM_SHARDS - 1)), key=lambda p: good[p[0]] + good[p[1]]
    )
    out = tmp_path / "out"
    for shard in (first, second):
        _cpu_stages(corpus, out, shard)
    env = {
        "ASR_TEACHER": "vllm",
        "ASR_TEACHER_MODEL": str(tiny_model),
        "ASR_SOURCE_URI": str(corpus.media_dir),
        "ASR_OUTPUT_ROOT": str(out),
    }
    home = tmp_path / "home"
    home.mkdir()
    # What the backfill daemon launches for a multi-run backfill policy: one run tagged with a partition range (the
    # CLI's --partition-range only takes single-run policies), here in its own process with the deployment's resources.
    tags = {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": second}
    script = (
        "import json, dagster as dg\n"
        "from asr_assets import deployment\n"
        "from asr_assets.definitions import all_assets, all_checks\n"
        "selected = [a for a in all_assets if a.key.path == ['transcripts']]\n"
        "checks = [c for c in all_checks if any(k.asset_key.path == ['transcripts'] for k in c.check_keys)]\n"
        "result = dg.materialize([*selected, *checks], resources=deployment.resources('local'),\n"
        f"    instance=dg.DagsterInstance.get(), tags={tags!r})\n"
        "assert result.success\n"
        "events = result.get_asset_materialization_events()\n"
        "meta = events[0].materialization.metadata\n"
        "print(json.dumps([[e.partition for e in events], sorted(meta['per_shard'].value), meta['seconds'].value]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **env, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    partitions, labelled, _ = json.loads(done.stdout.strip().splitlines()[-1])
    # One run (one step process holding one engine) materialized both partitions, labelling both shards in turn.
    assert sorted(partitions) == [first, second] and labelled == [first, second]
    store = LocalStore(out)
    for shard in (first, second):
        assert read_transcripts(store, shard).num_rows > 0
        assert reconcile_transcripts(store, shard).passed
