"""Scores and quality: threshold, reliability, AUC with a paired bootstrap."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd

from keel import schema
from keel.gates import EvaluationError

QUALITY_METRICS = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "roc_auc",
    "pr_auc",
    "log_loss",
    "brier_score",
    "expected_calibration_error",
)


class RiskModel(Protocol):
    """A fitted model as the training stage hands it over."""

    family: str
    feature_names: tuple[str, ...]

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray: ...


def labels_of(frame: pd.DataFrame) -> np.ndarray:
    """The 0/1 target of a held-out frame, refusing anything else."""
    if schema.LABEL not in frame.columns:
        raise EvaluationError(f"the evaluation frame has no label column {schema.LABEL!r}")
    labels = frame[schema.LABEL]
    if labels.isna().any():
        raise EvaluationError(f"{int(labels.isna().sum())} rows have no label {schema.LABEL!r}")
    values = labels.to_numpy()
    if not np.isin(values, (0, 1)).all():
        raise EvaluationError(f"{schema.LABEL!r} must hold 0/1 only")
    values = values.astype(np.int8)
    if values.min() == values.max():
        raise EvaluationError(
            f"the evaluation window holds only {schema.LABEL}={int(values[0])}: "
            "AUC and TPR/FPR need both outcomes"
        )
    return values


def score(model: RiskModel, frame: pd.DataFrame) -> np.ndarray:
    """P(default) for every row, checked for shape, range and NaNs."""
    missing = [name for name in model.feature_names if name not in frame.columns]
    if missing:
        raise EvaluationError(
            f"the {model.family} model needs features the evaluation frame lacks: {missing}"
        )
    scores = np.asarray(model.predict_proba(frame[list(model.feature_names)]), dtype=np.float64)
    if scores.shape != (len(frame),):
        raise EvaluationError(
            f"the {model.family} model returned shape {scores.shape}, expected ({len(frame)},)"
        )
    if not np.isfinite(scores).all() or scores.min() < 0.0 or scores.max() > 1.0:
        raise EvaluationError(f"the {model.family} model returned scores outside [0, 1] or NaN")
    return scores


def choose_threshold(
    labels: np.ndarray, scores: np.ndarray, strategy: str, fixed: float
) -> dict[str, Any]:
    """The decision threshold and a sentence saying how it was chosen.

    ``max_f1`` picks the threshold that maximises F1 on the window it is given (the
    validation window, so that the held-out window stays untouched).
    """
    if strategy == "fixed":
        return {"value": fixed, "strategy": "fixed", "how": f"fixed at {fixed:g} by policy"}
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last precision/recall pair has no threshold (recall 0 by convention).
    f1 = 2 * precision[:-1] * recall[:-1] / np.clip(precision[:-1] + recall[:-1], 1e-12, None)
    best = int(np.argmax(f1))
    value = float(thresholds[best])
    return {
        "value": value,
        "strategy": "max_f1",
        "how": (
            f"{value:.4f} maximises F1 ({f1[best]:.3f}) on the validation window "
            f"({len(labels)} rows, {int(labels.sum())} defaults), chosen before the "
            "held-out window was scored"
        ),
    }


def reliability_table(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> list[dict]:
    """Mean predicted probability against the observed default rate in equal-width bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(scores, edges[1:-1], right=False), 0, bins - 1)
    rows = []
    for b in range(bins):
        in_bin = index == b
        count = int(in_bin.sum())
        rows.append(
            {
                "bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}",
                "count": count,
                "mean_predicted": float(scores[in_bin].mean()) if count else None,
                "observed_rate": float(labels[in_bin].mean()) if count else None,
            }
        )
    return rows


def expected_calibration_error(table: Sequence[Mapping[str, Any]]) -> float:
    """Row-weighted mean gap between predicted and observed rates over the reliability bins."""
    total = sum(row["count"] for row in table)
    return float(
        sum(
            row["count"] / total * abs(row["mean_predicted"] - row["observed_rate"])
            for row in table
            if row["count"]
        )
    )


