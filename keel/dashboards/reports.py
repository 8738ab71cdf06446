"""The daily monitoring reports as the dashboards read them: figures per dataset, report and day.

The drift and performance assets record their full-data results in their materialisation
metadata (the same results the retraining sensors read); a dataset folder's ``<name>/drift``
asset records the PSI drift of each load and its ``<name>/scores`` asset the scores of each
load; ``rag_monitoring`` records a day of questions to the RAG service. Each materialisation
becomes one :class:`DailyReport` of its partition's day (an unpartitioned one: the day it was
recorded); the dataset is the asset key's prefix (``loans/drift_report`` and ``loans/drift``
belong to ``loans``), ``rag`` for the RAG monitoring, a ``dataset`` metadata entry when the key
has no prefix, else :data:`DEFAULT_DATASET`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# The monitoring assets' names (the last part of their keys) and the report each one writes.
REPORT_ASSETS = {"drift_report": "drift", "performance_report": "performance"}
# A dataset folder's assets (keyed <dataset>/<name>) and the report each one writes: the
# drift of each load (PSI per feature) and its scores.
LOAD_DRIFT_ASSET = "drift"
FOLDER_ASSETS = {LOAD_DRIFT_ASSET: "drift", "scores": "scores"}
# Unprefixed monitoring assets of a fixed project: asset -> (report, project).
PROJECT_ASSETS = {"rag_monitoring": ("rag", "rag")}
DEFAULT_DATASET = "default"
FEATURE_SCORE_PREFIX = "drift_score."


class ReportMetadataError(ValueError):
    """A monitoring materialisation whose metadata lacks what its report always records."""


@dataclass(frozen=True)
class DailyReport:
    """One day's figures of one report of one dataset, and the event they came from."""

    dataset: str
    report: str
    day: str
    figures: dict[str, float]
    storage_id: int

    @property
    def features(self) -> list[str]:
        """The monitored features whose drift score is among the figures."""
        return sorted(
            name.removeprefix(FEATURE_SCORE_PREFIX)
            for name in self.figures
            if name.startswith(FEATURE_SCORE_PREFIX)
        )


def dataset_of(asset_path: Sequence[str], metadata: Mapping[str, Any]) -> str:
    """The dataset a monitoring asset reports on: its key's prefix, else its project or metadata."""
    if len(asset_path) > 1:
        return "/".join(asset_path[:-1])
    if asset_path[-1] in PROJECT_ASSETS:
        return PROJECT_ASSETS[asset_path[-1]][1]
    return str(metadata.get("dataset") or DEFAULT_DATASET)


def _flag(value: Any) -> float:
    return 1.0 if value else 0.0


def drift_figures(metadata: Mapping[str, Any]) -> dict[str, float]:
    """Drift share, drifted-feature count, flags, quality issues and per-feature drift scores."""
    from keel.monitoring import DriftResult

    if "drift" not in metadata:
        raise ReportMetadataError("a drift report's metadata has no 'drift' entry")
    drift = DriftResult.from_dict(metadata["drift"])
    figures = {
        "share_of_drifted_features": float(drift.share_of_drifted_features),
        "drifted_features": float(drift.number_of_drifted_features),
        "features": float(len(drift.features)),
        "dataset_drift": _flag(drift.dataset_drift),
        "rows": float(drift.rows),
    }
    if "prediction_drift" in metadata:
        figures["prediction_drift"] = _flag(metadata["prediction_drift"])
    if "quality_issues" in metadata:
        figures["quality_issues"] = float(len(metadata["quality_issues"]))
    for feature in drift.features:
        if math.isfinite(feature.score):
            figures[FEATURE_SCORE_PREFIX + feature.column] = float(feature.score)
    return figures


PERFORMANCE_FIGURES = ("auc", "precision", "recall", "brier", "expected_calibration_error")


def performance_figures(metadata: Mapping[str, Any]) -> dict[str, float] | None:
    """AUC, precision, recall, Brier score, calibration error and counts; None without labels.

    A figure that is undefined on the day (AUC when every label is one class) is left out.
    """
    from keel.monitoring import PerformanceResult

    if "performance" not in metadata:
        return None
    result = PerformanceResult.from_dict(metadata["performance"])
    summary = result.summary()
    figures = {
        name: float(summary[name])
        for name in PERFORMANCE_FIGURES
        if summary.get(name) is not None and math.isfinite(float(summary[name]))
    }
    figures["labelled_predictions"] = float(result.rows)
    figures["positives"] = float(result.positives)
    return figures


def load_drift_figures(metadata: Mapping[str, Any]) -> dict[str, float]:
    """Drift share, drifted-feature count and the largest PSI of a dataset folder's load."""
    missing = [name for name in ("drift_share", "drifted_features") if name not in metadata]
    if missing:
        raise ReportMetadataError(f"a load's drift metadata has no {', '.join(missing)}")
    figures = {
        "share_of_drifted_features": float(metadata["drift_share"]),
        "drifted_features": float(metadata["drifted_features"]),
    }
    if metadata.get("max_psi") is not None and math.isfinite(float(metadata["max_psi"])):
        figures["max_psi"] = float(metadata["max_psi"])
    return figures


