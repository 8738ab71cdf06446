"""Serving assets: the canary release of the challenger, and each day's live traffic.

The maths lives in ``keel.serving`` (guardrails, release, live); these wrappers read the
registry and the prediction log that every ``keel serve`` worker writes under the artefacts
folder, and record what a person checks first.
"""

from datetime import date, timedelta

import dagster as dg
from pydantic import Field

from assets.features import LABELS_MART
from assets.partitions import DAILY_PARTITIONS
from orchestration.resources import (
    ArtefactStore,
    FeatureStoreResource,
    MlflowResource,
    ModelGovernance,
    MonitoringResource,
)

GROUP = "serving"
CANARY_KEY = dg.AssetKey("canary_deployment")
SHADOW_KEY = dg.AssetKey("shadow_report")


def prediction_log_dir(artefacts: ArtefactStore):
    """The folder ``keel serve`` writes its prediction log to (``artefacts/prediction_log``)."""
    from keel.serving.prediction_log import PREDICTION_LOG_DIRNAME

    return artefacts.path(PREDICTION_LOG_DIRNAME)


def _day_log(artefacts: ArtefactStore, day: str):
    from keel.serving.prediction_log import read_prediction_log

    start = date.fromisoformat(day)
    return read_prediction_log(
        str(prediction_log_dir(artefacts)),
        since=start.isoformat(),
        until=(start + timedelta(days=1)).isoformat(),
    )


class CanaryConfig(dg.Config):
    """How much traffic the canary gets and the guardrails that judge it."""

    share: float = Field(default=0.1, gt=0.0, lt=1.0, description="Share of entities routed.")
    window_minutes: float = Field(default=15.0, description="Sliding window judged.")
    min_requests: int = Field(default=200, description="Rows per arm before judging.")
    max_error_rate: float = Field(default=0.01, description="Largest canary error rate.")
    max_p99_ratio: float = Field(default=1.5, description="Canary p99 over champion p99.")
    max_psi: float = Field(default=0.2, description="PSI of canary live vs held-out scores.")
    promote_after_requests: int = Field(default=2_000, description="Canary rows to promote.")
    promote_after_minutes: float = Field(default=30.0, description="Minutes to promote.")
    started_by: str = Field(default="keel-pipeline", description="Actor in the audit trail.")


def latest_shadow_comparison(instance: dg.DagsterInstance, versions: list[str]):
    """(comparison, day, version) of the newest shadow report that shadowed one of ``versions``."""
    records = instance.fetch_materializations(SHADOW_KEY, limit=30).records
    for record in records:
        comparison = record.asset_materialization.metadata.get("comparison")
        shadowed = comparison.value.get("shadow_versions", []) if comparison else []
        for version in versions:
            if version in shadowed:
                return comparison.value, record.asset_materialization.partition, version
    return None


def _latest_shadow_verdict(context: dg.AssetExecutionContext, version: str):
    """The shadow gate of the newest shadow report that shadowed ``version``, if any."""
    from keel.gates import shadow_gate

    found = latest_shadow_comparison(context.instance, [version])
    if found is None:
        return (None, "no shadow report of this version"), None
    return shadow_gate(found[0]), found[1]


