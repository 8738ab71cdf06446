"""Sensors: external events that start runs (new landing files, drift, decay, failures)."""

import json
from pathlib import Path

import dagster as dg

from assets.ingestion import LANDING_ASSET, LANDING_PARTITIONS, LANDING_SUFFIXES
from orchestration.jobs import retrain
from orchestration.resources import MonitoringResource, SourcesResource

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def landing_files(folder: Path | str) -> dict[str, str]:
    """Files ready in the landing folder, each with a signature that changes when it is rewritten.

    Hidden files are writers' temporary files (written, then renamed into place), so they are
    never picked up half-written; on an object store a file appears only once it is whole.
    """
    from keel.storage import file_signature, list_files

    return {
        path.name: file_signature(path)
        for path in list_files(folder)
        if path.suffix in LANDING_SUFFIXES
    }


@dg.sensor(
    asset_selection=[LANDING_ASSET],
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Loads each new file in the landing folder exactly once.",
)
def landing_file_sensor(context: dg.SensorEvaluationContext, sources: SourcesResource):
    """One run per new or rewritten landing file; the cursor remembers what was loaded.

    The cursor holds the files present in the folder now, not every file ever seen: a file
    moved out is forgotten, and one moved back unchanged asks again with the run key it had,
    which Dagster never launches twice.
    """
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    current = landing_files(sources.landing_dir)
    fresh = {name: signature for name, signature in current.items() if seen.get(name) != signature}
    cursor = json.dumps(current, sort_keys=True)
    if not fresh:
        reason = f"no new files among {len(current)} in {sources.landing_dir}"
        if cursor == context.cursor:
            return dg.SkipReason(reason)
        return dg.SensorResult(skip_reason=reason, cursor=cursor)  # files left: forget them
    known = set(context.instance.get_dynamic_partitions(LANDING_PARTITIONS.name))
    return dg.SensorResult(
        run_requests=[
            # The run key makes a re-evaluated tick (after a crash before the cursor was saved)
            # a no-op: Dagster never launches two runs with the same key.
            dg.RunRequest(run_key=f"{name}@{signature}", partition_key=name)
            for name, signature in fresh.items()
        ],
        dynamic_partitions_requests=[
            LANDING_PARTITIONS.build_add_request(sorted(set(fresh) - known))
        ],
        cursor=cursor,
    )


def retraining_in_flight(instance: dg.DagsterInstance) -> bool:
    """Whether a retraining run is queued or running (there is never more than one)."""
    runs = instance.get_run_records(
        dg.RunsFilter(job_name=retrain.name, statuses=IN_FLIGHT), limit=1
    )
    return bool(runs)


def _episode_sensor(
    context: dg.SensorEvaluationContext,
    monitoring: MonitoringResource,
    asset_key: dg.AssetKey,
    trigger: str,
    is_bad,
):
    """Fold new materialisations of ``asset_key`` into the episodes; retrain once per episode.

    Days are placed by partition, not by arrival: a day materialised again replaces its
    verdict. An episode's retraining waits while one queued before the episode is in flight
    (that one trains without the episode in view); one queued since covers it.
    """
    from dataclasses import replace

    from keel.retraining import EpisodeState, observe_day

    cursor = json.loads(context.cursor) if context.cursor else {}
    state = EpisodeState.from_dict(cursor.get("episode"))
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, after_storage_id=cursor.get("storage_id")),
        limit=500,
        ascending=True,
    ).records
    if not records and state.pending is None:
        return dg.SkipReason(f"no new {asset_key.to_user_string()} since the last tick")
    notes = []
    for record in records:
        materialization = record.asset_materialization
        partition = materialization.partition
        bad, reason = is_bad(materialization.metadata)
        state, episode = observe_day(
            state, partition, bad, monitoring.min_drifted_days, seen_at=record.timestamp
        )
        notes.append(f"{partition}: {reason}")
        if episode:
            # A newer episode's retraining also covers an older one still waiting.
            state = replace(state, pending=episode)
    requests = []
    if (episode := state.pending) is not None:
        in_flight = context.instance.get_run_records(
            dg.RunsFilter(job_name=retrain.name, statuses=IN_FLIGHT)
        )
        if any(run.create_timestamp.timestamp() >= episode.since for run in in_flight):
            notes.append(f"{episode.partition}: a retraining queued since the episode covers it")
            state = replace(state, pending=None)
        elif in_flight:
            notes.append(
                f"{episode.partition}: waiting for the retraining queued before the episode"
            )
        else:
            requests.append(
                dg.RunRequest(
                    # One retraining per episode, keyed by the partition that completed it: a
                    # tick evaluated twice (or after a crash) asks again with the same key, a
                    # no-op.
                    run_key=f"{trigger}:{episode.partition}",
                    job_name=retrain.name,
                    tags={"keel/trigger": trigger, "keel/partition": episode.partition},
                )
            )
            state = replace(state, pending=None)
    context.log.info("\n".join(notes))
    storage_id = records[-1].storage_id if records else cursor.get("storage_id")
    return dg.SensorResult(
        run_requests=requests,
        cursor=json.dumps({"storage_id": storage_id, "episode": state.to_dict()}),
    )


