"""Model performance, once the late labels have arrived."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from keel.monitoring.common import _scores_array
from keel.monitoring_policy import DEFAULT_DECISION_THRESHOLD
from keel.reporting import markdown_table


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of the reliability table: predicted versus observed default rate."""

    lower: float
    upper: float
    rows: int
    mean_score: float | None
    observed_rate: float | None


@dataclass(frozen=True)
class PerformanceResult:
    """Discrimination and calibration of the day's scores against the arrived labels.

    ``auc`` is None when the day has a single class, ``precision`` when no row scores above
    the threshold and ``recall`` when there are no positives: undefined, not zero.
    """

    rows: int
    positives: int
    threshold: float
    auc: float | None
    precision: float | None
    recall: float | None
    brier: float
    expected_calibration_error: float
    calibration: tuple[CalibrationBin, ...]

    @property
    def prevalence(self) -> float:
        return self.positives / self.rows

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prevalence": self.prevalence}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerformanceResult:
        fields = {k: v for k, v in data.items() if k != "prevalence"}
        fields["calibration"] = tuple(CalibrationBin(**b) for b in data["calibration"])
        return cls(**fields)

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "positives": self.positives,
            "auc": self.auc,
            "precision": self.precision,
            "recall": self.recall,
            "brier": round(self.brier, 6),
            "expected_calibration_error": round(self.expected_calibration_error, 6),
        }

    def calibration_table(self) -> tuple[list[str], list[list[str]]]:
        header = ["scores", "rows", "mean score", "observed rate"]
        rows = [
            [
                f"{b.lower:.2f}-{b.upper:.2f}",
                str(b.rows),
                "" if b.mean_score is None else f"{b.mean_score:.3f}",
                "" if b.observed_rate is None else f"{b.observed_rate:.3f}",
            ]
            for b in self.calibration
        ]
        return header, rows

    def calibration_markdown(self) -> str:
        return markdown_table(*self.calibration_table())


def performance(
    scores: Sequence[float] | np.ndarray | pd.Series,
    labels: Sequence[int] | np.ndarray | pd.Series,
    *,
    threshold: float = DEFAULT_DECISION_THRESHOLD,
    bins: int = 10,
) -> PerformanceResult:
    """AUC, precision and recall at ``threshold``, Brier score and a reliability table.

    A row is predicted positive when its score is at least ``threshold``. The reliability
    table has ``bins`` equal-width bins over [0, 1], assigned as scikit-learn's
    ``calibration_curve`` assigns them.

    Raises:
        ValueError: Lengths that differ, no rows, scores outside [0, 1] or null, labels
            other than 0 and 1.
    """
    from scipy.stats import rankdata

    score_array = _scores_array(scores, "scores")
    label_array = np.asarray(labels)
    if score_array.size != label_array.size:
        raise ValueError(f"{score_array.size} scores but {label_array.size} labels.")
    if score_array.size == 0:
        raise ValueError("No rows with labels; performance needs at least one.")
    if np.isnan(score_array).any():
        raise ValueError("Scores contain nulls; score every labelled row.")
    if not np.isin(label_array, (0, 1)).all():
        raise ValueError(f"Labels must be 0 or 1, found {sorted(set(label_array.tolist()))}.")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}.")
    positive = label_array.astype(bool)
    rows, positives = int(score_array.size), int(positive.sum())
    negatives = rows - positives
    auc = None
    if positives and negatives:
        # Mann-Whitney U with average ranks for ties: the area under the ROC curve.
        rank_sum = float(rankdata(score_array)[positive].sum())
        auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    predicted = score_array >= threshold
    true_positives = int(np.count_nonzero(predicted & positive))
    predicted_positives = int(np.count_nonzero(predicted))
    edges = np.linspace(0.0, 1.0, bins + 1)
    bin_ids = np.searchsorted(edges[1:-1], score_array)
    counts = np.bincount(bin_ids, minlength=bins)
    score_sums = np.bincount(bin_ids, weights=score_array, minlength=bins)
    label_sums = np.bincount(bin_ids, weights=positive, minlength=bins)
    calibration = tuple(
        CalibrationBin(
            lower=float(edges[i]),
            upper=float(edges[i + 1]),
            rows=int(counts[i]),
            mean_score=float(score_sums[i] / counts[i]) if counts[i] else None,
            observed_rate=float(label_sums[i] / counts[i]) if counts[i] else None,
        )
        for i in range(bins)
    )
    return PerformanceResult(
        rows=rows,
        positives=positives,
        threshold=float(threshold),
        auc=auc,
        precision=true_positives / predicted_positives if predicted_positives else None,
        recall=true_positives / positives if positives else None,
        brier=float(np.mean((score_array - positive) ** 2)),
        expected_calibration_error=float(np.abs(score_sums - label_sums).sum() / rows),
        calibration=calibration,
    )
