"""Evidently itself: the reference implementation, and the HTML and PNG artefacts."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel import schema
from keel.mirrors.evidently_stattests import _STATTEST_BY_DISPLAY_NAME
from keel.monitoring.common import (
    SCORE,
    _as_path,
    _category_counts,
    _format_score,
    _numeric_column,
    _sample,
    _scores_array,
    _write_file,
)
from keel.monitoring.drift import DriftResult, FeatureDrift, PredictionDrift
from keel.monitoring.performance import PerformanceResult
from keel.monitoring.quality import QualityResult
from keel.monitoring.reference import ReferenceProfile
from keel.monitoring_policy import DEFAULT_DRIFT_SHARE
from keel.reporting import html_facts, html_table, new_figure, png_bytes


def evidently_data_drift(
    reference_frame: pd.DataFrame,
    current_frame: pd.DataFrame,
    numeric: Sequence[str],
    categorical: Sequence[str],
    *,
    drift_share: float = DEFAULT_DRIFT_SHARE,
) -> DriftResult:
    """Run a fresh Evidently ``Report([DataDriftPreset()])`` and read its verdicts.

    This is Evidently's default use, kept to check the fast path and to benchmark against it.
    """
    snapshot = _run_evidently_drift(
        reference_frame, current_frame, numeric, categorical, drift_share=drift_share
    )
    return drift_result_from_snapshot(
        snapshot, numeric, drift_share=drift_share, rows=len(current_frame)
    )


def _run_evidently_drift(
    reference_frame: pd.DataFrame,
    current_frame: pd.DataFrame,
    numeric: Sequence[str],
    categorical: Sequence[str],
    *,
    drift_share: float = DEFAULT_DRIFT_SHARE,
    summary: bool = False,
    outside_share: Sequence[str] = (),
) -> Any:
    """Evidently's drift preset; columns in ``outside_share`` get a drift test of their own.

    The preset's dataset drift counts the model's features, as Keel's verdict does; the score
    is tested on its own so that both count the same columns.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset, DataSummaryPreset

    definition = DataDefinition(
        numerical_columns=list(numeric), categorical_columns=list(categorical)
    )
    columns = [*numeric, *categorical]
    counted = [c for c in columns if c not in outside_share]
    metrics: list[Any] = [DataDriftPreset(columns=counted, drift_share=drift_share)]
    metrics += [ValueDrift(column=column) for column in outside_share]
    if summary:
        metrics.append(DataSummaryPreset())
    return Report(metrics, include_tests=True).run(
        Dataset.from_pandas(current_frame[columns], data_definition=definition),
        Dataset.from_pandas(reference_frame[columns], data_definition=definition),
    )


def drift_result_from_snapshot(
    snapshot: Any, numeric: Iterable[str], *, drift_share: float, rows: int
) -> DriftResult:
    """Per-column verdicts of an Evidently snapshot run with ``include_tests=True``."""
    numeric = set(numeric)
    report = snapshot.dict()
    scores: dict[str, tuple[str, float, float]] = {}
    for metric in report["metrics"]:
        config = metric["config"]
        if config.get("type") == "evidently:metric_v2:ValueDrift":
            test = _STATTEST_BY_DISPLAY_NAME[config["method"]]
            scores[config["column"]] = (test.name, float(metric["value"]), config["threshold"])
    drifted: dict[str, bool] = {}
    for test in report["tests"]:
        params = test["metric_config"]["params"]
        if params.get("type") == "evidently:metric_v2:ValueDrift":
            drifted[params["column"]] = test["status"] == "FAIL"
    if set(drifted) != set(scores):
        raise ValueError(
            "The Evidently snapshot lacks drift tests; run it with include_tests=True."
        )
    return DriftResult(
        features=tuple(
            FeatureDrift(
                column=column,
                kind="numerical" if column in numeric else "categorical",
                stattest=name,
                score=score,
                threshold=threshold,
                drifted=drifted[column],
                reference_rows=0,
                current_rows=0,
            )
            for column, (name, score, threshold) in scores.items()
        ),
        drift_share=drift_share,
        rows=rows,
    )


