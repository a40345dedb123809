"""The Kubernetes deployment without a cluster: each step's V1Job built by dagster-k8s' own job construction from the
assets' tags, the k8s executor's config, and the Helm values and images that go with them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config
from kubernetes.client import ApiClient, V1Job

from asr_assets import deployment
from asr_assets.definitions import all_assets
from partitions import PARTITIONS_PER_GPU_RUN

ROOT = Path(__file__).resolve().parents[1]
PER_SHARD = {a.key.to_user_string(): a for a in all_assets if a.partitions_def is not None}


def step_job(asset: dg.AssetsDefinition) -> V1Job:
    """The Job the k8s executor would create for the asset's step (same function, same inputs, minus the cluster)."""
    config = DagsterK8sJobConfig(
        job_image="asr-distill-cpu:run",
        dagster_home="/opt/dagster/dagster_home",
        instance_config_map="dagster-instance",
    )
    return construct_dagster_k8s_job(
        config,
        args=["dagster", "api", "execute_step"],
        job_name=f"dagster-step-{asset.key.to_user_string()}",
        user_defined_k8s_config=get_user_defined_k8s_config(asset.op.tags),
        component="step_worker",
    )


def as_manifest(job: V1Job) -> dict:
    # The kubernetes client's own serialisation: what would be POSTed to the API server.
    return ApiClient().sanitize_for_serialization(job)


def test_the_teacher_step_asks_for_an_h200_with_shared_memory_and_the_weights() -> None:
    job = as_manifest(step_job(PER_SHARD["transcripts"]))
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "asr-distill-gpu:latest"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["teacher-weights"]["persistentVolumeClaim"]["readOnly"] is True
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert mounts["teacher-weights"]["mountPath"] == "/models" and mounts["teacher-weights"]["readOnly"] is True
    # The k8s teacher reads its weights from that mount, never from a hub.
    assert deployment.DEFAULT_TEACHER_MODEL.startswith("/models/")


@pytest.mark.parametrize("name", ["media_index", "audio_wav", "vad_segments", "segment_features", "distilled_dataset"])
def test_cpu_steps_get_cpu_pods_sized_for_their_pools(name: str) -> None:
    job = as_manifest(step_job(PER_SHARD[name]))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "asr-distill-cpu:latest"
    resources = container["resources"]
    assert "nvidia.com/gpu" not in resources["limits"]
    # Requests equal limits (Guaranteed QoS), and the pool follows the CPU limit through the cgroup quota.
    assert resources["requests"] == resources["limits"]
    assert int(resources["limits"]["cpu"]) >= 2
    if name in ("audio_wav", "vad_segments", "segment_features"):
        assert int(resources["limits"]["cpu"]) == 8


def test_a_malformed_k8s_tag_is_refused() -> None:
    bad = {"dagster-k8s/config": json.dumps({"container_config": {"resourcez": {"limits": {"cpu": "1"}}}})}
    with pytest.raises(Exception, match="resourcez"):
        get_user_defined_k8s_config(bad)
    typo = {"dagster-k8s/config": json.dumps({"pod_spec_config": {"node_selectr": {"a": "b"}}})}
    with pytest.raises(Exception, match="node_selectr"):
        construct_dagster_k8s_job(
            DagsterK8sJobConfig(job_image="x", dagster_home="/h", instance_config_map="m"),
            args=["dagster"],
            job_name="dagster-step-x",
            user_defined_k8s_config=get_user_defined_k8s_config(typo),
        )


def test_gpu_steps_are_limited_per_run_and_across_runs() -> None:
    transcripts = PER_SHARD["transcripts"]
    assert transcripts.op.tags[deployment.GPU_TAG] == deployment.GPU_POOL
    assert transcripts.op.pool == deployment.GPU_POOL
    assert transcripts.backfill_policy.max_partitions_per_run == PARTITIONS_PER_GPU_RUN > 1
    # configured() checks this config against k8s_job_executor's schema when the executor is built.
    assert deployment.executor("k8s").name == "asr_k8s_job_executor"
    (limit,) = deployment.k8s_executor_config()["tag_concurrency_limits"]
    assert limit == {"key": deployment.GPU_TAG, "value": deployment.GPU_POOL, "limit": 1}


def test_asr_deployment_switches_executor_and_teacher() -> None:
    script = (
        "from asr_assets.definitions import defs\n"
        "job = defs.get_job_def('distill_job')\n"
        "teacher = defs.resources['teacher']\n"
        "print(job.executor_def.name, teacher.engine, teacher.model, teacher.vllm_engine.enforce_eager)\n"
    )
    env = {**os.environ, "ASR_DEPLOYMENT": "k8s"}
    env.pop("ASR_TEACHER", None)
    env.pop("ASR_TEACHER_MODEL", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["asr_k8s_job_executor", "vllm", deployment.DEFAULT_TEACHER_MODEL, "False"]
    env["ASR_DEPLOYMENT"] = "cloud"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and "ASR_DEPLOYMENT='cloud'" in done.stderr


def test_helm_values_deploy_this_code_location_with_k8s_settings() -> None:
    values = yaml.safe_load((ROOT / "deploy/helm/values.yaml").read_text())
    (location,) = values["dagster-user-deployments"]["deployments"]
    env = {e["name"]: e.get("value") for e in location["env"]}
    assert env["ASR_DEPLOYMENT"] == "k8s"
    assert location["dagsterApiGrpcArgs"] == ["--module-name", "asr_assets.definitions"]
    assert env["ASR_GPU_IMAGE"].split(":")[0].endswith("asr-distill-gpu")
    assert location["image"]["repository"].endswith("asr-distill-cpu")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] or values["postgresql"]["postgresqlHost"]
    # Secrets reach pods as env vars from a k8s Secret, never as literal values in the chart.
    assert "OSS_ACCESS_KEY_SECRET" not in env and location["envSecrets"]
    dockerfiles = {p.name: p.read_text() for p in (ROOT / "deploy").glob("Dockerfile.*")}
    assert set(dockerfiles) == {"Dockerfile.cpu", "Dockerfile.gpu"}
    assert "vllm==" in dockerfiles["Dockerfile.gpu"] and "nvidia/cuda" in dockerfiles["Dockerfile.gpu"]
    assert "vllm" not in dockerfiles["Dockerfile.cpu"]
