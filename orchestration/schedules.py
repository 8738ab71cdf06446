"""Cadences: every day the data, features, scores and monitoring; every week a retraining."""

import dagster as dg

from orchestration.jobs import daily_pipeline, reference_data, retrain

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

SCHEDULES = [daily_schedule, reference_data_schedule, weekly_retrain_schedule]
