"""The canary sensor: judges a running canary on the prediction log, then promotes or rolls back.

It calls the same `keel.serving.release.evaluate_release` as the watcher in the ``keel serve``
supervisor; whichever acts first wins and the other finds nothing left to do. A decision is
recorded as an observation on ``canary_deployment``, so the release shows in the asset's
history next to the audit trail.
"""

import dagster as dg

from orchestration.resources import (
    ArtefactStore,
    FeatureStoreResource,
    MlflowResource,
    ModelGovernance,
    MonitoringResource,
)

SENSOR_ACTOR = "dagster:canary_sensor"


@dg.sensor(
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Judges the running canary's guardrails; promotes it or rolls it back.",
)
def canary_sensor(
    context: dg.SensorEvaluationContext,
    mlflow: MlflowResource,
    governance: ModelGovernance,
    artefacts: ArtefactStore,
    monitoring: MonitoringResource,
    feature_store: FeatureStoreResource,
):
    """Evaluate the canary once; an observation records a promotion or a rollback."""
    from datetime import datetime

    from assets.serving import CANARY_KEY, labels_for_day, prediction_log_dir
    from keel.serving.release import evaluate_release, release_state

    mlflow.configure()
    with governance.registry(mlflow) as registry:
        started = release_state(registry).canary_started_at
        # Outcomes of the accounts observed on the canary's first day, once they arrive.
        labels = (
            labels_for_day(feature_store, datetime.fromisoformat(started).date().isoformat())
            if started
            else None
        )
        outcome = evaluate_release(
            registry,
            str(prediction_log_dir(artefacts)),
            actor=SENSOR_ACTOR,
            webhook_url=monitoring.webhook_url,
            labels=labels,
        )
    if outcome.verdict is None:
        return dg.SkipReason("no canary is running")
    verdict = outcome.verdict
    if outcome.record is None:
        return dg.SkipReason(f"canary v{verdict.canary_version}: {verdict.summary()}")
    context.log.info(f"canary v{verdict.canary_version} {outcome.action}: {verdict.summary()}")
    return dg.SensorResult(
        asset_events=[
            dg.AssetObservation(
                asset_key=CANARY_KEY,
                metadata={
                    "action": dg.MetadataValue.text(outcome.action),
                    "canary_version": dg.MetadataValue.text(verdict.canary_version),
                    "champion_version": dg.MetadataValue.text(verdict.champion_version),
                    "summary": dg.MetadataValue.text(verdict.summary()),
                    "audit_record": dg.MetadataValue.int(outcome.record.id),
                    "evidence": dg.MetadataValue.json(verdict.to_dict()),
                },
            )
        ]
    )


RELEASE_SENSORS = [canary_sensor]
