"""Data drift and prediction drift of one day against the champion's reference profile."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from keel.mirrors.evidently_stattests import (
    STATTESTS,
    ColumnKind,
    categorical_stattest,
    numeric_stattest,
)
from keel.monitoring.common import (
    SCORE,
    _category_counts,
    _format_score,
    _numeric_column,
    _require_columns,
    _scores_array,
)
from keel.monitoring.reference import (
    CategoricalReference,
    NumericReference,
    ProfileError,
    ReferenceProfile,
)
from keel.monitoring_policy import DEFAULT_DRIFT_SHARE
from keel.reporting import markdown_table


@dataclass(frozen=True)
class FeatureDrift:
    """The drift test of one column, as Evidently's ``ValueDrift`` reports it."""

    column: str
    kind: ColumnKind
    stattest: str
    score: float
    threshold: float
    drifted: bool
    reference_rows: int
    current_rows: int

    @property
    def display_name(self) -> str:
        return STATTESTS[self.stattest].display_name

    @property
    def score_kind(self) -> str:
        return STATTESTS[self.stattest].score_kind

    @property
    def severity(self) -> float:
        """How far past its threshold the score is (above 1: drifted), comparable across tests."""
        if self.score_kind == "distance":
            return self.score / self.threshold
        return self.threshold / max(self.score, 1e-300)