@dg.asset(group_name=GROUP, kinds={"mlflow", "fastapi"}, deps=["registered_model"])
def canary_deployment(
    context: dg.AssetExecutionContext,
    config: CanaryConfig,
    mlflow: MlflowResource,
    governance: ModelGovernance,
) -> dg.MaterializeResult:
    """A canary of the registered challenger on a sticky share of the served entities."""
    from keel.registry import RegistryError
    from keel.serving.guardrails import GuardrailPolicy
    from keel.serving.release import ReleaseError, release_state, start_canary

    policy = GuardrailPolicy(
        **config.model_dump(exclude={"share", "started_by"}),
    )
    mlflow.configure()
    with governance.registry(mlflow) as registry:
        state = release_state(registry)
        challenger = registry.challenger()
        if challenger is None or challenger == state.champion:
            raise dg.Failure(
                "there is no challenger to release: register one (the retrain job); with "
                "auto_approve on and release='direct', registration promotes it to champion "
                "directly (set the governance resource's release to 'canary')"
            )
        (passed, why), shadow_day = _latest_shadow_verdict(context, challenger)
        if passed is False:
            raise dg.Failure(f"version {challenger} failed the shadow gate ({shadow_day}): {why}")
        try:
            if state.canary == challenger:
                record = None
            else:
                record = start_canary(
                    registry,
                    challenger,
                    config.started_by,
                    share=config.share,
                    policy=policy,
                    auto_approve=governance.auto_approve,
                )
        except (RegistryError, ReleaseError) as error:
            raise dg.Failure(str(error)) from error
        state = release_state(registry)
    return dg.MaterializeResult(
        metadata={
            "canary_version": dg.MetadataValue.text(state.canary or "none"),
            "champion_version": dg.MetadataValue.text(state.champion or "none"),
            "share": dg.MetadataValue.float(state.canary_share),
            "started_at": dg.MetadataValue.text(state.canary_started_at),
            "already_running": dg.MetadataValue.bool(record is None),
            "shadow_gate": dg.MetadataValue.text(why),
            "policy": dg.MetadataValue.json(state.to_dict()["canary_policy"] or {}),
            "audit_record": dg.MetadataValue.int(record.id if record else 0),
        }
    )


@dg.asset(group_name=GROUP, kinds={"parquet"}, partitions_def=DAILY_PARTITIONS)
def online_predictions(
    context: dg.AssetExecutionContext, artefacts: ArtefactStore
) -> dg.MaterializeResult:
    """The day's live predictions from the serving log, one row per scored entity."""
    import io

    import numpy as np

    from keel.files import atomic_write
    from keel.serving.live import online_frame

    day = context.partition_key
    frame = online_frame(_day_log(artefacts, day))
    target = artefacts.path("online_predictions", f"{day}.parquet")
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write(target, buffer.getvalue())
    latency = frame["latency_ms"].to_numpy(dtype=float)
    return dg.MaterializeResult(
        metadata={
            "rows": dg.MetadataValue.int(len(frame)),
            "requests": dg.MetadataValue.int(int(frame["request_id"].nunique())),
            "rows_by_arm": dg.MetadataValue.json(frame["arm"].value_counts().to_dict()),
            "versions": dg.MetadataValue.json(sorted({str(v) for v in frame["model_version"]})),
            "canary_fallbacks": dg.MetadataValue.int(int(frame["error"].notna().sum())),
            "cache_hit_share": dg.MetadataValue.float(
                float(frame["cache_hit"].mean()) if len(frame) else 0.0
            ),
            "p99_latency_ms": dg.MetadataValue.float(
                float(np.quantile(latency, 0.99)) if len(frame) else float("nan")
            ),
            "path": dg.MetadataValue.path(str(target)),
        }
    )


def labels_for_day(feature_store: FeatureStoreResource, day: str):
    """Outcomes of the accounts observed on ``day`` that have arrived so far."""
    import pandas as pd
    from upath import UPath

    from keel import schema
    from keel.inference import day_end

    folder = UPath(feature_store.marts) / schema.LABELS_MART
    frames = []
    for path in sorted(folder.glob("*.parquet")) if folder.exists() else []:
        if path.stem >= day:
            with path.open("rb") as handle:
                frames.append(pd.read_parquet(handle))
    if not frames:
        return pd.DataFrame(columns=[schema.ENTITY_KEY, "label"])
    labels = pd.concat(frames)
    observed = labels[
        labels[schema.EVENT_TIMESTAMP] == pd.Timestamp(day_end(date.fromisoformat(day)))
    ]
    return observed.rename(columns={schema.LABEL: "label"})[[schema.ENTITY_KEY, "label"]]


