"""Batch inference: each day's accounts scored by the champion, features from Feast."""

from datetime import date

import dagster as dg

from assets.features import FEATURES_MART, feast_registry
from assets.partitions import DAILY_PARTITIONS
from orchestration.resources import (
    ArtefactStore,
    FeatureStoreResource,
    MlflowResource,
    ModelGovernance,
    MonitoringResource,
)

GROUP = "inference"
PREDICTIONS_FOLDER = "predictions"

# Score a day as soon as its features are in and their blocking checks passed.
DAILY_AUTOMATION = (
    dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()
)


def predictions_path(artefacts: ArtefactStore, day: str):
    """Where one day's predictions live (a UPath: local folder or object store)."""
    return artefacts.path(PREDICTIONS_FOLDER, f"{day}.parquet")


def read_predictions(artefacts: ArtefactStore, day: str):
    """One day's predictions as a DataFrame; a clear failure when the day was never scored."""
    import pandas as pd

    path = predictions_path(artefacts, day)
    if not path.exists():
        raise dg.Failure(f"no predictions for {day} ({path}): materialise batch_predictions")
    with path.open("rb") as handle:
        return pd.read_parquet(handle)


def champion(mlflow: MlflowResource, governance: ModelGovernance):
    """The champion's version number and model, refused unless the audit log approves it.

    A refusal fails the run, which the run-failure sensor posts to the alert webhook.
    """
    from keel.inference import InferenceError, approved_champion
    from keel.registry import RegistryError
    from keel.training import REGISTERED_MODEL_NAME, load_risk_model

    mlflow.configure()
    try:
        with governance.registry(mlflow) as registry:
            version = approved_champion(registry)
    except (InferenceError, RegistryError) as error:
        raise dg.Failure(f"batch scoring refused: {error}") from error
    return version, load_risk_model(f"models:/{REGISTERED_MODEL_NAME}/{version}")


@dg.asset(
    group_name=GROUP,
    kinds={"feast", "mlflow", "parquet"},
    partitions_def=DAILY_PARTITIONS,
    deps=[feast_registry, FEATURES_MART],
    automation_condition=DAILY_AUTOMATION,
)
def batch_predictions(
    context: dg.AssetExecutionContext,
    feature_store: FeatureStoreResource,
    mlflow: MlflowResource,
    governance: ModelGovernance,
    artefacts: ArtefactStore,
    monitoring: MonitoringResource,
) -> dg.MaterializeResult:
    """The day's accounts scored by the champion, with the model version that scored them."""
    from keel.inference import entity_rows, score_day, summarise_scores, write_predictions

    day = date.fromisoformat(context.partition_key)
    version, model = champion(mlflow, governance)
    frame = score_day(feature_store.store(), model, version, entity_rows(feature_store.marts, day))
    target = write_predictions(frame, predictions_path(artefacts, context.partition_key))
    summary = summarise_scores(frame["score"].to_numpy(), monitoring.decision_threshold)
    return dg.MaterializeResult(
        metadata={
            "rows": dg.MetadataValue.int(summary.rows),
            "model_version": dg.MetadataValue.text(version),
            "mean_score": dg.MetadataValue.float(summary.mean),
            "flagged_share": dg.MetadataValue.float(summary.flagged_share),
            "score_quantiles": dg.MetadataValue.json(summary.quantiles),
            "score_histogram": dg.MetadataValue.md(summary.to_markdown()),
            "path": dg.MetadataValue.path(str(target)),
        }
    )


INFERENCE_ASSETS = [batch_predictions]
