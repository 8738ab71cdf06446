"""What monitoring judges by: the retraining policy and the one default of each threshold.

Kept apart from ``keel.monitoring`` (NumPy, pandas) so that the Dagster monitoring resource takes
its defaults from here without importing the maths, and the sensors, the reports and batch
scoring never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

# Evidently's DataDriftPreset default: the dataset drifts when this share of features drifted.
DEFAULT_DRIFT_SHARE = 0.5
# The AUC on late labels below which a deployment retrains (RetrainPolicy leaves it off).
DEFAULT_MIN_AUC = 0.6
# Score above which an account is flagged: precision and recall, the flagged share of a day.
DEFAULT_DECISION_THRESHOLD = 0.5


@dataclass(frozen=True)
class RetrainPolicy:
    """When a day's monitoring result calls for retraining.

    Attributes:
        drift_share: Retrain when at least this share of features drifted; None uses
            Evidently's dataset-level verdict (the result's own ``drift_share``).
        critical_features: Features whose drift alone calls for retraining.
        min_rows: Days with fewer rows never trigger: their tests are too noisy.
        min_auc: Retrain when the measured AUC falls below this; None ignores performance.
    """

    drift_share: float | None = None
    critical_features: tuple[str, ...] = ()
    min_rows: int = 500
    min_auc: float | None = None