@dataclass(frozen=True)
class DriftResult:
    """Per-feature drift tests and Evidently's dataset-level verdict."""

    features: tuple[FeatureDrift, ...]
    drift_share: float
    rows: int
    champion_version: str = ""
    training_set_hash: str = ""

    @property
    def drifted_features(self) -> list[str]:
        return [f.column for f in self.features if f.drifted]

    @property
    def number_of_drifted_features(self) -> int:
        return len(self.drifted_features)

    @property
    def share_of_drifted_features(self) -> float:
        return self.number_of_drifted_features / len(self.features)

    @property
    def dataset_drift(self) -> bool:
        """Evidently's rule: the share of drifted columns reaches ``drift_share``."""
        return self.share_of_drifted_features >= self.drift_share

    def feature(self, column: str) -> FeatureDrift:
        for feature in self.features:
            if feature.column == column:
                return feature
        raise KeyError(f"No drift test for column {column!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready form (for run metadata and the sensor)."""
        return {
            "features": [asdict(f) for f in self.features],
            "drift_share": self.drift_share,
            "rows": self.rows,
            "champion_version": self.champion_version,
            "training_set_hash": self.training_set_hash,
            "dataset_drift": self.dataset_drift,
            "share_of_drifted_features": self.share_of_drifted_features,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftResult:
        return cls(
            features=tuple(FeatureDrift(**f) for f in data["features"]),
            drift_share=data["drift_share"],
            rows=data["rows"],
            champion_version=data.get("champion_version", ""),
            training_set_hash=data.get("training_set_hash", ""),
        )

    def summary(self) -> dict[str, Any]:
        """The numbers a person checks first."""
        return {
            "dataset_drift": self.dataset_drift,
            "share_of_drifted_features": round(self.share_of_drifted_features, 4),
            "number_of_drifted_features": self.number_of_drifted_features,
            "number_of_features": len(self.features),
            "drifted_features": ", ".join(self.drifted_features) or "none",
            "rows": self.rows,
            "champion_version": self.champion_version,
        }

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the per-feature table, most drifted first."""
        header = ["feature", "type", "test", "statistic", "threshold", "drifted"]
        rows = [
            [
                f.column,
                f.kind,
                f.display_name,
                _format_score(f.score),
                f"{f.threshold:g}",
                "yes" if f.drifted else "no",
            ]
            for f in sorted(self.features, key=lambda f: -f.severity)
        ]
        return header, rows

    def to_markdown(self) -> str:
        return markdown_table(*self.table())


def data_drift(
    profile: ReferenceProfile,
    current_frame: pd.DataFrame,
    *,
    drift_share: float = DEFAULT_DRIFT_SHARE,
    thresholds: Mapping[str, float] | None = None,
) -> DriftResult:
    """Test every profiled feature of ``current_frame`` for drift against the reference.

    Picks, per column, the test Evidently's ``DataDriftPreset`` picks by default and computes
    its statistic the same way, from the precomputed reference.

    Args:
        profile: The champion's reference profile.
        current_frame: The day's rows; extra columns are ignored.
        drift_share: Share of drifted features at which the dataset counts as drifted
            (Evidently's ``drift_share``).
        thresholds: Per-column thresholds replacing the test's default
            (Evidently's ``per_column_threshold``).

    Raises:
        ValueError: Missing or non-numeric columns, or a column with no non-null values.
    """
    _require_columns(current_frame, profile.features, "current")
    thresholds = dict(thresholds or {})
    if unknown := set(thresholds) - set(profile.features):
        raise ValueError(f"Thresholds given for columns that are not profiled: {sorted(unknown)}.")
    features = [
        _numeric_drift(
            column, ref, _numeric_column(current_frame, column, "current"), thresholds.get(column)
        )
        for column, ref in profile.numeric.items()
    ]
    features += [
        _categorical_drift(column, ref, current_frame[column], thresholds.get(column))
        for column, ref in profile.categorical.items()
    ]
    return DriftResult(
        features=tuple(features),
        drift_share=drift_share,
        rows=len(current_frame),
        champion_version=profile.champion_version,
        training_set_hash=profile.training_set_hash,
    )


def _numeric_drift(
    column: str, ref: NumericReference, current: np.ndarray, threshold: float | None
) -> FeatureDrift:
    finite = current[np.isfinite(current)]
    if finite.size == 0:
        raise ValueError(
            f"Column {column!r} has no non-null values in the current frame; "
            "it cannot be tested for drift."
        )
    name, score = numeric_stattest(ref, finite)
    return _feature_drift(column, "numerical", name, score, threshold, ref.rows, finite.size)


def _categorical_drift(
    column: str, ref: CategoricalReference, current: pd.Series, threshold: float | None
) -> FeatureDrift:
    cur_counts = _category_counts(current)
    if not cur_counts:
        raise ValueError(
            f"Column {column!r} has no non-null values in the current frame; "
            "it cannot be tested for drift."
        )
    name, score = categorical_stattest(ref.counts, cur_counts, ref.rows)
    return _feature_drift(
        column, "categorical", name, score, threshold, ref.rows, sum(cur_counts.values())
    )


def _feature_drift(
    column: str,
    kind: ColumnKind,
    name: str,
    score: float,
    threshold: float | None,
    reference_rows: int,
    current_rows: int,
) -> FeatureDrift:
    test = STATTESTS[name]
    threshold = test.threshold if threshold is None else float(threshold)
    return FeatureDrift(
        column=column,
        kind=kind,
        stattest=name,
        score=float(score),
        threshold=threshold,
        drifted=test.is_drift(score, threshold),
        reference_rows=int(reference_rows),
        current_rows=int(current_rows),
    )


def prediction_drift(
    profile: ReferenceProfile,
    current_scores: Sequence[float] | np.ndarray | pd.Series,
    *,
    threshold: float | None = None,
) -> PredictionDrift:
    """Test the day's scores for drift against the champion's scores on the reference window.

    Raises:
        ProfileError: The profile was built without reference scores.
        ValueError: Scores that are not numbers in [0, 1], or none at all.
    """
    if profile.scores is None:
        raise ProfileError(
            "The reference profile has no scores; build it with reference_scores= "
            "(the champion's scores on the reference window)."
        )
    scores = _scores_array(current_scores, "current scores")
    drift = _numeric_drift(SCORE, profile.scores, scores, threshold)
    return PredictionDrift(
        drift=drift,
        reference_mean=profile.scores.mean,
        current_mean=float(np.nanmean(scores)),
        rows=int(scores.size),
    )


@dataclass(frozen=True)
class PredictionDrift:
    """Drift of the model's scores, with the mean score before and now."""

    drift: FeatureDrift
    reference_mean: float
    current_mean: float
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drifted": self.drift.drifted}
