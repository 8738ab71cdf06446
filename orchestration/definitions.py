"""The whole Keel graph in one place: every stage's assets, checks, jobs, schedules and sensors."""

import dagster as dg

from assets import (
    bundle,
    datasets,
    evaluation,
    features,
    inference,
    ingestion,
    monitoring,
    rag,
    registry,
    serving,
    streaming,
    training,
    transformation,
)
from keel.cost.dagster import cost_observations
from keel.settings import active_profile
from orchestration.dashboards import DASHBOARD_SENSORS
from orchestration.executors import executor_for
from orchestration.jobs import JOBS
from orchestration.lake_maintenance import lake_definitions
from orchestration.profiles import resources_for
from orchestration.release_sensors import RELEASE_SENSORS
from orchestration.schedules import SCHEDULES
from orchestration.sensors import SENSORS

# One module per pipeline stage, in the order data flows through them.
STAGES = [
    ingestion,
    transformation,
    features,
    training,
    evaluation,
    registry,
    # Each dataset folder's model, gates and registered model, in the dataset's group.
    datasets,
    bundle,
    inference,
    monitoring,
    serving,
    rag,
    streaming,
]

RESOURCES = resources_for()
# The weekly lake upkeep, in the profiles whose warehouse is a lake (team, production).
LAKE_JOBS, LAKE_SCHEDULES = lake_definitions(RESOURCES["warehouse"])

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(STAGES),
    asset_checks=dg.load_asset_checks_from_modules(STAGES),
    jobs=[*JOBS, *registry.REGISTRY_JOBS, *rag.RAG_JOBS, *LAKE_JOBS],
    schedules=[*SCHEDULES, *rag.RAG_SCHEDULES, *LAKE_SCHEDULES],
    sensors=[
        *SENSORS,
        *RELEASE_SENSORS,
        *DASHBOARD_SENSORS,
        cost_observations,
        *rag.RAG_SENSORS,
        *streaming.STREAM_SENSORS,
    ],
    resources=RESOURCES,
    # Steps run in their own processes here, or as Celery tasks in the team profile.
    executor=executor_for(active_profile()),
)
