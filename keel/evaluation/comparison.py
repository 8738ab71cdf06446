"""Challenger versus champion on one held-out window: quality, fairness, serving cost and gates.

Stage 3 of the article. Everything here works on fitted model objects with the training
stage's interface (``family``, ``feature_names``, ``predict_proba(frame) -> P(default)``), so it
runs the same on LightGBM, PyTorch or any other model family. The result is one JSON-ready
dictionary (:func:`evaluate`) from which the gates, the HTML report and the Dagster metadata
are rendered.
"""

from __future__ import annotations

import base64
import html
import io
import math
import pickle
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from keel import schema
from keel.gates import EvaluationError, GatePolicy

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


@dataclass(frozen=True)
class ServingProbe:
    """How serving cost is measured.

    Attributes:
        single_row_calls: Timed one-row predictions (after ``warmup_calls`` untimed ones).
        warmup_calls: Untimed calls first, so that lazy initialisation is not billed.
        batch_rows: Rows in the throughput batch (drawn from the held-out window).
        batch_repeats: The best of this many batch timings counts.
    """

    single_row_calls: int = 200
    warmup_calls: int = 20
    batch_rows: int = 10_000
    batch_repeats: int = 3


@dataclass
class Candidate:
    """A model to judge, with where it came from."""

    model: RiskModel
    uri: str
    artefact_bytes: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Scores and quality
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Fairness
# ---------------------------------------------------------------------------------------------


def disparity_intervals(
    labels: np.ndarray,
    predicted: np.ndarray,
    groups: np.ndarray,
    samples: int,
    confidence: float,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Bootstrap intervals on the demographic parity and equalized odds differences.

    The same quantities as fairlearn's, over resampled rows: a group gap that sampling noise
    alone could produce gets an interval reaching down towards zero.
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
    parity, odds = [], []
    # A resample can leave a small group without defaults: its TPR is undefined, not zero.
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for counts in bootstrap_counts(len(labels), samples, seed):
            sums = {name: counts @ matrix for name, matrix in columns.items()}
            rates = {
                "selection": sums["selected"] / sums["rows"],
                "tpr": sums["true_positives"] / sums["positives"],
                "fpr": sums["false_positives"] / sums["negatives"],
            }
            spread = {k: np.nanmax(v, axis=1) - np.nanmin(v, axis=1) for k, v in rates.items()}
            parity.append(spread["selection"])
            odds.append(np.fmax(spread["tpr"], spread["fpr"]))
    return {
        "demographic_parity_difference": _interval(np.concatenate(parity), confidence),
        "equalized_odds_difference": _interval(np.concatenate(odds), confidence),
    }


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


# ---------------------------------------------------------------------------------------------
# Serving cost
# ---------------------------------------------------------------------------------------------


def pickled_size_bytes(model: RiskModel) -> int:
    """Bytes of the model pickled in memory: one yardstick for a model and its variants."""
    return len(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))


