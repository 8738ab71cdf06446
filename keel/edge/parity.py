"""Parity: a bundle's scores against the native model's on the same held-out rows.

FP32 must agree within `ParityPolicy.fp32_tolerance` (1e-5) on every row. INT8 trades
precision for speed, so it has its own bounds: the largest score change and the ROC AUC it may
lose. A bundle passes only when every variant it ships passes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from keel.training import RiskModel


@dataclass(frozen=True)
class ParityPolicy:
    """How far a bundle's scores may stray from the native model's.

    Attributes:
        fp32_tolerance: Largest absolute score difference of the FP32 graph on any row.
        int8_max_abs_diff: Largest absolute score difference of the INT8 graph on any row.
        int8_max_auc_drop: ROC AUC the INT8 graph may lose against the native model.
    """

    fp32_tolerance: float = 1e-5
    int8_max_abs_diff: float = 0.02
    int8_max_auc_drop: float = 0.005

    def bound(self, variant: str) -> float:
        return self.fp32_tolerance if variant == "fp32" else self.int8_max_abs_diff


def _auc(labels: np.ndarray | None, scores: np.ndarray) -> float:
    if labels is None or len(np.unique(labels)) < 2:
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def check_parity(
    folder: str | Path,
    native: RiskModel,
    frame: pd.DataFrame,
    labels: np.ndarray | None = None,
    policy: ParityPolicy | None = None,
) -> dict[str, Any]:
    """Score ``frame`` with the native model and every variant of the bundle, and compare.

    Returns a report: ``passed``, ``rows``, the policy, and per variant the largest and mean
    absolute difference, its bound, the ROC AUC of both and the change, and why it failed.
    A bundle that cannot be loaded (altered file, missing variant) fails with the reason.
    """
    from keel.edge.serving import frame_columns
    from keel_edge import Bundle, BundleIntegrityError, ContractError, read_manifest

    policy = policy or ParityPolicy()
    expected = native.predict_proba(frame)
    native_auc = _auc(labels, expected)
    report: dict[str, Any] = {
        "rows": len(frame),
        "policy": asdict(policy),
        "native_auc": native_auc,
        "variants": {},
    }
    try:
        variants = list(read_manifest(folder)["variants"])
    except (BundleIntegrityError, ValueError, KeyError) as error:
        return {**report, "passed": False, "failure": f"unreadable manifest: {error}"}
    for variant in variants:
        result: dict[str, Any] = {"bound": policy.bound(variant)}
        try:
            bundle = Bundle(folder, variant, threads=0)
            columns = frame_columns(frame, bundle.feature_names, set(bundle.contract.numeric))
            scores = bundle.predict(columns)
        except (BundleIntegrityError, ContractError, RuntimeError, ValueError) as error:
            report["variants"][variant] = {**result, "passed": False, "failure": str(error)}
            continue
        difference = np.abs(scores - expected)
        auc = _auc(labels, scores)
        result.update(
            max_abs_diff=float(difference.max()) if len(difference) else 0.0,
            mean_abs_diff=float(difference.mean()) if len(difference) else 0.0,
            rows_beyond_bound=int((~(difference <= result["bound"])).sum()),
            auc=auc,
            auc_change=auc - native_auc,
        )
        failures = []
        if result["rows_beyond_bound"]:
            failures.append(
                f"{result['rows_beyond_bound']} of {len(frame)} scores differ by more than "
                f"{result['bound']:g} (largest {result['max_abs_diff']:.3g})"
            )
        if variant != "fp32" and -result["auc_change"] > policy.int8_max_auc_drop:
            failures.append(
                f"ROC AUC drops by {-result['auc_change']:.4f} "
                f"(more than {policy.int8_max_auc_drop:g})"
            )
        result["passed"] = not failures
        if failures:
            result["failure"] = "; ".join(failures)
        report["variants"][variant] = result
    report["passed"] = bool(report["variants"]) and all(
        result["passed"] for result in report["variants"].values()
    )
    return report


def describe(report: dict[str, Any]) -> str:
    """One line per variant, for logs and the check's description."""
    lines = []
    for variant, result in report["variants"].items():
        if "max_abs_diff" not in result:
            lines.append(f"{variant}: FAIL, {result['failure']}")
            continue
        verdict = "PASS" if result["passed"] else f"FAIL, {result['failure']}"
        lines.append(
            f"{variant}: max |diff| {result['max_abs_diff']:.2e} (bound {result['bound']:g}), "
            f"AUC change {result['auc_change']:+.4f}: {verdict}"
        )
    return "; ".join(lines) or report.get("failure", "no variants")
