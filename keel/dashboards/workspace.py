"""An Evidently UI workspace fed by the daily reports: one project per dataset, panels over time.

Each day's report becomes one Evidently snapshot stamped with that day: an Evidently ``Report``
of one ``DailyFigure`` metric per figure of the report, read from a one-row frame, so the panels
plot the very full-data numbers the Dagster metadata and the retraining sensors see
(Evidently's own pages, made on samples, stay the HTML reports of the monitoring assets).
A day reported again replaces its snapshot; feeding the same report twice changes nothing.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from keel.dashboards.reports import FEATURE_SCORE_PREFIX, DailyReport

# The metric type of keel.dashboards.figure_metric.DailyFigure (named here: that module
# imports Evidently).
METRIC = "DailyFigure"

# Stable ids: a dashboard written again keeps its tabs' and panels' ids, so an open page stays.
_IDS = uuid.UUID("6f1c2d4e-8a5b-4c3d-9e7f-0a1b2c3d4e5f")
PROJECT_DESCRIPTION = (
    "Keel monitoring of {dataset}: its daily drift, quality, scores and performance"
)


@dataclass(frozen=True)
class Panel:
    """A dashboard panel: its tab, title, plot type and the figures it draws."""

    tab: str
    title: str
    plot: str
    figures: tuple[tuple[str, str], ...]
    size: str = "half"
    aggregation: str = "last"


PANELS = (
    Panel("Drift", "Share of drifted features, latest day", "counter",
          (("share_of_drifted_features", "share"),)),
    Panel("Drift", "Days with dataset drift", "counter", (("dataset_drift", "days"),),
          aggregation="sum"),
    Panel("Drift", "Share of drifted features", "line",
          (("share_of_drifted_features", "share of drifted features"),), size="full"),
    Panel("Drift", "Drifted features", "bar",
          (("drifted_features", "drifted"), ("features", "monitored"))),
    Panel("Drift", "Dataset and prediction drift (1 = drifted)", "line",
          (("dataset_drift", "dataset drift"), ("prediction_drift", "prediction drift"))),
    Panel("Drift", "Largest population stability index of a feature", "line",
          (("max_psi", "max PSI"),)),
    Panel("Data quality", "Rows scored", "line", (("rows", "rows"),)),
    Panel("Data quality", "Quality issues", "bar", (("quality_issues", "issues"),)),
    Panel("Performance", "AUC, precision and recall on late labels", "line",
          (("auc", "AUC"), ("precision", "precision"), ("recall", "recall")), size="full"),
    Panel("Performance", "Calibration", "line",
          (("brier", "Brier score"), ("expected_calibration_error", "expected calibration error"))),
    Panel("Performance", "Labelled predictions", "bar",
          (("labelled_predictions", "labelled"), ("positives", "positives"))),
    Panel("Scores", "Mean score and share flagged", "line",
          (("mean_score", "mean score"), ("flagged_share", "share flagged")), size="full"),
    Panel("Scores", "Rows scored per load", "bar", (("scored_rows", "rows"),)),
    Panel("Questions", "Questions asked", "bar", (("questions", "questions"),)),
    Panel("Questions", "Unanswered share and cache hit rate", "line",
          (("unanswered_share", "unanswered"), ("cache_hit_rate", "cache hits"))),
    Panel("Questions", "Drift of the questions from the corpus", "line",
          (("question_drift_distance", "embedding distance"),
           ("question_drift_model_auc", "domain classifier AUC")), size="full"),
)  # fmt: skip
FEATURE_PANEL = "Drift score per feature (the test Evidently picks for each)"


@dataclass
class FeedSummary:
    """What one feed did, per dataset's project."""

    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    projects: dict[str, str] = field(default_factory=dict)


def _stable_id(*parts: str) -> uuid.UUID:
    return uuid.uuid5(_IDS, "/".join(parts))


def visible_panels(figures: Iterable[str]) -> list[Panel]:
    """The panels that plot at least one of ``figures``, with a line per feature's drift score."""
    figures = set(figures)
    panels = [p for p in PANELS if any(name in figures for name, _ in p.figures)]
    features = sorted(
        name.removeprefix(FEATURE_SCORE_PREFIX)
        for name in figures
        if name.startswith(FEATURE_SCORE_PREFIX)
    )
    if features:
        lines = tuple((FEATURE_SCORE_PREFIX + f, f) for f in features)
        at = next((i for i, p in enumerate(panels) if p.tab != "Drift"), len(panels))
        panels.insert(at, Panel("Drift", FEATURE_PANEL, "line", lines, size="full"))
    return panels