def serving_cost(
    model: RiskModel,
    frame: pd.DataFrame,
    probe: ServingProbe,
    seed: int = 0,
    size_bytes: int | None = None,
) -> dict[str, float]:
    """Single-row latency p50/p99, batch throughput and size of one model on held-out rows.

    Args:
        model: The model to time.
        frame: Held-out rows to draw requests from.
        probe: How many calls and rows to time.
        seed: Picks the rows, so that challenger and champion see the same requests.
        size_bytes: The artefact size when known (the MLflow model folder); else the
            pickled size.
    """
    rng = np.random.default_rng(seed)
    features = frame[list(model.feature_names)]
    rows = rng.integers(0, len(features), size=probe.warmup_calls + probe.single_row_calls)
    single_rows = [features.iloc[[i]] for i in rows]
    for one in single_rows[: probe.warmup_calls]:
        model.predict_proba(one)
    latencies_ns = np.empty(probe.single_row_calls, dtype=np.int64)
    for n, one in enumerate(single_rows[probe.warmup_calls :]):
        start = time.perf_counter_ns()
        model.predict_proba(one)
        latencies_ns[n] = time.perf_counter_ns() - start
    batch = features.iloc[rng.integers(0, len(features), size=probe.batch_rows)]
    batch = batch.reset_index(drop=True)
    best = math.inf
    for _ in range(probe.batch_repeats):
        start = time.perf_counter()
        model.predict_proba(batch)
        best = min(best, time.perf_counter() - start)
    latencies_ms = latencies_ns / 1e6
    return {
        "latency_p50_ms": float(np.percentile(latencies_ms, 50)),
        "latency_p99_ms": float(np.percentile(latencies_ms, 99)),
        "throughput_rows_per_s": float(probe.batch_rows / best),
        "size_bytes": int(size_bytes if size_bytes is not None else pickled_size_bytes(model)),
        "single_row_calls": probe.single_row_calls,
        "batch_rows": probe.batch_rows,
    }


