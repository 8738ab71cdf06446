"""Monitoring: each day's drift, prediction drift and data quality, and performance on late labels.

The reference is the last days of the champion's training set, reduced once per champion to a
profile (keel.monitoring), so a daily report only has to look at the day itself.
"""

import json
from datetime import UTC, datetime, timedelta

import dagster as dg

from assets.features import LABELS_MART
from assets.inference import DAILY_AUTOMATION, batch_predictions, read_predictions
from assets.partitions import DAILY_PARTITIONS
from keel import schema
from orchestration.resources import (
    ArtefactStore,
    FeatureStoreResource,
    MlflowResource,
    ModelGovernance,
    MonitoringResource,
)

GROUP = "monitoring"


def _image(path) -> dg.MetadataValue:
    from keel.reporting import markdown_image

    return dg.MetadataValue.md(markdown_image(path.read_bytes(), "most drifted features"))


def reference_profile(
    version: str,
    mlflow: MlflowResource,
    governance: ModelGovernance,
    artefacts: ArtefactStore,
    monitoring: MonitoringResource,
):
    """The champion's reference profile: built the first time it is needed, then loaded."""
    from keel.monitoring import (
        build_reference_profile,
        ensure_reference_profile,
        read_reference_window,
    )
    from keel.training import REGISTERED_MODEL_NAME, load_risk_model

    mlflow.configure()
    with governance.registry(mlflow) as registry:
        lineage = registry.lineage(version)
    training_set = lineage["training_set"]
    path, digest = training_set["path"], training_set["dataset_version"]

    def build():
        window = read_reference_window(path, days=monitoring.reference_days)
        model = load_risk_model(f"models:/{REGISTERED_MODEL_NAME}/{version}")
        scores = model.predict_proba(window[list(schema.MODEL_FEATURES)])
        return build_reference_profile(
            window, champion_version=version, training_set_hash=digest, reference_scores=scores
        )

    folder = artefacts.path("monitoring", "reference", f"v{version}")
    profile, built = ensure_reference_profile(
        folder, champion_version=version, training_set_hash=digest, build=build
    )
    return profile, built


@dg.asset(
    group_name=GROUP,
    kinds={"evidently", "html"},
    partitions_def=DAILY_PARTITIONS,
    deps=[batch_predictions],
    automation_condition=DAILY_AUTOMATION,
)
def drift_report(
    context: dg.AssetExecutionContext,
    mlflow: MlflowResource,
    governance: ModelGovernance,
    artefacts: ArtefactStore,
    monitoring: MonitoringResource,
) -> dg.MaterializeResult:
    """Drift of the day's features and scores against the champion's reference, and quality."""
    from keel.monitoring import (
        data_drift,
        data_quality,
        plot_drift,
        prediction_drift,
        write_drift_report,
    )

    day = context.partition_key
    frame = read_predictions(artefacts, day)
    version = str(frame["model_version"].iloc[0])
    profile, built = reference_profile(version, mlflow, governance, artefacts, monitoring)
    drift = data_drift(profile, frame, drift_share=monitoring.drift_share)
    prediction = prediction_drift(profile, frame["score"])
    quality = data_quality(frame, profile)
    report = write_drift_report(
        artefacts.path("monitoring", "drift", f"{day}.html"),
        profile,
        frame,
        drift,
        prediction=prediction,
        quality=quality,
        title=f"Keel drift and data quality, {day} (champion v{version})",
    )
    plot = plot_drift(artefacts.path("monitoring", "drift", f"{day}.png"), profile, frame, drift)
    return dg.MaterializeResult(
        metadata={
            "dataset_drift": dg.MetadataValue.bool(drift.dataset_drift),
            "share_of_drifted_features": dg.MetadataValue.float(drift.share_of_drifted_features),
            "drifted_features": dg.MetadataValue.json(list(drift.drifted_features)),
            "prediction_drift": dg.MetadataValue.bool(prediction.drift.drifted),
            "quality_issues": dg.MetadataValue.json(list(quality.issues)),
            "rows": dg.MetadataValue.int(drift.rows),
            "champion_version": dg.MetadataValue.text(version),
            "reference_built_now": dg.MetadataValue.bool(built),
            "features": dg.MetadataValue.md(drift.to_markdown()),
            "plot": _image(plot),
            "drift": dg.MetadataValue.json(drift.to_dict()),
            "report": dg.MetadataValue.path(str(report)),
        }
    )


def _labels_that_arrived(feature_store: FeatureStoreResource, day: str):
    import pandas as pd
    from upath import UPath

    path = UPath(feature_store.marts) / schema.LABELS_MART / f"{day}.parquet"
    if not path.exists():
        return pd.DataFrame(columns=[schema.ENTITY_KEY, schema.EVENT_TIMESTAMP, schema.LABEL])
    with path.open("rb") as handle:
        return pd.read_parquet(handle)


@dg.asset(
    group_name=GROUP,
    kinds={"evidently", "html"},
    partitions_def=DAILY_PARTITIONS,
    deps=[LABELS_MART, batch_predictions],
    automation_condition=DAILY_AUTOMATION,
)
def performance_report(
    context: dg.AssetExecutionContext,
    feature_store: FeatureStoreResource,
    artefacts: ArtefactStore,
    monitoring: MonitoringResource,
) -> dg.MaterializeResult:
    """Measured AUC, precision, recall and calibration of the scores whose labels arrived today."""
    import pandas as pd

    from keel.monitoring import performance, write_performance_report

    labels = _labels_that_arrived(feature_store, context.partition_key)
    observed = sorted(
        {(t - timedelta(days=1)).date().isoformat() for t in labels[schema.EVENT_TIMESTAMP]}
    )
    scored = [
        read_predictions(artefacts, day)
        for day in observed
        if artefacts.path("predictions", f"{day}.parquet").exists()
    ]
    joined = (
        pd.concat(scored).merge(labels, on=[schema.ENTITY_KEY, schema.EVENT_TIMESTAMP])
        if scored
        else pd.DataFrame(columns=["score", schema.LABEL, "model_version"])
    )
    metadata = {
        "labels_arrived": dg.MetadataValue.int(len(labels)),
        "labelled_predictions": dg.MetadataValue.int(len(joined)),
        "observation_days": dg.MetadataValue.json(observed),
    }
    if len(joined) == 0:
        return dg.MaterializeResult(metadata=metadata)
    result = performance(
        joined["score"], joined[schema.LABEL], threshold=monitoring.decision_threshold
    )
    report = write_performance_report(
        artefacts.path("monitoring", "performance", f"{context.partition_key}.html"),
        joined["score"],
        joined[schema.LABEL],
        result,
        title=f"Keel model performance on labels that arrived {context.partition_key}",
    )
    figures = {
        name: dg.MetadataValue.float(float("nan") if value is None else float(value))
        for name, value in result.summary().items()
        if name in ("auc", "precision", "recall", "brier", "expected_calibration_error")
    }
    return dg.MaterializeResult(
        metadata={
            **metadata,
            **figures,
            "model_versions": dg.MetadataValue.json(sorted(set(joined["model_version"]))),
            "performance": dg.MetadataValue.json(json.loads(json.dumps(result.to_dict()))),
            "report": dg.MetadataValue.path(str(report)),
            "measured_at": dg.MetadataValue.timestamp(datetime.now(UTC)),
        }
    )


MONITORING_ASSETS = [drift_report, performance_report]
