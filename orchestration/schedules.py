"""Cadences: every day the data, features, scores and monitoring; every week a retraining."""

import dagster as dg

from keel.datasets.spec import DatasetSpec, discover
from orchestration.jobs import DATASET_JOBS, daily_pipeline, reference_data, retrain

# Each day's partition runs once the day is over (02:00 UTC the next morning).
daily_schedule = dg.build_schedule_from_partitioned_job(
    daily_pipeline, hour_of_day=2, minute_of_hour=0, name="daily_pipeline_schedule"
)

reference_data_schedule = dg.ScheduleDefinition(
    job=reference_data, cron_schedule="0 1 * * *", name="reference_data_schedule"
)

# Weekly retraining on Mondays; drift and performance sensors can trigger one sooner.
weekly_retrain_schedule = dg.ScheduleDefinition(
    job=retrain, cron_schedule="0 4 * * 1", name="weekly_retrain_schedule"
)


def dataset_schedule(spec: DatasetSpec, job) -> dg.ScheduleDefinition:
    """The dataset's job on the cadence its dataset.yaml names."""
    return dg.ScheduleDefinition(job=job, cron_schedule=spec.schedule, name=f"{spec.name}_schedule")


# A dataset folder with a `schedule` runs its job on it; a file that never changes needs none.
DATASET_SCHEDULES = [
    dataset_schedule(spec, job)
    for spec, job in zip(discover(), DATASET_JOBS, strict=True)
    if spec.schedule
]

SCHEDULES = [daily_schedule, reference_data_schedule, weekly_retrain_schedule, *DATASET_SCHEDULES]