def write_drift_report(
    path: Path | str | Any,
    profile: ReferenceProfile,
    current_frame: pd.DataFrame,
    drift: DriftResult,
    *,
    prediction: PredictionDrift | None = None,
    quality: QualityResult | None = None,
    title: str = "Keel drift and data quality report",
    sample_rows: int = 5000,
    seed: int = 0,
) -> Path | Any:
    """Write an Evidently drift + data summary report as HTML, with the full-data verdicts.

    Evidently runs on the profile's reference sample and a seeded sample of at most
    ``sample_rows`` current rows, so the page stays fast to make at any size; the verdicts on
    every row (``drift``, and ``prediction`` and ``quality`` when given) head the page.
    """
    numeric = list(profile.numeric)
    with_score = SCORE in profile.sample and SCORE in current_frame and SCORE not in numeric
    if with_score:
        numeric.append(SCORE)
    current_sample = _sample(current_frame[[*numeric, *profile.categorical]], sample_rows, seed)
    snapshot = _run_evidently_drift(
        profile.sample,
        current_sample,
        numeric,
        list(profile.categorical),
        drift_share=drift.drift_share,
        summary=True,
        # The header counts the features (prediction drift has its own section): so does
        # Evidently's "drift is detected for ... columns".
        outside_share=[SCORE] if with_score else [],
    )
    sample_verdicts = drift_result_from_snapshot(
        snapshot, numeric, drift_share=drift.drift_share, rows=len(current_sample)
    )
    agreement = sum(sample_verdicts.feature(f.column).drifted == f.drifted for f in drift.features)
    parts = [
        f"<h2>{html.escape(title)}</h2>",
        html_facts(
            {
                "champion version": profile.champion_version,
                "training set": profile.training_set_hash,
                "rows tested": drift.rows,
                "dataset drift": "yes" if drift.dataset_drift else "no",
                "drifted features": f"{drift.number_of_drifted_features} of "
                f"{len(drift.features)} ({drift.share_of_drifted_features:.0%}; "
                f"dataset drift from {drift.drift_share:.0%})",
            }
        ),
        "<h3>Drift on every row</h3>",
        html_table(*drift.table()),
    ]
    if prediction is not None:
        d = prediction.drift
        parts += [
            "<h3>Prediction drift</h3>",
            html_facts(
                {
                    "test": d.display_name,
                    "statistic": _format_score(d.score),
                    "threshold": f"{d.threshold:g}",
                    "drifted": "yes" if d.drifted else "no",
                    "mean score": f"{prediction.current_mean:.4f} "
                    f"(reference {prediction.reference_mean:.4f})",
                }
            ),
        ]
    if quality is not None:
        parts += [
            "<h3>Data quality</h3>",
            html_facts({"rows": quality.rows, "issues": "; ".join(quality.issues) or "none"}),
            html_table(*quality.table()),
        ]
    parts.append(
        f"<p>The Evidently report below is computed on samples ({len(profile.sample)} "
        f"reference rows, {len(current_sample)} current rows, seed {seed}); its per-feature "
        f"verdicts agree with the full-data ones above on {agreement} of "
        f"{len(drift.features)} features.</p>"
    )
    return _save_with_section(snapshot, _as_path(path), "\n".join(parts))


def write_performance_report(
    path: Path | str | Any,
    scores: Sequence[float] | np.ndarray | pd.Series,
    labels: Sequence[int] | np.ndarray | pd.Series,
    result: PerformanceResult,
    *,
    title: str = "Keel model performance report",
    sample_rows: int = 20000,
    seed: int = 0,
) -> Path | Any:
    """Write an Evidently classification report as HTML, headed by the full-data figures."""
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.presets import ClassificationPreset

    frame = pd.DataFrame(
        {SCORE: _scores_array(scores, "scores"), schema.LABEL: np.asarray(labels).astype(int)}
    )
    sample = _sample(frame, sample_rows, seed)
    figures = {k: ("undefined" if v is None else v) for k, v in result.summary().items()}
    header = [
        f"<h2>{html.escape(title)}</h2>",
        html_facts({**figures, "threshold": result.threshold}),
        "<h3>Reliability (all rows)</h3>",
        html_table(*result.calibration_table()),
    ]
    if sample[schema.LABEL].nunique() < 2:
        # Evidently's classification metrics need both classes; a day whose few labels are all
        # one class still gets its page, with the figures that are defined.
        page = "\n".join(
            [
                f"<html><head><meta charset='utf-8'><style>{_SECTION_CSS}</style></head><body>",
                '<section class="keel-verdicts">',
                *header,
                "<p>Every labelled row holds the same class: no classification report.</p>",
                "</section></body></html>",
            ]
        )
        target = _as_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_file(target, lambda out: out.write(page.encode()))
        return target
    definition = DataDefinition(
        classification=[
            BinaryClassification(target=schema.LABEL, prediction_probas=SCORE, pos_label=1)
        ],
        numerical_columns=[SCORE],
        categorical_columns=[schema.LABEL],
    )
    snapshot = Report([ClassificationPreset(probas_threshold=result.threshold)]).run(
        Dataset.from_pandas(sample, data_definition=definition), None
    )
    section = "\n".join(
        [
            *header,
            f"<p>The Evidently report below is computed on {len(sample)} of {len(frame)} "
            f"rows (seed {seed}).</p>",
        ]
    )
    return _save_with_section(snapshot, _as_path(path), section)


