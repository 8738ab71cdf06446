"""The bars a challenger must clear before it is registered, and their names.

Kept apart from ``keel.evaluation`` (NumPy, pandas) so that the Dagster definitions can build
the governance resource from these defaults without importing the maths.
"""

from __future__ import annotations

from dataclasses import dataclass

THRESHOLD_STRATEGIES = ("max_f1", "fixed")
GATE_NAMES = ("minimum_quality", "no_regression", "fairness", "latency_sla")


class EvaluationError(ValueError):
    """Input the evaluation cannot judge a model on."""


@dataclass(frozen=True)
class GatePolicy:
    """The bars a challenger must clear before it may be registered.

    Attributes:
        min_roc_auc: Minimum ROC AUC on the held-out window.
        max_auc_regression: How much ROC AUC the challenger may lose against the champion.
        max_demographic_parity_difference: Largest gap in selection rate between groups.
        max_equalized_odds_difference: Largest gap in TPR or FPR between groups.
        fairness_min_group_rows: Groups with fewer rows are reported but not judged.
        fairness_min_group_positives: Groups with fewer defaults are reported but not judged
            (a TPR over a handful of positives is noise).
        latency_p99_ms: SLA on single-row prediction latency, 99th percentile.
        min_throughput_rows_per_s: SLA on batch scoring throughput.
        max_model_size_mb: Largest model artefact that serving accepts.
        threshold_strategy: ``max_f1`` (threshold maximising F1 on the validation window) or
            ``fixed`` (``fixed_threshold``).
        fixed_threshold: The threshold used by the ``fixed`` strategy.
        bootstrap_samples: Paired bootstrap resamples for the AUC difference interval.
        confidence: Coverage of that interval.
    """

    min_roc_auc: float = 0.70
    max_auc_regression: float = 0.01
    max_demographic_parity_difference: float = 0.15
    max_equalized_odds_difference: float = 0.20
    fairness_min_group_rows: int = 100
    fairness_min_group_positives: int = 20
    latency_p99_ms: float = 50.0
    min_throughput_rows_per_s: float = 5_000.0
    max_model_size_mb: float = 200.0
    threshold_strategy: str = "max_f1"
    fixed_threshold: float = 0.5
    bootstrap_samples: int = 1_000
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.threshold_strategy not in THRESHOLD_STRATEGIES:
            raise EvaluationError(
                f"threshold_strategy={self.threshold_strategy!r}; use one of "
                f"{', '.join(THRESHOLD_STRATEGIES)}."
            )
        if not 0.0 < self.fixed_threshold < 1.0:
            raise EvaluationError(f"fixed_threshold must lie in (0, 1), got {self.fixed_threshold}")
        if not 0.5 < self.confidence < 1.0:
            raise EvaluationError(f"confidence must lie in (0.5, 1), got {self.confidence}")
        if self.bootstrap_samples < 100:
            raise EvaluationError("bootstrap_samples must be at least 100 for a usable interval.")


# The shadow model's live results (keel.serving.live.compare_shadow) are one more gate: a
# challenger whose shadow disagrees with the served model is neither registered nor canaried.
SHADOW_GATE = "shadow_agreement"
SHADOW_MIN_AGREEMENT = 0.8


def shadow_gate(
    comparison: dict,
    min_agreement: float = SHADOW_MIN_AGREEMENT,
    min_rows: int = 200,
    max_auc_drop: float = 0.02,
) -> tuple[bool | None, str]:
    """Whether the shadow's live results pass: None when too few rows were shadowed to judge."""
    rows = int(comparison.get("rows") or 0)
    if rows < min_rows:
        return None, f"{rows} shadowed rows (needs {min_rows})"
    agreement = float(comparison.get("agreement") or 0.0)
    if agreement < min_agreement:
        return False, f"agreement {agreement:.1%} below {min_agreement:.0%} on {rows} rows"
    served_auc, shadow_auc = comparison.get("served_auc"), comparison.get("shadow_auc")
    if served_auc is not None and shadow_auc is not None and served_auc - shadow_auc > max_auc_drop:
        return False, f"shadow AUC {shadow_auc:.3f} against served {served_auc:.3f}"
    return True, f"agreement {agreement:.1%} on {rows} rows"


def with_shadow_gate(summary: dict, comparison: dict, source: str) -> dict | None:
    """Add the shadow gate of ``comparison`` to an evaluation summary's gates; returns the gate.

    A shadow with too few rows to judge adds nothing (None): it neither passes nor blocks.
    """
    passed, why = shadow_gate(comparison)
    if passed is None:
        return None
    gate = {
        "name": SHADOW_GATE,
        "passed": passed,
        "value": comparison.get("agreement"),
        "limit": SHADOW_MIN_AGREEMENT,
        "detail": f"{source}: {why}",
    }
    summary["gates"] = [g for g in summary["gates"] if g["name"] != SHADOW_GATE] + [gate]
    summary["all_gates_passed"] = all(g["passed"] for g in summary["gates"])
    return gate
