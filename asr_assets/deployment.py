"""The one environment switch: `ASR_DEPLOYMENT=local|k8s` selects the executor and the resource set.

- ``local`` (default): every step of a run in the run's own process (a shard's steps are one chain, so nothing is
  lost), the CPU stages fanning out to worker pools; storage and teacher from the embedded defaults or env vars.
- ``k8s``: every step in its own pod through dagster-k8s' ``k8s_job_executor``. The step tags below size the pods:
  CPU pods for the CPU stages (their pools follow the pod's CPU limit), an H200 pod for ``transcripts``. A run never
  holds more GPU steps than ``ASR_GPUS_PER_RUN`` (executor tag limit), and the instance-wide ``h200`` pool
  (``dagster instance concurrency set h200 <gpus>``) caps GPU steps across runs at the number of GPUs.

Images, node labels and sizes are deployment knobs (not secrets) read when the code location loads; the Helm values in
``deploy/helm/`` set them.
"""

from __future__ import annotations

import json
import os
from typing import Any

import dagster as dg

from resources.storage import StorageResource
from resources.teachers import DEFAULT_SECOND_OPINION, TeacherResource
from resources.teachers.vllm_engine import VllmEngineSettings

DEPLOYMENTS = ("local", "k8s")
GPU_POOL = "h200"
GPU_TAG = "asr/accelerator"  # tag the executor's tag_concurrency_limits count per run

DEFAULT_SOURCE_URI = "./data/sample/media"
DEFAULT_OUTPUT_ROOT = "./data/out"
DEFAULT_TEACHER_MODEL = "/models/Qwen3-Omni-30B-A3B-Instruct"  # the weights volume's mount path in the GPU pod


def deployment() -> str:
    """The selected deployment; anything but a known name is a configuration error caught at load."""
    name = os.environ.get("ASR_DEPLOYMENT", "local")
    if name not in DEPLOYMENTS:
        raise ValueError(f"ASR_DEPLOYMENT={name!r}: expected one of {', '.join(DEPLOYMENTS)}")
    return name


