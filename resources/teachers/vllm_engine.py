"""The production teacher: an audio-language model in vLLM's offline engine, inside the step process.

`VllmTeacher` holds everything every vLLM teacher shares: one `vllm.LLM` per step built from one settings object,
one `SamplingParams` per segment built from config (greedy, seeded, `max_tokens` bounded by the segment's duration),
prompts rendered by the model's own processor chat template, results matched back to their segments, and the
engine's throughput and KV-cache metrics. A model subclass says only how to phrase the request (``instruction``) and
names itself; `Qwen3OmniTeacher` is the example.

Weights are read from a local directory (a mounted volume in production); the engine runs with the Hugging Face hub
switched off, so a wrong path fails at load instead of starting a 60 GB download.

This module imports vLLM only when an engine is built: the default install has no vLLM (nor torch).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import dagster as dg
from pydantic import Field

from resources.teachers.base import (
    SAMPLE_RATE,
    TeacherEngine,
    TeacherError,
    TeacherInput,
    TeacherOutput,
    TeacherSettings,
    compression_ratio,
    register,
)

log = logging.getLogger(__name__)


class VllmEngineSettings(dg.Config):
    """Arguments of `vllm.LLM`, sized by default for Qwen3-Omni-30B-A3B (bf16) on one H200 (141 GB).

    The reasoning behind the defaults, with numbers, is in the README ("Engine defaults for an H200").
    """

    max_model_len: int = Field(
        default=4096,
        description="Longest prompt + output in tokens. A 30 s segment is ~390 audio tokens plus ~30 of template; "
        "4096 leaves room for any segment VAD emits and keeps the KV cache per sequence small.",
    )
    max_num_seqs: int = Field(
        default=256, description="Sequences decoded together; decoding is bandwidth-bound, so more is nearly free."
    )
    max_num_batched_tokens: int = Field(
        default=16384, description="Tokens per scheduler step (prefill chunk); bounds a step's activation memory."
    )
    gpu_memory_utilization: float = Field(
        default=0.90, description="Fraction of GPU memory for weights, activations and the KV cache."
    )
    tensor_parallel_size: int = Field(default=1, description="GPUs per engine (the model fits one H200).")
    dtype: str = Field(default="bfloat16", description="Weight and activation dtype.")
    enforce_eager: bool = Field(
        default=False, description="Skip CUDA-graph capture: faster start, slower decode (on for CPU tests)."
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse the KV of the shared prompt prefix.")
    load_format: str = Field(default="auto", description='"auto" reads safetensors; "dummy" makes random weights.')
    seed: int = Field(default=0, description="Engine seed.")
    cpu_kv_cache_gib: int = Field(default=1, description="KV-cache GiB when vLLM runs on a CPU; ignored on GPUs.")


class VllmSamplingSettings(dg.Config):
    """How labels are decoded: greedy by default, with a token budget that grows with the segment's duration.

    Fast speech is ~4 words (~6 tokens) per second, so a segment that needs more than the budget is looping: it stops
    with finish reason ``length`` and the dataset's repetition rule drops it.
    """

    temperature: float = Field(default=0.0, description="0 is greedy: reproducible labels.")
    top_p: float = Field(default=1.0, description="Nucleus mass when temperature > 0.")
    seed: int = Field(default=0, description="Per-request sampling seed.")
    max_tokens_base: int = Field(default=16, description="Tokens allowed for any segment.")
    max_tokens_per_second: float = Field(default=8.0, description="Extra tokens per second of audio.")
    max_tokens_cap: int = Field(default=512, description="Upper bound whatever the duration.")

    def max_tokens(self, duration_s: float) -> int:
        return min(self.max_tokens_cap, self.max_tokens_base + int(round(self.max_tokens_per_second * duration_s)))


@dataclass(frozen=True)
class VllmOptions:
    """Engine and sampling settings of a vLLM teacher (``TeacherSettings.options["vllm"]``)."""

    engine: VllmEngineSettings = field(default_factory=VllmEngineSettings)
    sampling: VllmSamplingSettings = field(default_factory=VllmSamplingSettings)

    @classmethod
    def from_settings(cls, settings: TeacherSettings) -> VllmOptions:
        raw = settings.options.get("vllm", {})
        return cls(VllmEngineSettings(**raw.get("engine", {})), VllmSamplingSettings(**raw.get("sampling", {})))

    def as_options(self) -> dict[str, Any]:
        """``TeacherSettings.options`` for these settings (what the settings hash covers)."""
        return {"vllm": {"engine": self.engine.model_dump(), "sampling": self.sampling.model_dump()}}


@dataclass
class EngineStats:
    """Throughput of the engine since it was loaded, plus its last KV-cache reading.

    Attributes:
        load_s: seconds spent building the engine (weights, profiling, graph capture).
        segments: segments labelled.
        audio_s: seconds of audio labelled.
        prompt_tokens: prompt tokens processed (audio placeholders expanded).
        output_tokens: tokens generated.
        generate_s: seconds spent inside ``generate``.
        kv_cache_usage: fraction of the KV cache in use at the last reading (None when the engine does not say).
    """

    load_s: float = 0.0
    segments: int = 0
    audio_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    generate_s: float = 0.0
    kv_cache_usage: float | None = None

    def rates(self) -> dict[str, float]:
        busy = max(self.generate_s, 1e-9)
        return {
            "segments_per_s": self.segments / busy,
            "audio_s_per_s": self.audio_s / busy,
            "output_tokens_per_s": self.output_tokens / busy,
            "prompt_tokens_per_s": self.prompt_tokens / busy,
        }


def model_fingerprint(path: Path) -> str:
    """A short hash of what identifies a checkpoint directory: its config and the list and sizes of weight files."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "generation_config.json"):
        if (path / name).is_file():
            digest.update((path / name).read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:12]