@dg.sensor(
    job=retrain,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts one retraining per drift episode that lasts long enough.",
)
def drift_sensor(context: dg.SensorEvaluationContext, monitoring: MonitoringResource):
    """Retrain when the daily drift reports show a lasting drift of the model's inputs."""
    from keel.monitoring import DriftResult, RetrainPolicy, should_retrain

    policy = RetrainPolicy(drift_share=monitoring.drift_share, min_rows=monitoring.min_rows)

    def drifted(metadata):
        decision = should_retrain(DriftResult.from_dict(metadata["drift"].value), policy)
        return decision.retrain, decision.reason

    return _episode_sensor(context, monitoring, dg.AssetKey("drift_report"), "drift", drifted)


@dg.sensor(
    job=retrain,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts one retraining per episode of AUC below the configured minimum.",
)
def performance_sensor(context: dg.SensorEvaluationContext, monitoring: MonitoringResource):
    """Retrain when the AUC measured on late labels stays below the minimum."""
    from keel.monitoring import PerformanceResult, RetrainPolicy, should_retrain

    policy = RetrainPolicy(min_auc=monitoring.min_auc, min_rows=monitoring.min_rows)

    def decayed(metadata):
        if "performance" not in metadata:
            return False, "no labelled predictions"
        result = PerformanceResult.from_dict(metadata["performance"].value)
        decision = should_retrain(result, policy)
        return decision.retrain, decision.reason

    return _episode_sensor(
        context, monitoring, dg.AssetKey("performance_report"), "performance", decayed
    )


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Posts every failed run to the alert webhook (or logs it when none is set).",
)
def run_failure_alert(context: dg.RunFailureSensorContext, monitoring: MonitoringResource):
    """Tell someone a run failed: POST to the webhook from configuration, else log it."""
    import requests

    run = context.dagster_run
    # The run's own message only names the failed steps; the person alerted needs their errors.
    steps = context.instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE
    ).records
    step_errors = {}
    for record in steps:
        error = record.event_log_entry.dagster_event.step_failure_data.error
        if error is not None:
            step_errors[record.event_log_entry.step_key] = error.message.strip()
    payload = {
        "text": f"Keel run {run.run_id} of job {run.job_name} failed",
        "run_id": run.run_id,
        "job": run.job_name,
        "error": context.failure_event.message,
        "step_errors": step_errors,
        "tags": dict(run.tags),
    }
    if not monitoring.webhook_url:
        context.log.warning(f"no alert webhook configured; failure: {json.dumps(payload)}")
        return
    response = requests.post(monitoring.webhook_url, json=payload, timeout=10)
    response.raise_for_status()


SENSORS = [landing_file_sensor, drift_sensor, performance_sensor, run_failure_alert]