def _setting(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _scrape_annotations() -> dict[str, Any]:
    # With ASR_METRICS_PORT set, each step's process serves /metrics while it runs; these let Prometheus find the pod.
    port = _setting("ASR_METRICS_PORT", "")
    if not port:
        return {}
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": port, "prometheus.io/path": "/metrics"}
    return {"pod_template_spec_metadata": {"annotations": annotations}}


def cpu_step_config(cpu: str, memory: str) -> dict[str, Any]:
    """``dagster-k8s/config`` of a CPU stage: the CPU image and a pod sized for the stage's process pool."""
    return {
        "container_config": {
            "image": _setting("ASR_CPU_IMAGE", "asr-distill-cpu:latest"),
            "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}},
        },
        "pod_spec_config": {"node_selector": json.loads(_setting("ASR_CPU_NODE_SELECTOR", "{}"))},
        **_scrape_annotations(),
    }


def gpu_step_config() -> dict[str, Any]:
    """``dagster-k8s/config`` of the teacher: the GPU image on one H200, tolerating the GPU taint, with a large
    ``/dev/shm`` (vLLM and PyTorch share tensors through it; the container default of 64 MiB breaks them) and the
    weights volume mounted read-only where the teacher's ``model`` points."""
    gpus = _setting("ASR_GPUS_PER_STEP", "1")
    weights_claim = _setting("ASR_WEIGHTS_PVC", "asr-teacher-weights")
    return {
        "container_config": {
            "image": _setting("ASR_GPU_IMAGE", "asr-distill-gpu:latest"),
            "resources": {
                "requests": {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": gpus},
                "limits": {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": gpus},
            },
            "volume_mounts": [
                {"name": "dshm", "mount_path": "/dev/shm"},
                {"name": "teacher-weights", "mount_path": "/models", "read_only": True},
            ],
        },
        "pod_spec_config": {
            "node_selector": json.loads(_setting("ASR_GPU_NODE_SELECTOR", '{"nvidia.com/gpu.product": "NVIDIA-H200"}')),
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "volumes": [
                {"name": "dshm", "empty_dir": {"medium": "Memory", "size_limit": _setting("ASR_GPU_SHM", "64Gi")}},
                {
                    "name": "teacher-weights",
                    "persistent_volume_claim": {"claim_name": weights_claim, "read_only": True},
                },
            ],
        },
        **_scrape_annotations(),
    }


def step_tags(kind: str) -> dict[str, str]:
    """Op tags of an asset's step: its k8s pod config (ignored by the local executor) and, for the GPU, the tag the
    executor's per-run GPU limit counts."""
    if kind == "gpu":
        return {"dagster-k8s/config": json.dumps(gpu_step_config()), GPU_TAG: GPU_POOL}
    sizes = {"index": ("2", "4Gi"), "cpu": ("8", "16Gi"), "light": ("2", "8Gi")}
    return {"dagster-k8s/config": json.dumps(cpu_step_config(*sizes[kind]))}


def executor(name: str) -> dg.ExecutorDefinition:
    """The run's executor for a deployment."""
    if name == "local":
        # A shard's steps form one chain: running them in the run's process loses no parallelism and saves a process
        # spawn and code-location import per step; the CPU stages fan out to their own worker pools.
        return dg.in_process_executor
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(k8s_executor_config(), name="asr_k8s_job_executor")


def k8s_executor_config() -> dict[str, Any]:
    """Config of ``k8s_job_executor`` on k8s: pods per run, the per-run GPU limit, and the OSS secret in every pod."""
    return {
        "job_namespace": _setting("ASR_K8S_NAMESPACE", "asr-distill"),
        "max_concurrent": int(_setting("ASR_MAX_PODS_PER_RUN", "16")),
        "tag_concurrency_limits": [
            {"key": GPU_TAG, "value": GPU_POOL, "limit": int(_setting("ASR_GPUS_PER_RUN", "1"))}
        ],
        "env_secrets": [_setting("ASR_K8S_SECRET", "asr-distill-oss")],  # OSS keys, as env vars in every pod
    }


def _env(name: str, default: str) -> str | dg.EnvVar:
    # Read by Dagster when the resource is built (EnvVar), not frozen into the definitions; the default applies only
    # when the variable is not set at all.
    return dg.EnvVar(name) if name in os.environ else default


def second_opinion_fraction(teacher_engine: str) -> float:
    """``ASR_SECOND_OPINION_FRACTION``, else the teacher's default: every segment behind the CPU teacher (the second
    opinion costs about 1.6x the teacher there: bench/RESULTS.md), a 1% sample behind vLLM, whose H200 labels ~100
    segments/s while the pod's CPUs give a few second opinions a second (1% then adds about a fifth to the step).
    Read at load: a float cannot come through ``dg.EnvVar``."""
    fraction = float(_setting("ASR_SECOND_OPINION_FRACTION", "0.01" if teacher_engine == "vllm" else "1.0"))
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"ASR_SECOND_OPINION_FRACTION={fraction}: expected a share between 0 and 1")
    return fraction


def teacher(name: str) -> TeacherResource:
    """The teacher for a deployment. On k8s it is vLLM with the H200 engine defaults and weights from the mounted
    volume; locally the CPU teacher, or vLLM (``ASR_TEACHER=vllm``) with settings for a workstation or vLLM's CPU build:
    eager mode (no minute-long graph compilation) and a few sequences in flight. Either way the second opinion is
    Whisper base on faster-whisper, on the step's CPUs (``ASR_SECOND_OPINION``; ``off`` turns it off)."""
    engine = _setting("ASR_TEACHER", "vllm" if name == "k8s" else "faster-whisper")
    second = {
        "second_opinion": _env("ASR_SECOND_OPINION", DEFAULT_SECOND_OPINION),
        "second_opinion_fraction": second_opinion_fraction(engine),
        "language": _env("ASR_LANGUAGE", "auto"),
        "languages": _env("ASR_LANGUAGES", ""),
    }
    if name == "k8s":
        return TeacherResource(
            engine=_env("ASR_TEACHER", "vllm"), model=_env("ASR_TEACHER_MODEL", DEFAULT_TEACHER_MODEL), **second
        )
    return TeacherResource(
        engine=_env("ASR_TEACHER", "faster-whisper"),
        model=_env("ASR_TEACHER_MODEL", ""),
        vllm_engine=VllmEngineSettings(enforce_eager=True, max_num_seqs=16, max_num_batched_tokens=8192),
        **second,
    )


def resources(name: str) -> dict[str, Any]:
    """The resource set for a deployment. Storage is configured the same way everywhere (env vars); on k8s the
    source and output are OSS uris and the keys come from the pods' secret."""
    return {
        "storage": StorageResource(
            source_uri=_env("ASR_SOURCE_URI", DEFAULT_SOURCE_URI),
            output_root=_env("ASR_OUTPUT_ROOT", DEFAULT_OUTPUT_ROOT),
            oss_endpoint=_env("OSS_ENDPOINT", ""),
            oss_access_key_id=_env("OSS_ACCESS_KEY_ID", ""),
            oss_access_key_secret=_env("OSS_ACCESS_KEY_SECRET", ""),
            cache_dir=_env("ASR_CACHE_DIR", "./data/cache"),
        ),
        "teacher": teacher(name),
    }