class VllmTeacher(TeacherEngine):
    """A vLLM engine serving one audio-language model. Subclasses set ``name``, ``prompt_version``,
    ``default_model`` and implement ``instruction``; they may override ``messages`` for another prompt shape."""

    default_model: ClassVar[str] = ""
    # The whole wave goes to vLLM in one call: its scheduler keeps max_num_seqs in flight and refills as they finish.
    batch_size = 1024
    wave_size = 1024
    merge_gap_s = 1.0  # prompt tokens per second of audio: bench/RESULTS.md ("Qwen3-Omni prompt overhead")

    def __init__(self, settings: TeacherSettings) -> None:
        super().__init__(settings)
        self.options = VllmOptions.from_settings(settings)
        path = Path(settings.model or self.default_model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"teacher model not found: {path} has no config.json. Weights are read from a local directory "
                "(a mounted volume in production), never downloaded at run time: set the teacher's `model` to it."
            )
        self.path = path
        # Before transformers or vLLM is imported (both read these at import): no hub, the engine core in this
        # process (the step owns its GPU; no extra process to orphan if the pod is killed), a bounded CPU KV cache.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.options.engine.cpu_kv_cache_gib))
        if settings.language != "auto":
            self.instruction(settings.language)  # an unsupported language is a configuration error: fail before loading
        self._model_id = f"{path.name}@{model_fingerprint(path)}"
        self.stats = EngineStats()
        started = time.perf_counter()
        self._processor = self._load_processor()
        self._llm = self._load_engine()
        self.stats.load_s = time.perf_counter() - started
        log.info("%s: engine for %s ready in %.1f s", self.name, self._model_id, self.stats.load_s)

    @property
    def model_id(self) -> str:
        return self._model_id

    # Engine settings that change speed or memory, not the labels: left out of the settings hash so labels from the
    # same weights and prompt compare equal across a laptop and an H200.
    SPEED_ONLY = (
        "max_num_seqs",
        "max_num_batched_tokens",
        "gpu_memory_utilization",
        "cpu_kv_cache_gib",
        "enforce_eager",
        "enable_prefix_caching",
    )

    def hashed_settings(self) -> dict[str, Any]:
        settings = super().hashed_settings()
        engine = {k: v for k, v in self.options.engine.model_dump().items() if k not in self.SPEED_ONLY}
        settings["options"] = {"vllm": {"engine": engine, "sampling": self.options.sampling.model_dump()}}
        return settings

    # -- model-specific: how a request is phrased ----------------------------------------------------------------

    def instruction(self, language: str) -> str:
        """The text that follows the audio in the user turn, for a language code ("": language-neutral, for a
        segment whose language detection was unsure)."""
        raise NotImplementedError

    def supports(self, language: str) -> bool:
        """Whether ``instruction`` names this language (with ``auto``, a detected language it does not name gets the
        language-neutral instruction)."""
        try:
            self.instruction(language)
        except ValueError:
            return False
        return True

    def messages(self, language: str) -> list[dict[str, Any]]:
        """The chat for one segment: one user turn holding the audio, then the instruction."""
        return [
            {
                "role": "user",
                "content": [
                    {"type": "audio", "audio": "segment"},
                    {"type": "text", "text": self.instruction(language)},
                ],
            }
        ]

    # -- shared machinery ------------------------------------------------------------------------------------------

    def prompt(self, language: str) -> str:
        """The rendered prompt text (with the model's audio placeholder) for a language."""
        return self._processor.apply_chat_template(self.messages(language), add_generation_prompt=True, tokenize=False)

    def sampling_params(self, duration_s: float) -> Any:
        from vllm import SamplingParams

        s = self.options.sampling
        return SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            max_tokens=s.max_tokens(duration_s),
            logprobs=0,  # the chosen token's logprob only: the confidence signal, at no extra cost
            skip_special_tokens=True,
        )

    def transcribe(self, batch: Sequence[TeacherInput]) -> list[TeacherOutput | TeacherError]:
        if not batch:
            return []
        # With auto, a detected language the instruction cannot name is asked for language-neutrally.
        batch = [item if self.supports(item.language) else replace(item, language="") for item in batch]
        prompts = {language: self.prompt(language) for language in {item.language for item in batch}}
        requests = [
            {"prompt": prompts[item.language], "multi_modal_data": {"audio": (item.audio, SAMPLE_RATE)}}
            for item in batch
        ]
        params = [self.sampling_params(len(item.audio) / SAMPLE_RATE) for item in batch]
        started = time.perf_counter()
        # vLLM returns one RequestOutput per request in submission order; a request it rejects (too long for the
        # context, say) raises for the whole call, and the caller then bisects the batch down to that segment.
        with _PeakSampler(self._kv_cache_usage) as kv_peak:
            outputs = self._llm.generate(requests, params, use_tqdm=False)
        self.stats.generate_s += time.perf_counter() - started
        if len(outputs) != len(batch):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(batch)} requests")
        results: list[TeacherOutput | TeacherError] = []
        for item, output in zip(batch, outputs, strict=True):
            results.append(self._result(item, output))
            self.stats.segments += 1
            self.stats.audio_s += len(item.audio) / SAMPLE_RATE
            self.stats.prompt_tokens += len(output.prompt_token_ids or ())
            self.stats.output_tokens += sum(len(c.token_ids) for c in output.outputs)
        self.stats.kv_cache_usage = kv_peak.value
        return results

    def metrics(self) -> dict[str, float]:
        """Throughput since load and the last KV-cache reading, for logs, metadata and Prometheus."""
        values = {"engine_load_s": self.stats.load_s, "output_tokens": self.stats.output_tokens, **self.stats.rates()}
        if self.stats.kv_cache_usage is not None:
            values["kv_cache_usage"] = self.stats.kv_cache_usage
        return values

    def close(self) -> None:
        # Drop the engine and give its memory back (a step labelling several shards, or tests, may build another).
        self._llm = None
        self._processor = None
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _result(self, item: TeacherInput, output: Any) -> TeacherOutput | TeacherError:
        if not output.outputs:
            return TeacherError(f"{self.name}: no completion for segment {item.segment_id}")
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        text = completion.text.strip()
        return TeacherOutput(
            text=text,
            language=item.language,
            num_tokens=len(tokens),
            avg_logprob=_mean_logprob(tokens, completion.logprobs, completion.cumulative_logprob),
            no_speech_prob=None,  # an LLM teacher has no no-speech head
            compression_ratio=compression_ratio(text),
            finish_reason=completion.finish_reason or "stop",
        )

    def _load_processor(self) -> Any:
        try:
            import vllm  # noqa: F401
            from transformers import AutoProcessor
        except ImportError as exc:
            raise ImportError(
                f"ASR_TEACHER={self.name} needs vLLM and transformers, which the default install leaves out (they pull "
                "torch): use the GPU image (deploy/Dockerfile.gpu), or .venv-vllm (`make test-vllm` builds it with "
                f"vLLM's CPU build) to try it on a CPU. ({exc})"
            ) from exc

        return AutoProcessor.from_pretrained(str(self.path), local_files_only=True)

    def _load_engine(self) -> Any:
        from vllm import LLM

        e = self.options.engine
        return LLM(
            model=str(self.path),
            max_model_len=e.max_model_len,
            max_num_seqs=e.max_num_seqs,
            max_num_batched_tokens=e.max_num_batched_tokens,
            gpu_memory_utilization=e.gpu_memory_utilization,
            tensor_parallel_size=e.tensor_parallel_size,
            dtype=e.dtype,
            enforce_eager=e.enforce_eager,
            enable_prefix_caching=e.enable_prefix_caching,
            load_format=e.load_format,
            seed=e.seed,
            limit_mm_per_prompt={"audio": 1, "image": 0, "video": 0},
            disable_log_stats=False,  # keeps the engine's gauges (KV-cache usage) up to date for `metrics()`
        )

    def _kv_cache_usage(self) -> float | None:
        try:
            for metric in self._llm.get_metrics():
                if metric.name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
                    return float(metric.value)
        except Exception as exc:  # metrics are advisory; never fail labelling over them
            log.debug("vLLM metrics unavailable: %s", exc)
        return None


