"""The whole comparison of challenger and champion on one window, and its gates."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from keel import schema
from keel.evaluation.fairness import fairness_report
from keel.evaluation.metrics import (
    QUALITY_METRICS,
    RiskModel,
    bootstrap_auc_difference,
    choose_threshold,
    labels_of,
    quality_metrics,
    score,
)
from keel.evaluation.report import plots
from keel.evaluation.serving import ServingProbe, precision_variants, serving_cost
from keel.gates import EvaluationError, GatePolicy


@dataclass
class Candidate:
    """A model to judge, with where it came from."""

    model: RiskModel
    uri: str
    artefact_bytes: int | None = None
    details: dict[str, Any] = field(default_factory=dict)


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
    gates.append(fairness_gate(challenger["fairness"], policy))
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


def fairness_gate(fairness: Mapping[str, Any], policy: GatePolicy) -> dict[str, Any]:
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
