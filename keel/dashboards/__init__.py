"""Monitoring dashboards: the daily reports in an Evidently UI workspace, a project per dataset.

``reports`` reads the drift and performance reports' figures from Dagster's event log,
``workspace`` turns them into Evidently snapshots and dashboards, ``service`` runs the
``evidently ui`` service on the workspace.
"""

from keel.dashboards.reports import (
    DEFAULT_DATASET,
    REPORT_ASSETS,
    DailyReport,
    ReportBatch,
    ReportMetadataError,
    daily_report,
    dataset_of,
    drift_figures,
    performance_figures,
    reports_from_instance,
)
from keel.dashboards.service import evidently_ui_command, workspace_dir
from keel.dashboards.workspace import (
    PANELS,
    FeedSummary,
    dashboard_model,
    feed_workspace,
    open_workspace,
    report_snapshot,
)

__all__ = [
    "DEFAULT_DATASET",
    "PANELS",
    "REPORT_ASSETS",
    "DailyReport",
    "FeedSummary",
    "ReportBatch",
    "ReportMetadataError",
    "daily_report",
    "dashboard_model",
    "dataset_of",
    "drift_figures",
    "evidently_ui_command",
    "feed_workspace",
    "open_workspace",
    "performance_figures",
    "report_snapshot",
    "reports_from_instance",
    "workspace_dir",
]
