"""Live traffic as data: a day's prediction log as a frame, and the shadow model against it.

Plain functions over what `keel.serving.prediction_log.read_prediction_log` returns. The
daily Dagster assets (``online_predictions``, ``shadow_report``) are thin wrappers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from keel import schema

if TYPE_CHECKING:
    import pandas as pd

# What a client got: the columns of the online predictions frame besides the features.
SERVED_COLUMNS = (
    "request_id",
    "ts",
    schema.ENTITY_KEY,
    "arm",
    "model_version",
    "score",
    "latency_ms",
    "error",
    "fallback_version",
    "cache_hit",
    "feature_event_time",
    "route",
    "shadow_version",
    "shadow_score",
    "shadow_latency_ms",
    "shadow_error",
)


def online_frame(log: pd.DataFrame) -> pd.DataFrame:
    """One row per scored entity with the features as columns (rows without a score dropped)."""
    import pandas as pd

    scored = log[log["score"].notna()].reset_index(drop=True)
    features = pd.DataFrame.from_records(
        [f if isinstance(f, dict) else {} for f in scored["features"]],
        columns=list(schema.MODEL_FEATURES),
    )
    served = scored.drop(columns=["features", "row"]).rename(
        columns={"account_id": schema.ENTITY_KEY}
    )
    served = served[[c for c in SERVED_COLUMNS if c in served.columns]]
    return pd.concat([served, features], axis=1)


@dataclass(frozen=True)
class ShadowComparison:
    """How the shadow model's scores compare with the scores clients got."""

    shadow_versions: list[str]
    served_versions: list[str]
    rows: int
    shadow_errors: int
    agreement: float  # share of rows on the same side of the decision threshold
    pearson: float
    spearman: float
    mean_abs_difference: float
    served_p50_ms: float
    served_p99_ms: float
    shadow_p50_ms: float
    shadow_p99_ms: float
    labelled_rows: int
    served_auc: float
    shadow_auc: float
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in asdict(self).items()
        }


def compare_shadow(
    frame: pd.DataFrame, threshold: float = 0.5, labels: pd.DataFrame | None = None
) -> ShadowComparison:
    """Agreement, correlation, latency and (with ``account_id``/``label``) AUC of the shadow.

    Args:
        frame: `online_frame` rows (or the raw log) with ``shadow_*`` columns.
        threshold: The decision threshold that defines agreement.
        labels: Known outcomes, ``account_id`` and ``label`` (0/1).
    """
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    with_shadow = frame[frame["shadow_version"].notna()]
    shadow_errors = int(with_shadow["shadow_error"].notna().sum())
    both = with_shadow[with_shadow["shadow_score"].notna() & with_shadow["score"].notna()]
    served = both["score"].to_numpy(dtype=float)
    shadow = both["shadow_score"].to_numpy(dtype=float)
    nan = float("nan")
    enough = len(both) >= 3 and served.std() > 0 and shadow.std() > 0

    def quantile(values: Any, q: float) -> float:
        values = np.asarray(values, dtype=float)
        values = values[np.isfinite(values)]
        return float(np.quantile(values, q)) if values.size else nan

    served_auc = shadow_auc = nan
    labelled = 0
    if labels is not None and not labels.empty and len(both):
        from sklearn.metrics import roc_auc_score

        known = labels.drop_duplicates(schema.ENTITY_KEY, keep="last").set_index(schema.ENTITY_KEY)[
            "label"
        ]
        key = schema.ENTITY_KEY if schema.ENTITY_KEY in both.columns else "account_id"
        outcome = both[key].map(known)
        mask = outcome.notna().to_numpy()
        labelled = int(mask.sum())
        if labelled and outcome[mask].nunique() == 2:
            truth = outcome[mask].astype(int).to_numpy()
            served_auc = float(roc_auc_score(truth, served[mask]))
            shadow_auc = float(roc_auc_score(truth, shadow[mask]))
    return ShadowComparison(
        shadow_versions=sorted({str(v) for v in with_shadow["shadow_version"]}),
        served_versions=sorted({str(v) for v in both["model_version"].dropna()}),
        rows=len(both),
        shadow_errors=shadow_errors,
        agreement=float(((served >= threshold) == (shadow >= threshold)).mean())
        if len(both)
        else nan,
        pearson=float(pearsonr(served, shadow)[0]) if enough else nan,
        spearman=float(spearmanr(served, shadow)[0]) if enough else nan,
        mean_abs_difference=float(np.abs(served - shadow).mean()) if len(both) else nan,
        served_p50_ms=quantile(both["latency_ms"], 0.5),
        served_p99_ms=quantile(both["latency_ms"], 0.99),
        shadow_p50_ms=quantile(both["shadow_latency_ms"], 0.5),
        shadow_p99_ms=quantile(both["shadow_latency_ms"], 0.99),
        labelled_rows=labelled,
        served_auc=served_auc,
        shadow_auc=shadow_auc,
        threshold=threshold,
    )