class _PeakSampler:
    """Reads a gauge every ``every_s`` on a thread while a blocking call runs, keeping the highest value: the KV-cache
    usage after ``generate`` returns is ~0 (every request has finished), during it is what sizing needs."""

    def __init__(self, read: Callable[[], float | None], every_s: float = 0.5) -> None:
        self._read, self._every_s = read, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-cache-sampler", daemon=True)
        self.value: float | None = None

    def _sample(self) -> None:
        reading = self._read()
        if reading is not None:
            self.value = reading if self.value is None else max(self.value, reading)

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self._sample()

    def __enter__(self) -> _PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _mean_logprob(tokens: list[int], logprobs: Any, cumulative: float | None) -> float | None:
    """Mean log probability of the generated tokens, from the per-position logprobs (chosen token at each step)."""
    if not tokens:
        return None
    if logprobs:
        values = [
            position[token].logprob for token, position in zip(tokens, logprobs, strict=False) if token in position
        ]
        if len(values) == len(tokens):
            return sum(values) / len(values)
    return cumulative / len(tokens) if cumulative is not None else None


LANGUAGE_NAMES = {
    "en": "English",
    "zh": "Chinese",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "it": "Italian",
    "pt": "Portuguese",
    "ru": "Russian",
    "ja": "Japanese",
    "ko": "Korean",
    "ar": "Arabic",
    "nl": "Dutch",
    "tr": "Turkish",
    "vi": "Vietnamese",
    "id": "Indonesian",
    "th": "Thai",
    "hi": "Hindi",
}


@register
class Qwen3OmniTeacher(VllmTeacher):
    """Qwen3-Omni-30B-A3B-Instruct: audio in, transcript out, with the instructions of Qwen3-Omni's ASR evaluation."""

    name = "vllm"
    prompt_version = "qwen3-omni-asr-v1"
    default_model = "/models/Qwen3-Omni-30B-A3B-Instruct"

    def instruction(self, language: str) -> str:
        if not language:
            return "Transcribe the audio into text."
        if language == "zh":
            return "请将这段中文语音转换为纯文本。"
        if language not in LANGUAGE_NAMES:
            raise ValueError(f"{self.name}: no instruction for language {language!r}; known: {sorted(LANGUAGE_NAMES)}")
        return f"Transcribe the {LANGUAGE_NAMES[language]} audio into text."
