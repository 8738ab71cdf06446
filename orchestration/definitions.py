"""The whole Keel graph in one place: every stage's assets, checks, jobs, schedules and sensors."""

import dagster as dg

from assets.ingestion import INGESTION_ASSETS, INGESTION_CHECKS
from assets.transformation import TRANSFORMATION_ASSETS, TRANSFORMATION_CHECKS
from orchestration.profiles import resources_for
from orchestration.sensors import landing_file_sensor

defs = dg.Definitions(
    assets=[*INGESTION_ASSETS, *TRANSFORMATION_ASSETS],
    asset_checks=[*INGESTION_CHECKS, *TRANSFORMATION_CHECKS],
    sensors=[landing_file_sensor],
    resources=resources_for(),
)
