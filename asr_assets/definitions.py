"""The one Definitions object of the code location (workspace.yaml and pyproject's [tool.dagster] point here)."""

from __future__ import annotations

import os

import dagster as dg

from asr_assets import assets, checks
from asr_assets.sensors import arrivals_sensor, rescan_schedule
from resources.storage import StorageResource
from resources.teachers import TeacherResource

DEFAULT_SOURCE_URI = "./data/sample/media"
DEFAULT_OUTPUT_ROOT = "./data/out"


def _env(name: str, default: str) -> str | dg.EnvVar:
    # Read by Dagster when the resource is built (EnvVar), not frozen into the definitions; the default applies only
    # when the variable is not set at all.
    return dg.EnvVar(name) if name in os.environ else default


all_assets = dg.load_assets_from_modules([assets])
all_checks = dg.load_asset_checks_from_modules([checks])

distill_job = dg.define_asset_job(
    "distill_job",
    selection=dg.AssetSelection.groups(assets.GROUP),
    description="Every asset of a shard, index to dataset.",
)

defs = dg.Definitions(
    # A shard's steps form one chain, so running them in the run's own process loses no parallelism and saves a
    # process spawn and code-location import per step; the CPU stages fan out to their own worker pools.
    executor=dg.in_process_executor,
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[distill_job],
    sensors=[arrivals_sensor(distill_job)],
    schedules=[rescan_schedule(distill_job)],
    resources={
        "storage": StorageResource(
            source_uri=_env("ASR_SOURCE_URI", DEFAULT_SOURCE_URI),
            output_root=_env("ASR_OUTPUT_ROOT", DEFAULT_OUTPUT_ROOT),
            oss_endpoint=_env("OSS_ENDPOINT", ""),
            oss_access_key_id=_env("OSS_ACCESS_KEY_ID", ""),
            oss_access_key_secret=_env("OSS_ACCESS_KEY_SECRET", ""),
            cache_dir=_env("ASR_CACHE_DIR", "./data/cache"),
        ),
        "teacher": TeacherResource(engine=_env("ASR_TEACHER", "faster-whisper")),
    },
)
