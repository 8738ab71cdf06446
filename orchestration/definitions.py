"""The whole Keel graph in one place: every stage's assets, checks, jobs, schedules and sensors."""

import dagster as dg

from orchestration.profiles import resources_for

defs = dg.Definitions(
    assets=[],
    resources=resources_for(),
)
