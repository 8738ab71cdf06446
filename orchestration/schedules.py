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


def dataset_schedule(spec: DatasetSpec, job):
    """The dataset's job on the cadence its dataset.yaml names (a daily one: the day before)."""
    name = f"{spec.name}_schedule"
    if job.partitions_def is None:
        return dg.ScheduleDefinition(job=job, cron_schedule=spec.schedule, name=name)
    # A daily job runs each day once it is over, at the minute and hour the cron names.
    minute, hour = spec.schedule.split()[:2]
    if not (minute.isdigit() and hour.isdigit()):
        raise ValueError(
            f"dataset {spec.name!r} is daily: its schedule {spec.schedule!r} must name the "
            "minute and hour its day's run starts (e.g. '0 6 * * *')"
        )
    return dg.build_schedule_from_partitioned_job(
        job, name=name, minute_of_hour=int(minute), hour_of_day=int(hour)
    )


# A dataset folder with a `schedule` runs its job on it; a file that never changes needs none.
DATASET_SCHEDULES = [
    dataset_schedule(spec, job)
    for spec, job in zip(discover(), DATASET_JOBS, strict=True)
    if spec.schedule
]

SCHEDULES = [daily_schedule, reference_data_schedule, weekly_retrain_schedule, *DATASET_SCHEDULES]