@dg.asset(
    group_name=GROUP,
    kinds={"parquet"},
    partitions_def=DAILY_PARTITIONS,
    deps=[online_predictions, LABELS_MART],
)
def shadow_report(
    context: dg.AssetExecutionContext,
    artefacts: ArtefactStore,
    feature_store: FeatureStoreResource,
    monitoring: MonitoringResource,
) -> dg.MaterializeResult:
    """The shadow model against the served scores on the day's traffic: agreement, latency, AUC."""
    import json

    from keel.files import atomic_write
    from keel.gates import shadow_gate
    from keel.serving.live import compare_shadow

    day = context.partition_key
    frame = _day_predictions(artefacts, day)
    comparison = compare_shadow(
        frame, monitoring.decision_threshold, labels_for_day(feature_store, day)
    ).to_dict()
    passed, why = shadow_gate(comparison)
    target = artefacts.path("monitoring", "shadow", f"{day}.json")
    atomic_write(target, json.dumps({**comparison, "gate": passed, "gate_detail": why}, indent=2))

    def number(name: str) -> dg.MetadataValue:
        value = comparison[name]
        return dg.MetadataValue.float(float("nan") if value is None else float(value))

    return dg.MaterializeResult(
        metadata={
            "shadowed_rows": dg.MetadataValue.int(comparison["rows"]),
            "shadow_versions": dg.MetadataValue.json(comparison["shadow_versions"]),
            "agreement": number("agreement"),
            "pearson": number("pearson"),
            "shadow_p99_ms": number("shadow_p99_ms"),
            "served_p99_ms": number("served_p99_ms"),
            "shadow_auc": number("shadow_auc"),
            "served_auc": number("served_auc"),
            "gate": dg.MetadataValue.text(
                {True: "passed", False: "failed", None: "not judged"}[passed] + f": {why}"
            ),
            "comparison": dg.MetadataValue.json(comparison),
            "path": dg.MetadataValue.path(str(target)),
        }
    )


@dg.asset(
    group_name=GROUP,
    kinds={"evidently", "html"},
    partitions_def=DAILY_PARTITIONS,
    deps=[online_predictions],
)
def online_drift_report(
    context: dg.AssetExecutionContext,
    mlflow: MlflowResource,
    governance: ModelGovernance,
    artefacts: ArtefactStore,
    monitoring: MonitoringResource,
) -> dg.MaterializeResult:
    """Drift of the day's live features and champion scores against the champion's reference."""
    from assets.monitoring import reference_profile
    from keel.monitoring import data_drift, prediction_drift, write_drift_report

    day = context.partition_key
    frame = _day_predictions(artefacts, day)
    frame = frame[frame["arm"] == "champion"]
    if frame.empty:
        raise dg.Failure(f"no champion traffic was logged on {day}")
    version = str(frame["model_version"].mode().iloc[0])
    frame = frame[frame["model_version"].astype(str) == version]
    profile, _ = reference_profile(version, mlflow, governance, artefacts, monitoring)
    drift = data_drift(profile, frame, drift_share=monitoring.drift_share)
    prediction = prediction_drift(profile, frame["score"])
    report = write_drift_report(
        artefacts.path("monitoring", "online_drift", f"{day}.html"),
        profile,
        frame,
        drift,
        prediction=prediction,
        title=f"Keel drift on live traffic, {day} (champion v{version})",
    )
    return dg.MaterializeResult(
        metadata={
            "dataset_drift": dg.MetadataValue.bool(drift.dataset_drift),
            "share_of_drifted_features": dg.MetadataValue.float(drift.share_of_drifted_features),
            "drifted_features": dg.MetadataValue.json(list(drift.drifted_features)),
            "prediction_drift": dg.MetadataValue.bool(prediction.drift.drifted),
            "rows": dg.MetadataValue.int(drift.rows),
            "champion_version": dg.MetadataValue.text(version),
            "report": dg.MetadataValue.path(str(report)),
        }
    )


SERVING_ASSETS = [canary_deployment, online_predictions, shadow_report, online_drift_report]


def _day_predictions(artefacts: ArtefactStore, day: str):  # -> pandas.DataFrame
    """The day's logged online predictions, as the ``online_predictions`` asset wrote them."""
    import pandas as pd

    path = artefacts.path("online_predictions", f"{day}.parquet")
    if not path.exists():
        raise dg.Failure(f"no online predictions for {day}: materialise online_predictions")
    with path.open("rb") as handle:
        return pd.read_parquet(handle)
