"""Challenger versus champion on one held-out window: quality, fairness, serving cost and gates.

Everything here works on fitted model objects with the training
stage's interface (``family``, ``feature_names``, ``predict_proba(frame) -> P(default)``), so it
runs the same on LightGBM, PyTorch or any other model family. The result is one JSON-ready
dictionary (:func:`evaluate`) from which the gates, the HTML report and the Dagster metadata
are rendered.
"""

from keel.evaluation.comparison import (
    Candidate,
    Evaluation,
    decide_gates,
    evaluate,
    evaluate_model,
    flat_metrics,
    window_summary,
)
from keel.evaluation.fairness import disparity_intervals, fairness_report
from keel.evaluation.metrics import (
    QUALITY_METRICS,
    RiskModel,
    bootstrap_auc_difference,
    bootstrap_counts,
    choose_threshold,
    expected_calibration_error,
    labels_of,
    quality_metrics,
    reliability_table,
    score,
    weighted_auc,
)
from keel.evaluation.report import (
    Table,
    html_report,
    markdown_tables,
    plots,
    report_notes,
    report_tables,
)
from keel.evaluation.serving import (
    ServingProbe,
    pickled_size_bytes,
    precision_variants,
    serving_cost,
)
from keel.reporting import markdown_image, markdown_table

__all__ = [
    "QUALITY_METRICS",
    "Candidate",
    "Evaluation",
    "RiskModel",
    "ServingProbe",
    "Table",
    "bootstrap_auc_difference",
    "bootstrap_counts",
    "choose_threshold",
    "decide_gates",
    "disparity_intervals",
    "evaluate",
    "evaluate_model",
    "expected_calibration_error",
    "fairness_report",
    "flat_metrics",
    "html_report",
    "labels_of",
    "markdown_image",
    "markdown_table",
    "markdown_tables",
    "pickled_size_bytes",
    "plots",
    "precision_variants",
    "quality_metrics",
    "reliability_table",
    "report_notes",
    "report_tables",
    "score",
    "serving_cost",
    "weighted_auc",
    "window_summary",
]