def _figures(metadata: Mapping[str, Any], names: Mapping[str, str], what: str) -> dict[str, float]:
    """The figures ``names`` maps (metadata entry -> figure) that are finite numbers."""
    missing = sorted(name for name in names if name not in metadata)
    if missing:
        raise ReportMetadataError(f"{what} metadata has no {', '.join(missing)}")
    figures = {}
    for entry, figure in names.items():
        value = float(metadata[entry])
        if math.isfinite(value):
            figures[figure] = value
    return figures


# Metadata entry -> figure, of a dataset folder's scores and of the RAG monitoring.
SCORE_FIGURES = {
    "rows": "scored_rows",
    "mean_score": "mean_score",
    "flagged_share": "flagged_share",
}
RAG_FIGURES = {
    "questions": "questions",
    "unanswered_share": "unanswered_share",
    "cache_hit_rate": "cache_hit_rate",
    "drift_distance": "question_drift_distance",
    "drift_model_auc": "question_drift_model_auc",
}


def report_kind(asset_path: Sequence[str]) -> str | None:
    """The report the asset of this key writes (drift, performance, scores, rag), or None."""
    name = asset_path[-1]
    if len(asset_path) > 1 and name in FOLDER_ASSETS:
        return FOLDER_ASSETS[name]
    if len(asset_path) == 1 and name in PROJECT_ASSETS:
        return PROJECT_ASSETS[name][0]
    return REPORT_ASSETS.get(name)


def is_report_asset(asset_path: Sequence[str]) -> bool:
    """Whether the asset of this key writes one of the reports the dashboards plot."""
    return report_kind(asset_path) is not None


def daily_report(
    asset_path: Sequence[str],
    partition: str | None,
    metadata: Mapping[str, Any],
    storage_id: int,
    *,
    recorded_at: float | None = None,
) -> DailyReport | None:
    """The report of one materialisation of a monitoring asset; None when it holds no figures.

    Its day is the partition's; an unpartitioned report's is the UTC day of ``recorded_at``.
    """
    name = "/".join(asset_path)
    if not is_report_asset(asset_path):
        raise ValueError(f"{name} is not a monitoring report asset")
    if partition:
        day = partition
    elif recorded_at is not None:
        day = datetime.fromtimestamp(recorded_at, UTC).date().isoformat()
    else:
        raise ReportMetadataError(f"{name} was materialised without a day")
    report = str(report_kind(asset_path))
    if report == "scores":
        figures = _figures(metadata, SCORE_FIGURES, "a load's scores")
    elif report == "rag":
        figures = _figures(metadata, RAG_FIGURES, "the RAG monitoring's")
    elif len(asset_path) > 1 and asset_path[-1] == LOAD_DRIFT_ASSET:
        figures = load_drift_figures(metadata)
    elif report == "drift":
        figures = drift_figures(metadata)
    else:
        figures = performance_figures(metadata)
    if figures is None:
        return None
    return DailyReport(
        dataset=dataset_of(asset_path, metadata),
        report=report,
        day=day,
        figures=figures,
        storage_id=storage_id,
    )


@dataclass(frozen=True)
class ReportBatch:
    """Reports read from a Dagster instance, the events that could not be read, the cursor."""

    reports: list[DailyReport]
    problems: list[str]
    cursor: int | None


def reports_from_instance(
    instance: Any, after_storage_id: int | None = None, *, limit: int = 1000
) -> ReportBatch:
    """Monitoring reports materialised in a Dagster instance since ``after_storage_id``.

    The reports come in event order; the cursor is the last storage id read (``after_storage_id``
    again when nothing is new). An event whose metadata cannot be read is named in ``problems``
    instead of stopping the rest: it stays in Dagster's event log to be looked at.
    """
    import dagster as dg

    keys = [key for key in instance.get_asset_keys() if is_report_asset(key.path)]
    found, ceiling = [], None
    for key in keys:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, after_storage_id=after_storage_id),
            limit=limit,
            ascending=True,
        ).records
        if len(records) == limit:
            # More of this key wait: stop everything at its last event, the next call goes on.
            last = records[-1].storage_id
            ceiling = last if ceiling is None else min(ceiling, last)
        for record in records:
            materialization = record.asset_materialization
            metadata = {name: value.value for name, value in materialization.metadata.items()}
            found.append(
                (record.storage_id, key.path, materialization.partition, metadata, record.timestamp)
            )
    found.sort(key=lambda item: item[0])
    found = [item for item in found if ceiling is None or item[0] <= ceiling]
    reports, problems = [], []
    for storage_id, path, partition, metadata, recorded_at in found:
        try:
            report = daily_report(path, partition, metadata, storage_id, recorded_at=recorded_at)
        except (ReportMetadataError, KeyError, TypeError, ValueError) as error:
            problems.append(f"{'/'.join(path)} {partition} (event {storage_id}): {error}")
            continue
        if report is not None:
            reports.append(report)
    return ReportBatch(reports, problems, found[-1][0] if found else after_storage_id)