def quality_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Threshold metrics, ranking metrics and calibration of one model on one window."""
    from sklearn.metrics import (
        accuracy_score,
        average_precision_score,
        brier_score_loss,
        f1_score,
        log_loss,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    predicted = (scores >= threshold).astype(np.int8)
    table = reliability_table(labels, scores)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "precision": float(precision_score(labels, predicted, zero_division=0)),
        "recall": float(recall_score(labels, predicted, zero_division=0)),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "roc_auc": float(roc_auc_score(labels, scores)),
        "pr_auc": float(average_precision_score(labels, scores)),
        "log_loss": float(log_loss(labels, np.clip(scores, 1e-15, 1 - 1e-15), labels=[0, 1])),
        "brier_score": float(brier_score_loss(labels, scores)),
        "expected_calibration_error": expected_calibration_error(table),
        "reliability": table,
        "confusion": {
            "tp": int(((predicted == 1) & (labels == 1)).sum()),
            "fp": int(((predicted == 1) & (labels == 0)).sum()),
            "tn": int(((predicted == 0) & (labels == 0)).sum()),
            "fn": int(((predicted == 0) & (labels == 1)).sum()),
        },
    }


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC under each row of ``weights`` (resample counts), ties counted as one half.

    Sorting once and summing weights per distinct score makes a thousand bootstrap AUCs
    cost a few matrix passes instead of a thousand sorts.

    Args:
        labels: 0/1 targets, shape (n,).
        scores: Model scores, shape (n,).
        weights: Non-negative weights, shape (b, n): one resample per row.

    Returns:
        The b AUCs.
    """
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    positive = labels[order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    w = weights[:, order]
    pos = np.add.reduceat(w * positive, starts, axis=1)
    neg = np.add.reduceat(w * (1.0 - positive), starts, axis=1)
    negatives_below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    return (pos * (negatives_below + 0.5 * neg)).sum(axis=1) / pairs


def bootstrap_counts(n: int, samples: int, seed: int) -> Iterator[np.ndarray]:
    """Resample counts for ``samples`` bootstrap draws of ``n`` rows, in memory-sized chunks.

    Row ``i`` of a chunk says how often each of the ``n`` rows was drawn in resample ``i``;
    using counts as weights keeps every statistic a matrix product instead of a re-sort.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, min(samples, 4_000_000 // max(n, 1)))
    done = 0
    while done < samples:
        size = min(chunk, samples - done)
        draws = rng.integers(0, n, size=(size, n)) + (np.arange(size) * n)[:, None]
        yield np.bincount(draws.ravel(), minlength=size * n).reshape(size, n).astype(np.float64)
        done += size


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval; resamples where the statistic is undefined (NaN) are left out."""
    alpha = (1.0 - confidence) / 2.0
    return float(np.nanquantile(values, alpha)), float(np.nanquantile(values, 1.0 - alpha))


def bootstrap_auc_difference(
    labels: np.ndarray,
    challenger_scores: np.ndarray,
    champion_scores: np.ndarray,
    samples: int,
    confidence: float,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap interval on AUC(challenger) - AUC(champion) over the same rows."""
    n = len(labels)
    differences = []
    for counts in bootstrap_counts(n, samples, seed):
        # A resample without both outcomes has no AUC; it is dropped, not counted as 0.5.
        positives = counts @ labels
        counts = counts[(positives > 0) & (positives < n)]
        differences.append(
            weighted_auc(labels, challenger_scores, counts)
            - weighted_auc(labels, champion_scores, counts)
        )
    diffs = np.concatenate(differences)
    ones = np.ones((1, n))
    point = float(
        weighted_auc(labels, challenger_scores, ones)[0]
        - weighted_auc(labels, champion_scores, ones)[0]
    )
    low, high = _interval(diffs, confidence)
    return {
        "difference": point,
        "low": low,
        "high": high,
        "confidence": confidence,
        "samples": len(diffs),
        "share_challenger_better": float((diffs > 0).mean()),
    }
