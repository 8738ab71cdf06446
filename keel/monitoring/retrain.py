"""Retraining decision, called by the drift and performance sensors."""

from __future__ import annotations

from dataclasses import dataclass

from keel.monitoring.drift import DriftResult
from keel.monitoring.performance import PerformanceResult
from keel.monitoring_policy import RetrainPolicy


@dataclass(frozen=True)
class RetrainDecision:
    """Whether to retrain, and why (for the sensor's log and the run tags)."""

    retrain: bool
    reason: str


def should_retrain(
    result: DriftResult | PerformanceResult, policy: RetrainPolicy | None = None
) -> RetrainDecision:
    """Decide whether a day's drift or performance result calls for retraining."""
    policy = policy or RetrainPolicy()
    if result.rows < policy.min_rows:
        return RetrainDecision(False, f"{result.rows} rows, fewer than {policy.min_rows}")
    if isinstance(result, PerformanceResult):
        if policy.min_auc is None:
            return RetrainDecision(False, "the policy does not watch performance")
        if result.auc is None:
            return RetrainDecision(False, "AUC undefined: the labelled rows hold one class")
        if result.auc < policy.min_auc:
            return RetrainDecision(True, f"AUC {result.auc:.4f} below {policy.min_auc}")
        return RetrainDecision(False, f"AUC {result.auc:.4f} at or above {policy.min_auc}")
    if critical := [c for c in policy.critical_features if c in result.drifted_features]:
        return RetrainDecision(True, f"critical features drifted: {', '.join(critical)}")
    share = result.share_of_drifted_features
    limit = result.drift_share if policy.drift_share is None else policy.drift_share
    drifted = ", ".join(result.drifted_features) or "none"
    reason = f"{share:.0%} of features drifted (limit {limit:.0%}): {drifted}"
    return RetrainDecision(share >= limit, reason)
