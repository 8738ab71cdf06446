"""Fairness by protected attribute, with bootstrap intervals on the disparities."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from keel.evaluation.metrics import _interval, bootstrap_counts


def disparity_intervals(
    labels: np.ndarray,
    predicted: np.ndarray,
    groups: np.ndarray,
    samples: int,
    confidence: float,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals on the demographic parity and equalized odds differences.

    Each resample's differences are fairlearn's own statistics on the resampled rows (the
    parity test holds them equal); a group gap that sampling noise alone could produce gets an
    interval reaching down towards zero. fairlearn's ``MetricFrame(n_boot=..., ci_quantiles=...)``
    is not used: it returns quantiles of each metric's difference separately, while the
    equalized odds difference is the larger of the TPR and FPR differences within each
    resample, and the quantile of that maximum is not the maximum of the two quantiles
    (tests/test_fairness_bootstrap.py shows the lower bound it would understate). It also rebuilds a
    grouped frame per resample, where counts as weights make a resample one matrix product.
    """
    parity, odds = [], []
    for counts in bootstrap_counts(len(labels), samples, seed):
        chunk_parity, chunk_odds = resampled_disparities(labels, predicted, groups, counts)
        parity.append(chunk_parity)
        odds.append(chunk_odds)
    return {
        "demographic_parity_difference": _interval(np.concatenate(parity), confidence),
        "equalized_odds_difference": _interval(np.concatenate(odds), confidence),
    }


def resampled_disparities(
    labels: np.ndarray, predicted: np.ndarray, groups: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Demographic parity and equalized odds differences of each resample in ``counts``.

    Row ``i`` of ``counts`` says how often each row was drawn in resample ``i``. A resample
    that leaves a group without defaults has an undefined TPR there (NaN), not a zero one.
    """
    names = np.unique(groups)
    member = (groups[:, None] == names[None, :]).astype(np.float64)
    y, p = labels.astype(np.float64), predicted.astype(np.float64)
    columns = {
        "rows": member,
        "selected": member * p[:, None],
        "positives": member * y[:, None],
        "true_positives": member * (y * p)[:, None],
        "negatives": member * (1 - y)[:, None],
        "false_positives": member * ((1 - y) * p)[:, None],
    }
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sums = {name: counts @ matrix for name, matrix in columns.items()}
        rates = {
            "selection": sums["selected"] / sums["rows"],
            "tpr": sums["true_positives"] / sums["positives"],
            "fpr": sums["false_positives"] / sums["negatives"],
        }
        spread = {k: np.nanmax(v, axis=1) - np.nanmin(v, axis=1) for k, v in rates.items()}
    return spread["selection"], np.fmax(spread["tpr"], spread["fpr"])


def fairness_report(
    labels: np.ndarray,
    predicted: np.ndarray,
    protected: pd.DataFrame,
    min_group_rows: int,
    min_group_positives: int,
    samples: int = 1_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-group selection rate, TPR and FPR, and the two disparity differences, by fairlearn.

    Groups below ``min_group_rows`` rows or ``min_group_positives`` defaults are listed but
    left out of the differences; an attribute with fewer than two judged groups has none.
    Each difference also gets a bootstrap interval (:func:`disparity_intervals`).
    """
    from fairlearn.metrics import (
        MetricFrame,
        demographic_parity_difference,
        equalized_odds_difference,
        false_positive_rate,
        selection_rate,
        true_positive_rate,
    )

    report: dict[str, Any] = {}
    for attribute in protected.columns:
        groups = protected[attribute].astype("string").fillna("(missing)").to_numpy()
        frame = MetricFrame(
            metrics={
                "selection_rate": selection_rate,
                "tpr": true_positive_rate,
                "fpr": false_positive_rate,
                "count": lambda y_true, y_pred: len(y_true),
                "positives": lambda y_true, y_pred: int(np.sum(y_true)),
            },
            y_true=labels,
            y_pred=predicted,
            sensitive_features=pd.Series(groups, name=attribute),
        )
        rows = []
        judged = []
        for group, values in frame.by_group.iterrows():
            count, positives = int(values["count"]), int(values["positives"])
            included = count >= min_group_rows and positives >= min_group_positives
            if included:
                judged.append(group)
            rows.append(
                {
                    "group": str(group),
                    "count": count,
                    "positives": positives,
                    "selection_rate": float(values["selection_rate"]),
                    "tpr": float(values["tpr"]),
                    "fpr": float(values["fpr"]),
                    "judged": included,
                }
            )
        result: dict[str, Any] = {
            "groups": rows,
            "judged_groups": len(judged),
            "demographic_parity_difference": None,
            "equalized_odds_difference": None,
            "intervals": None,
        }
        if len(judged) >= 2:
            keep = np.isin(groups, judged)
            y, p, g = labels[keep], predicted[keep], groups[keep]
            result["demographic_parity_difference"] = float(
                demographic_parity_difference(y, p, sensitive_features=g)
            )
            result["equalized_odds_difference"] = float(
                equalized_odds_difference(y, p, sensitive_features=g)
            )
            result["intervals"] = disparity_intervals(y, p, g, samples, confidence, seed)
        report[attribute] = result
    return report
