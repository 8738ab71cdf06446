"""Drift, data quality and model performance monitoring: Evidently's verdicts, computed fast.

Evidently's ``DataDriftPreset`` re-reads the whole reference window for every report: it
re-sorts it for every Wasserstein distance and re-counts it for every Jensen-Shannon distance.
Here the reference window is reduced once per champion to a :class:`ReferenceProfile` (for a
numeric column its exact sorted distinct values with their counts, for a categorical column its
category counts), so a daily report only sorts and counts the current day. The tests, their
selection rules, thresholds and statistics are Evidently's own, mirrored in
``keel.mirrors.evidently_stattests``, so the verdicts and the numbers equal Evidently's on the
same data.

HTML artefacts are real Evidently reports rendered on bounded, seeded samples, with the
verdicts of the full-data fast path written into the same page.
"""

from keel.mirrors.evidently_stattests import (
    EXACT_CDF_LIMIT,
    FEW_DISTINCT_VALUES,
    MIN_WASSERSTEIN_NORM,
    SMALL_REFERENCE_ROWS,
    STATTESTS,
    ColumnKind,
    StatTest,
)
from keel.monitoring.common import SCORE
from keel.monitoring.drift import (
    DriftResult,
    FeatureDrift,
    PredictionDrift,
    data_drift,
    prediction_drift,
)
from keel.monitoring.performance import CalibrationBin, PerformanceResult, performance
from keel.monitoring.quality import ColumnQuality, QualityResult, data_quality
from keel.monitoring.reference import (
    PROFILE_FILE,
    PROFILE_FORMAT,
    SAMPLE_STEM,
    VALUES_STEM,
    CategoricalReference,
    NumericReference,
    ProfileError,
    ReferenceProfile,
    build_reference_profile,
    ensure_reference_profile,
    read_reference_window,
)
from keel.monitoring.reports import (
    drift_result_from_snapshot,
    evidently_data_drift,
    plot_drift,
    write_drift_report,
    write_performance_report,
)
from keel.monitoring.retrain import RetrainDecision, should_retrain
from keel.monitoring_policy import DEFAULT_DRIFT_SHARE, RetrainPolicy

__all__ = [
    "DEFAULT_DRIFT_SHARE",
    "EXACT_CDF_LIMIT",
    "FEW_DISTINCT_VALUES",
    "MIN_WASSERSTEIN_NORM",
    "PROFILE_FILE",
    "PROFILE_FORMAT",
    "SAMPLE_STEM",
    "SCORE",
    "SMALL_REFERENCE_ROWS",
    "STATTESTS",
    "VALUES_STEM",
    "CalibrationBin",
    "CategoricalReference",
    "ColumnKind",
    "ColumnQuality",
    "DriftResult",
    "FeatureDrift",
    "NumericReference",
    "PerformanceResult",
    "PredictionDrift",
    "ProfileError",
    "QualityResult",
    "ReferenceProfile",
    "RetrainDecision",
    "RetrainPolicy",
    "StatTest",
    "build_reference_profile",
    "data_drift",
    "data_quality",
    "drift_result_from_snapshot",
    "ensure_reference_profile",
    "evidently_data_drift",
    "performance",
    "plot_drift",
    "prediction_drift",
    "read_reference_window",
    "should_retrain",
    "write_drift_report",
    "write_performance_report",
]