def dashboard_model(dataset: str, figures: Iterable[str]) -> Any:
    """The dashboard of a dataset's project: the panels of the figures its reports hold."""
    from evidently.sdk.models import (
        DashboardModel,
        DashboardPanelPlot,
        DashboardTabModel,
        PanelMetric,
    )

    panels = visible_panels(figures)
    plots, tabs = [], {}
    for panel in panels:
        params: dict[str, Any] = {"plot_type": panel.plot}
        if panel.plot == "counter":
            params["aggregation"] = panel.aggregation
        plot = DashboardPanelPlot(
            id=_stable_id(dataset, panel.tab, panel.title),
            title=panel.title,
            subtitle=None,
            size=panel.size,
            values=[
                PanelMetric(legend=legend, metric=METRIC, metric_labels={"column": name})
                for name, legend in panel.figures
            ],
            plot_params=params,
        )
        plots.append(plot)
        tabs.setdefault(panel.tab, []).append(plot.id)
    return DashboardModel(
        tabs=[
            DashboardTabModel(id=_stable_id(dataset, "tab", title), title=title, panels=ids)
            for title, ids in tabs.items()
        ],
        panels=plots,
    )


def report_snapshot(report: DailyReport) -> Any:
    """One day's figures as an Evidently snapshot stamped with the day."""
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report

    from keel.dashboards.figure_metric import DailyFigure

    names = sorted(report.figures)
    frame = pd.DataFrame({name: [report.figures[name]] for name in names})
    evidently_report = Report(
        [DailyFigure(column=name) for name in names],
        metadata={
            "dataset": report.dataset,
            "report": report.report,
            "day": report.day,
            "storage_id": str(report.storage_id),
        },
        tags=[report.report],
    )
    return evidently_report.run(
        Dataset.from_pandas(frame, data_definition=DataDefinition(numerical_columns=names)),
        None,
        timestamp=datetime.combine(date.fromisoformat(report.day), datetime.min.time()),
        name=f"{report.dataset} {report.report} {report.day}",
    )


def open_workspace(path: Path | str) -> Any:
    """The Evidently workspace in ``path`` (created when missing)."""
    from evidently.ui.workspace import Workspace

    Path(path).mkdir(parents=True, exist_ok=True)
    return Workspace(str(path))


def project_for(workspace: Any, dataset: str) -> Any:
    """The dataset's project, created the first time the dataset is seen."""
    found = workspace.search_project(dataset)
    if found:
        return found[0]
    return workspace.create_project(dataset, PROJECT_DESCRIPTION.format(dataset=dataset))


def _snapshots(workspace: Any, project_id: Any) -> tuple[dict[tuple[str, str], tuple], set[str]]:
    """The project's snapshot per (report, day) with its event id, and the figures they hold."""
    held: dict[tuple[str, str], tuple] = {}
    figures: set[str] = set()
    for snapshot_id in workspace.list_runs(project_id):
        model = workspace.get_run(project_id, snapshot_id)
        metadata = model.metadata
        if "report" not in metadata or "day" not in metadata:
            continue  # not fed from Keel's reports: someone else's, kept as it is
        held[(metadata["report"], metadata["day"])] = (snapshot_id, int(metadata["storage_id"]))
        for result in model.metric_results.values():
            figures.add(str(result.metric_value_location.metric.params.get("column", "")))
    return held, figures


def feed_workspace(path: Path | str, reports: Iterable[DailyReport]) -> FeedSummary:
    """Add the reports to the workspace in ``path``: a project per dataset, a snapshot per day.

    A day's newer report (a larger event id) replaces the one held; an older or the same one
    leaves it. Each touched project's dashboard is written again with the panels of the figures
    its snapshots hold (a line per feature's drift score).
    """
    workspace = open_workspace(path)
    by_dataset: dict[str, list[DailyReport]] = defaultdict(list)
    for report in reports:
        by_dataset[report.dataset].append(report)
    summary = FeedSummary()
    for dataset, items in sorted(by_dataset.items()):
        project = project_for(workspace, dataset)
        summary.projects[dataset] = str(project.id)
        held, figures = _snapshots(workspace, project.id)
        for report in sorted(items, key=lambda r: r.storage_id):
            key = (report.report, report.day)
            old = held.get(key)
            if old is not None and old[1] >= report.storage_id:
                summary.unchanged += 1
                continue
            new = workspace.add_run(project.id, report_snapshot(report))
            if old is not None:
                workspace.delete_run(project.id, old[0])
                summary.replaced += 1
            else:
                summary.added += 1
            held[key] = (new.id, report.storage_id)
            figures.update(report.figures)
        workspace.save_dashboard(project.id, dashboard_model(dataset, figures))
    return summary
