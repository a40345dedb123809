"""The one Definitions object of the code location (workspace.yaml and pyproject's [tool.dagster] point here).

`ASR_DEPLOYMENT` (local | k8s) selects the executor and resources: see `asr_assets/deployment.py`.
"""

from __future__ import annotations

import warnings

import dagster as dg

from asr_assets import assets, checks, deployment
from asr_assets.sensors import arrivals_sensor, pending_work_sensor, rescan_schedule

# distill_job runs one shard per run; only a backfill groups the teacher's shards (its BackfillPolicy), which Dagster
# reports on every load of the job as "varying BackfillPolicies": expected here, and nothing a user can act on.
warnings.filterwarnings("ignore", message=".*varying BackfillPolicies.*")

DEPLOYMENT = deployment.deployment()

all_assets = dg.load_assets_from_modules([assets])
all_checks = dg.load_asset_checks_from_modules([checks])

distill_job = dg.define_asset_job(
    "distill_job",
    selection=dg.AssetSelection.groups(assets.GROUP),
    description="Every asset of a shard, index to dataset.",
)

defs = dg.Definitions(
    executor=deployment.executor(DEPLOYMENT),
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[distill_job],
    sensors=[arrivals_sensor(distill_job), pending_work_sensor(distill_job)],
    schedules=[rescan_schedule(distill_job)],
    resources=deployment.resources(DEPLOYMENT),
)