def _save_with_section(snapshot: Any, path: Path | Any, section: str) -> Path | Any:
    """Save the Evidently page with ``section`` above its dashboard."""
    page = snapshot.get_html_str(as_iframe=False)
    marker = '<div id="root_'
    if marker not in page:
        raise RuntimeError("Evidently's HTML layout changed: no dashboard root to insert before.")
    block = f'<style>{_SECTION_CSS}</style><section class="keel-verdicts">{section}</section>\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    page = page.replace(marker, block + marker, 1)
    _write_file(path, lambda out: out.write(page.encode()))
    return path


_SECTION_CSS = (
    ".keel-verdicts{font-family:sans-serif;margin:16px 24px;max-width:1100px}"
    ".keel-verdicts table{border-collapse:collapse}"
    ".keel-verdicts td,.keel-verdicts th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
)


def plot_drift(
    path: Path | str | Any,
    profile: ReferenceProfile,
    current_frame: pd.DataFrame,
    drift: DriftResult,
    *,
    top: int = 4,
) -> Path | Any:
    """Draw reference versus current distributions of the most drifted features as a PNG."""
    ranked = sorted(drift.features, key=lambda f: -f.severity)[: max(top, 1)]
    figure = new_figure(4.2 * len(ranked), 3.4, layout="constrained")
    axes = figure.subplots(1, len(ranked), squeeze=False)[0]
    for axis, feature in zip(axes, ranked, strict=True):
        if feature.kind == "numerical":
            ref = profile.numeric[feature.column]
            current = _numeric_column(current_frame, feature.column, "current")
            current = current[np.isfinite(current)]
            # The central 99% of both sides: long tails would squash the shapes into one bin.
            low, high = ref.quantile(0.005), ref.quantile(0.995)
            if current.size:
                current_low, current_high = np.quantile(current, [0.005, 0.995])
                low, high = min(low, float(current_low)), max(high, float(current_high))
            edges = np.linspace(low, high if high > low else low + 1.0, 41)
            axis.stairs(
                np.histogram(ref.values, edges, weights=ref.counts)[0] / ref.rows,
                edges,
                label="reference",
            )
            axis.stairs(
                np.histogram(current, edges)[0] / max(current.size, 1), edges, label="current"
            )
            axis.set_xlabel("central 99% of values", fontsize=8)
        else:
            ref = profile.categorical[feature.column]
            current_counts = _category_counts(current_frame[feature.column])
            keys = sorted(set(ref.counts) | set(current_counts))
            positions = np.arange(len(keys))
            current_rows = max(sum(current_counts.values()), 1)
            axis.bar(
                positions - 0.2,
                [ref.counts.get(k, 0) / ref.rows for k in keys],
                0.4,
                label="reference",
            )
            axis.bar(
                positions + 0.2,
                [current_counts.get(k, 0) / current_rows for k in keys],
                0.4,
                label="current",
            )
            axis.set_xticks(positions, keys, rotation=30)
        verdict = "drifted" if feature.drifted else "no drift"
        axis.set_title(
            f"{feature.column}\n{feature.stattest} {_format_score(feature.score)} ({verdict})",
            fontsize=9,
        )
        axis.set_ylabel("share of rows")
        axis.legend(fontsize=8)
    path = _as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = png_bytes(figure, dpi=90, tight=False)
    _write_file(path, lambda out: out.write(png))
    return path