def precision_variants(
    model: RiskModel,
    frame: pd.DataFrame,
    labels: np.ndarray,
    probe: ServingProbe,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """FP32 against FP16 and dynamic INT8 variants of a PyTorch model: AUC change and speed-up.

    All three are timed in the same process on the same rows, sizes as pickled bytes, so the
    ratios compare like with like.
    """
    from sklearn.metrics import roc_auc_score

    makers: dict[str, Callable[[], RiskModel]] = {"fp32": lambda: model}
    for name, method in (("fp16", "half_precision"), ("int8_dynamic", "dynamic_int8")):
        if not callable(getattr(model, method, None)):
            raise EvaluationError(f"the {model.family} model has no {method}() variant")
        makers[name] = getattr(model, method)
    results = []
    base: dict[str, Any] = {}
    for name, make in makers.items():
        variant = make()
        auc = float(roc_auc_score(labels, score(variant, frame)))
        cost = serving_cost(variant, frame, probe, seed=seed)
        if name == "fp32":
            base = {"roc_auc": auc, **cost}
        results.append(
            {
                "variant": name,
                "roc_auc": auc,
                "auc_change": auc - base["roc_auc"],
                "latency_p50_ms": cost["latency_p50_ms"],
                "latency_p99_ms": cost["latency_p99_ms"],
                "throughput_rows_per_s": cost["throughput_rows_per_s"],
                "single_row_speedup": base["latency_p50_ms"] / cost["latency_p50_ms"],
                "batch_speedup": cost["throughput_rows_per_s"] / base["throughput_rows_per_s"],
                "size_bytes": cost["size_bytes"],
                "size_ratio": cost["size_bytes"] / base["size_bytes"],
            }
        )
    return results


# ---------------------------------------------------------------------------------------------
# The whole comparison and its gates
# ---------------------------------------------------------------------------------------------


def evaluate_model(
    candidate: Candidate,
    validation: pd.DataFrame,
    test: pd.DataFrame,
    policy: GatePolicy,
    probe: ServingProbe,
    seed: int = 0,
) -> tuple[dict[str, Any], np.ndarray]:
    """Quality, fairness and serving cost of one model; also returns its held-out scores."""
    model = candidate.model
    threshold = choose_threshold(
        labels_of(validation),
        score(model, validation),
        policy.threshold_strategy,
        policy.fixed_threshold,
    )
    test_labels = labels_of(test)
    scores = score(model, test)
    predicted = (scores >= threshold["value"]).astype(np.int8)
    missing = [a for a in schema.PROTECTED_ATTRIBUTES if a not in test.columns]
    if missing:
        raise EvaluationError(f"the held-out window lacks protected attributes {missing}")
    result = {
        "uri": candidate.uri,
        "family": model.family,
        "details": candidate.details,
        "threshold": threshold,
        "quality": quality_metrics(test_labels, scores, threshold["value"]),
        "fairness": fairness_report(
            test_labels,
            predicted,
            test[list(schema.PROTECTED_ATTRIBUTES)],
            policy.fairness_min_group_rows,
            policy.fairness_min_group_positives,
            policy.bootstrap_samples,
            policy.confidence,
            seed,
        ),
        "serving": serving_cost(model, test, probe, seed=seed, size_bytes=candidate.artefact_bytes),
    }
    return result, scores


def decide_gates(
    challenger: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    comparison: Mapping[str, Any] | None,
    policy: GatePolicy,
) -> list[dict[str, Any]]:
    """The four gate decisions, each with the value, the limit and a sentence why.

    Without a champion (the first model ever) there is nothing to regress against: the
    ``no_regression`` gate passes and says so, and the absolute gates alone decide.
    """
    quality = challenger["quality"]
    gates = [
        {
            "name": "minimum_quality",
            "passed": quality["roc_auc"] >= policy.min_roc_auc,
            "value": quality["roc_auc"],
            "limit": policy.min_roc_auc,
            "detail": f"ROC AUC {quality['roc_auc']:.4f}, minimum {policy.min_roc_auc:.4f}",
        }
    ]
    if champion is None or comparison is None:
        gates.append(
            {
                "name": "no_regression",
                "passed": True,
                "value": None,
                "limit": -policy.max_auc_regression,
                "detail": "first model: no champion to compare against, absolute gates decide",
            }
        )
    else:
        diff = comparison["auc"]["difference"]
        gates.append(
            {
                "name": "no_regression",
                "passed": diff >= -policy.max_auc_regression,
                "value": diff,
                "limit": -policy.max_auc_regression,
                "detail": (
                    f"AUC challenger - champion {diff:+.4f} "
                    f"({comparison['auc']['confidence']:.0%} CI {comparison['auc']['low']:+.4f}"
                    f" to {comparison['auc']['high']:+.4f}), tolerance "
                    f"-{policy.max_auc_regression:.4f}"
                ),
            }
        )
    gates.append(_fairness_gate(challenger["fairness"], policy))
    serving = challenger["serving"]
    size_mb = serving["size_bytes"] / 2**20
    misses = []
    if serving["latency_p99_ms"] > policy.latency_p99_ms:
        misses.append(f"p99 {serving['latency_p99_ms']:.2f} ms > {policy.latency_p99_ms:g} ms")
    if serving["throughput_rows_per_s"] < policy.min_throughput_rows_per_s:
        misses.append(
            f"throughput {serving['throughput_rows_per_s']:,.0f} rows/s < "
            f"{policy.min_throughput_rows_per_s:,.0f}"
        )
    if size_mb > policy.max_model_size_mb:
        misses.append(f"size {size_mb:.1f} MB > {policy.max_model_size_mb:g} MB")
    gates.append(
        {
            "name": "latency_sla",
            "passed": not misses,
            "value": serving["latency_p99_ms"],
            "limit": policy.latency_p99_ms,
            "detail": "; ".join(misses)
            if misses
            else (
                f"p99 {serving['latency_p99_ms']:.2f} ms (SLA {policy.latency_p99_ms:g}), "
                f"{serving['throughput_rows_per_s']:,.0f} rows/s "
                f"(SLA {policy.min_throughput_rows_per_s:,.0f}), {size_mb:.2f} MB"
            ),
        }
    )
    return gates


def _fairness_gate(fairness: Mapping[str, Any], policy: GatePolicy) -> dict[str, Any]:
    """Fail on a disparity the data establishes: the low end of its interval above the bound.

    A bound compared with the point estimate alone fails fair models on noise: with fifty
    defaults per group, TPRs differ by 0.2 by chance. A real gap clears its bound even at
    the low end of the interval.
    """
    bounds = {
        "demographic_parity_difference": policy.max_demographic_parity_difference,
        "equalized_odds_difference": policy.max_equalized_odds_difference,
    }
    breaches, observed, unjudged = [], [], []
    margin = -math.inf
    for attribute, result in fairness.items():
        if result["intervals"] is None:
            unjudged.append(attribute)
            continue
        for name, bound in bounds.items():
            low, high = result["intervals"][name]
            margin = max(margin, low - bound)
            text = (
                f"{attribute} {name.replace('_', ' ')} {result[name]:.3f} [{low:.3f}, {high:.3f}]"
            )
            (breaches if low > bound else observed).append(text)
    if breaches:
        detail = "above the bound: " + "; ".join(breaches)
    elif observed:
        detail = "within bounds: " + "; ".join(observed)
    else:
        detail = "no attribute has two groups large enough to judge"
    if unjudged:
        detail += f" (too few rows to judge: {', '.join(unjudged)})"
    detail += (
        f". Bounds {policy.max_demographic_parity_difference:g} (parity) and "
        f"{policy.max_equalized_odds_difference:g} (equalized odds); a breach needs the low end "
        f"of the {policy.confidence:.0%} bootstrap interval above the bound"
    )
    return {
        "name": "fairness",
        "passed": not breaches,
        "value": None if margin == -math.inf else margin,
        "limit": 0.0,
        "detail": detail,
    }


def window_summary(test: pd.DataFrame) -> dict[str, Any]:
    """The held-out window: its time span, size and default rate."""
    stamps = pd.to_datetime(test[schema.EVENT_TIMESTAMP], utc=True)
    labels = test[schema.LABEL]
    return {
        "start": stamps.min().isoformat(),
        "end": stamps.max().isoformat(),
        "rows": len(test),
        "defaults": int(labels.sum()),
        "default_rate": float(labels.mean()),
    }


@dataclass
class Evaluation:
    """The outcome of :func:`evaluate`: the JSON-ready summary and the scores behind the plots."""

    summary: dict[str, Any]
    labels: np.ndarray
    challenger_scores: np.ndarray
    champion_scores: np.ndarray | None

    @property
    def all_gates_passed(self) -> bool:
        return bool(self.summary["all_gates_passed"])

    def images(self) -> dict[str, bytes]:
        return plots(self.summary, self.labels, self.challenger_scores, self.champion_scores)


def evaluate(
    challenger: Candidate,
    champion: Candidate | None,
    validation: pd.DataFrame,
    test: pd.DataFrame,
    policy: GatePolicy,
    probe: ServingProbe | None = None,
    variants_of: RiskModel | None = None,
    seed: int = 0,
) -> Evaluation:
    """Judge the challenger against the champion on the same held-out window.

    Args:
        challenger: The candidate.
        champion: The production model, or None before the first promotion.
        validation: The window the decision threshold is chosen on.
        test: The held-out window both models are judged on.
        policy: Gate bounds, threshold strategy and bootstrap settings.
        probe: How serving cost is measured.
        variants_of: A PyTorch model whose FP16 and INT8 variants are measured (usually the
            challenger or the run's PyTorch model); None skips them.
        seed: Seeds the bootstrap and the latency rows.

    Returns:
        The summary holds ``window``, ``policy``, ``challenger``, ``champion``,
        ``comparison``, ``variants``, ``gates`` and ``all_gates_passed``.
    """
    probe = probe or ServingProbe()
    labels = labels_of(test)
    challenger_result, challenger_scores = evaluate_model(
        challenger, validation, test, policy, probe, seed
    )
    champion_result = comparison = champion_scores = None
    if champion is not None:
        champion_result, champion_scores = evaluate_model(
            champion, validation, test, policy, probe, seed
        )
        comparison = {
            "auc": bootstrap_auc_difference(
                labels,
                challenger_scores,
                champion_scores,
                policy.bootstrap_samples,
                policy.confidence,
                seed,
            ),
            "deltas": {
                name: challenger_result["quality"][name] - champion_result["quality"][name]
                for name in QUALITY_METRICS
            },
        }
    variants = (
        precision_variants(variants_of, test, labels, probe, seed)
        if variants_of is not None
        else []
    )
    gates = decide_gates(challenger_result, champion_result, comparison, policy)
    summary = {
        "window": window_summary(test),
        "policy": asdict(policy),
        "challenger": challenger_result,
        "champion": champion_result,
        "comparison": comparison,
        "variants": variants,
        "gates": gates,
        "all_gates_passed": all(gate["passed"] for gate in gates),
    }
    return Evaluation(summary, labels, challenger_scores, champion_scores)


def flat_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """The challenger's headline numbers, flat, for registry tags."""
    quality = evaluation["challenger"]["quality"]
    serving = evaluation["challenger"]["serving"]
    metrics = {name: float(quality[name]) for name in QUALITY_METRICS}
    metrics["threshold"] = float(evaluation["challenger"]["threshold"]["value"])
    metrics["latency_p50_ms"] = serving["latency_p50_ms"]
    metrics["latency_p99_ms"] = serving["latency_p99_ms"]
    metrics["throughput_rows_per_s"] = serving["throughput_rows_per_s"]
    if evaluation["comparison"]:
        metrics["auc_difference_vs_champion"] = evaluation["comparison"]["auc"]["difference"]
    for attribute, result in evaluation["challenger"]["fairness"].items():
        for name in ("demographic_parity_difference", "equalized_odds_difference"):
            if result[name] is not None:
                metrics[f"{attribute}_{name}"] = result[name]
    return metrics


# ---------------------------------------------------------------------------------------------
# Rendering: markdown for Dagster, PNG plots, a self-contained HTML report
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


Table = tuple[list[str], list[list[Any]]]
_GROUP_COLUMNS = ("group", "count", "positives", "selection_rate", "tpr", "fpr", "judged")
_SERVING_COLUMNS = ("latency_p50_ms", "latency_p99_ms", "throughput_rows_per_s", "size_bytes")
_DIFFERENCES = ("demographic_parity_difference", "equalized_odds_difference")
_SPEEDUPS = ("single-row speed-up", "batch speed-up", "size ratio")
_VARIANT_COLUMNS = (
    "variant",
    "roc_auc",
    "auc_change",
    "latency_p50_ms",
    "latency_p99_ms",
    "throughput_rows_per_s",
    "single_row_speedup",
    "batch_speedup",
    "size_ratio",
)


def _pick(mapping: Mapping[str, Any], keys: Sequence[str]) -> list[Any]:
    return [mapping[key] for key in keys]


def _differences(result: Mapping[str, Any]) -> list[str | None]:
    """Each disparity difference with its bootstrap interval, as text."""
    if result["intervals"] is None:
        return [None, None]
    return [
        f"{result[name]:.4f} [{result['intervals'][name][0]:.4f}, "
        f"{result['intervals'][name][1]:.4f}]"
        for name in _DIFFERENCES
    ]


def report_tables(summary: Mapping[str, Any]) -> dict[str, Table]:
    """Headers and rows of every table in the report, shared by the markdown and the HTML."""
    challenger, champion = summary["challenger"], summary["champion"]
    models = [("challenger", challenger)] + ([("champion", champion)] if champion else [])
    tables: dict[str, Table] = {
        "gates": (
            ["gate", "result", "detail"],
            [[g["name"], "PASS" if g["passed"] else "FAIL", g["detail"]] for g in summary["gates"]],
        )
    }
    quality_rows = []
    for name in (*QUALITY_METRICS, "threshold"):
        row = [name]
        for _, model in models:
            row.append(
                model["threshold"]["value"] if name == "threshold" else model["quality"][name]
            )
        if champion:
            row.append(summary["comparison"]["deltas"].get(name))
        quality_rows.append(row)
    tables["quality"] = (
        ["metric", *(label for label, _ in models)] + (["difference"] if champion else []),
        quality_rows,
    )
    tables["calibration"] = (
        ["bin", *(f"{label} rows / predicted / observed" for label, _ in models)],
        [
            [row["bin"]]
            + [
                f"{m['quality']['reliability'][i]['count']} / "
                f"{_fmt(m['quality']['reliability'][i]['mean_predicted'])} / "
                f"{_fmt(m['quality']['reliability'][i]['observed_rate'])}"
                for _, m in models
            ]
            for i, row in enumerate(challenger["quality"]["reliability"])
        ],
    )
    fairness_rows = []
    for attribute, result in challenger["fairness"].items():
        fairness_rows += [[attribute, *_pick(g, _GROUP_COLUMNS)] for g in result["groups"]]
        fairness_rows.append(
            [attribute, "difference", None, None, *_differences(result), None, None]
        )
    tables["fairness"] = (
        ["attribute", "group", "rows", "defaults", "selection rate", "TPR", "FPR", "judged"],
        fairness_rows,
    )
    tables["serving"] = (
        ["model", "p50 ms", "p99 ms", "rows/s", "size MB"],
        [
            [label, *_pick(m["serving"], _SERVING_COLUMNS[:3]), m["serving"]["size_bytes"] / 2**20]
            for label, m in models
        ],
    )
    if summary["variants"]:
        tables["variants"] = (
            ["variant", "ROC AUC", "AUC change", "p50 ms", "p99 ms", "rows/s", *_SPEEDUPS],
            [_pick(v, _VARIANT_COLUMNS) for v in summary["variants"]],
        )
    tables["policy"] = (["setting", "value"], [[k, v] for k, v in summary["policy"].items()])
    return tables


def report_notes(summary: Mapping[str, Any]) -> dict[str, str]:
    """Sentences that go under some tables: the threshold, the AUC interval, the fairness rows."""
    challenger, champion = summary["challenger"], summary["champion"]
    quality = f"Decision threshold: {challenger['threshold']['how']}."
    if champion:
        auc = summary["comparison"]["auc"]
        quality += (
            f" Champion threshold: {champion['threshold']['how']}."
            f" AUC difference {auc['difference']:+.4f}, {auc['confidence']:.0%} paired bootstrap"
            f" interval [{auc['low']:+.4f}, {auc['high']:+.4f}] over {auc['samples']} resamples;"
            f" challenger better in {auc['share_challenger_better']:.1%} of them."
        )
    return {
        "quality": quality,
        "fairness": (
            "Difference rows: demographic parity difference under selection rate, equalized "
            "odds difference under TPR, each with its bootstrap interval; groups marked "
            "judged=no are too small to count."
        ),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "/") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_tables(summary: Mapping[str, Any]) -> dict[str, str]:
    """The report's key tables as markdown for Dagster metadata."""
    notes = report_notes(summary)
    return {
        name: markdown_table(*table) + (f"\n\n{notes[name]}" if name in notes else "")
        for name, table in report_tables(summary).items()
        if name not in ("calibration", "policy")
    }


def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def plots(
    summary: Mapping[str, Any],
    labels: np.ndarray,
    challenger_scores: np.ndarray,
    champion_scores: np.ndarray | None,
) -> dict[str, bytes]:
    """PNG plots: ROC and precision-recall curves, reliability diagram, fairness by group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    curves = [("challenger", challenger_scores)]
    if champion_scores is not None:
        curves.append(("champion", champion_scores))
    figure, (roc_axis, pr_axis) = plt.subplots(1, 2, figsize=(9, 4))
    for name, scores in curves:
        fpr, tpr, _ = roc_curve(labels, scores)
        roc_axis.plot(fpr, tpr, label=name)
        precision, recall, _ = precision_recall_curve(labels, scores)
        pr_axis.plot(recall, precision, label=name)
    roc_axis.plot([0, 1], [0, 1], linestyle=":", color="grey")
    roc_axis.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr_axis.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    roc_axis.legend()
    images = {"curves": _png(figure)}

    figure, axis = plt.subplots(figsize=(4.5, 4))
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect")
    for name in ("challenger", "champion"):
        if summary[name] is None:
            continue
        table = [r for r in summary[name]["quality"]["reliability"] if r["count"]]
        axis.plot(
            [r["mean_predicted"] for r in table],
            [r["observed_rate"] for r in table],
            marker="o",
            label=name,
        )
    axis.set(xlabel="mean predicted P(default)", ylabel="observed default rate")
    axis.set_title("Reliability")
    axis.legend()
    images["reliability"] = _png(figure)

    fairness = summary["challenger"]["fairness"]
    figure, axes = plt.subplots(1, len(fairness), figsize=(4 * len(fairness), 3.5), squeeze=False)
    for axis, (attribute, result) in zip(axes[0], fairness.items(), strict=True):
        groups = result["groups"]
        x = np.arange(len(groups))
        for offset, metric in ((-0.27, "selection_rate"), (0.0, "tpr"), (0.27, "fpr")):
            axis.bar(x + offset, [g[metric] for g in groups], width=0.27, label=metric)
        axis.set_xticks(x, [g["group"] for g in groups], rotation=30)
        axis.set(title=attribute, ylim=(0, 1))
    axes[0][0].legend(fontsize="small")
    images["fairness"] = _png(figure)
    return images


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def markdown_image(png: bytes, alt: str) -> str:
    """A PNG inlined in markdown, which the Dagster UI renders in asset metadata."""
    return f"![{alt}]({_data_uri(png)})"


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_REPORT_SECTIONS = (
    ("Gates", "gates", None),
    ("Quality on the held-out window", "quality", "curves"),
    ("Calibration", "calibration", "reliability"),
    ("Fairness by protected attribute", "fairness", "fairness"),
    ("Serving cost", "serving", None),
    ("PyTorch precision variants (FP16, dynamic INT8)", "variants", None),
    ("Policy", "policy", None),
)
_STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
    "text-align:left}img{max-width:100%}.PASS{color:#17702b;font-weight:bold}"
    ".FAIL{color:#b00020;font-weight:bold}"
)


def html_report(summary: Mapping[str, Any], images: Mapping[str, bytes]) -> str:
    """The whole evaluation as one self-contained HTML page (plots embedded as PNG)."""
    challenger, champion = summary["challenger"], summary["champion"]
    window = summary["window"]
    verdict = "PASS" if summary["all_gates_passed"] else "FAIL"
    champion_text = (
        f"<code>{html.escape(champion['uri'])}</code> ({html.escape(champion['family'])})"
        if champion
        else "none yet: this is the first model, so the absolute gates alone decide"
    )
    parts = [
        f"<h1>Challenger evaluation: <span class={verdict}>{verdict}</span></h1>",
        f"<p>Challenger <code>{html.escape(challenger['uri'])}</code> "
        f"({html.escape(challenger['family'])}); champion {champion_text}.</p>",
        f"<p>Held-out window {html.escape(window['start'])} to {html.escape(window['end'])}: "
        f"{window['rows']:,} rows, {window['defaults']:,} defaults "
        f"({window['default_rate']:.2%}).</p>",
    ]
    tables, notes = report_tables(summary), report_notes(summary)
    for title, name, image in _REPORT_SECTIONS:
        if name not in tables:
            continue
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if name in notes:
            parts.append(f"<p>{html.escape(notes[name])}</p>")
        table = _html_table(*tables[name])
        if name == "gates":
            for word in ("PASS", "FAIL"):
                table = table.replace(f"<td>{word}</td>", f"<td class={word}>{word}</td>")
        parts.append(table)
        if image:
            parts.append(f'<img alt="{name}" src="{_data_uri(images[image])}">')
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Keel challenger evaluation"
        f"</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
