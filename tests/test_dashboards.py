"""The Evidently workspace fed by the daily reports, read back through Evidently's own API."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest

from keel.dashboards import (
    DEFAULT_DATASET,
    dashboard_model,
    dataset_of,
    performance_figures,
    workspace_dir,
)
from keel.dashboards.workspace import FEATURE_PANEL, PANELS
from orchestration.dashboards import monitoring_dashboards
from orchestration.resources import ArtefactStore
from tests.dashboards_support import DAYS, report_drift, report_performance
from tests.dashboards_support import daily_results as support_results


@pytest.fixture(scope="module")
def daily_results():
    """Real drift and performance results (keel.monitoring) of four days drifting more each day."""
    drift, perf = support_results()
    shares = [drift[day].share_of_drifted_features for day in DAYS]
    assert shares[0] < shares[-1]
    return drift, perf


def _tick(instance, root: Path, cursor):
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"artefacts": ArtefactStore(root=str(root))}
    )
    return monitoring_dashboards(context)


def _series(workspace_path: Path, project_id, column: str) -> list[float]:
    """A panel's series as Evidently's UI service computes it from the workspace."""
    from evidently.ui.service.base import SeriesFilter
    from evidently.ui.service.storage.local.base import InMemoryDataStorage

    storage = InMemoryDataStorage(str(workspace_path))
    response = asyncio.run(
        storage.get_data_series(
            project_id,
            [
                SeriesFilter(
                    tags=[],
                    metadata={},
                    metric="evidently:metric_v2:DailyFigure",
                    metric_labels={"column": column},
                )
            ],
            None,
            None,
        )
    )
    (series,) = response.series
    return series.values


def test_the_sensor_feeds_a_project_per_dataset_with_a_snapshot_per_report_and_day(
    tmp_path, daily_results
):
    from evidently.ui.workspace import Workspace

    drift, perf = daily_results
    instance = dg.DagsterInstance.ephemeral()
    for day in DAYS:
        report_drift(instance, "drift_report", day, drift[day], issues=["x: values out of range"])
        report_performance(instance, "performance_report", day, perf[day])
    # A second dataset's assets carry its name as their key prefix; two days of drift only.
    for day in DAYS[:2]:
        report_drift(instance, ["taiwan", "drift_report"], day, drift[day])

    tick = _tick(instance, tmp_path, None)
    assert isinstance(tick, dg.SensorResult), tick
    assert "10 snapshots added" in tick.skip_reason.skip_message

    path = workspace_dir(tmp_path)
    workspace = Workspace(str(path))
    projects = {project.name: project for project in workspace.list_projects()}
    assert set(projects) == {DEFAULT_DATASET, "taiwan"}
    default, taiwan = projects[DEFAULT_DATASET], projects["taiwan"]
    assert len(workspace.list_runs(default.id)) == 2 * len(DAYS)
    assert len(workspace.list_runs(taiwan.id)) == 2

    snapshots = [workspace.get_run(default.id, run) for run in workspace.list_runs(default.id)]
    stamped = sorted((s.metadata["report"], s.timestamp.date().isoformat()) for s in snapshots)
    assert stamped == sorted([("drift", d) for d in DAYS] + [("performance", d) for d in DAYS])

    # The panels' series, as the UI service reads them: the reports' full-data figures by day.
    shares = _series(path, default.id, "share_of_drifted_features")
    assert shares == pytest.approx([drift[d].share_of_drifted_features for d in DAYS])
    aucs = _series(path, default.id, "auc")
    assert aucs == pytest.approx([perf[d].auc for d in DAYS])
    assert aucs[0] > aucs[-1]
    assert _series(path, default.id, "quality_issues") == [1.0] * len(DAYS)
    assert _series(path, taiwan.id, "share_of_drifted_features") == pytest.approx(shares[:2])

    # Every panel of the dashboard draws figures the snapshots hold.
    dashboard = workspace.get_dashboard(default.id)
    tabs = {"Drift", "Data quality", "Performance"}
    assert {tab.title for tab in dashboard.tabs} == tabs
    titles = {panel.title for panel in dashboard.panels}
    # Each panel of those tabs whose figures the reports hold: all but a folder's load PSI.
    assert {p.title for p in PANELS if p.tab in tabs and p.figures[0][0] != "max_psi"} | {
        FEATURE_PANEL
    } == titles
    held = {
        result.metric_value_location.metric.params["column"]
        for s in snapshots
        for result in s.metric_results.values()
    }
    for panel in dashboard.panels:
        assert panel.values, panel.title
        for value in panel.values:
            assert value.metric_labels["column"] in held, (panel.title, value)
    feature_panel = next(p for p in dashboard.panels if p.title == FEATURE_PANEL)
    assert {v.legend for v in feature_panel.values} == {f.column for f in drift[DAYS[0]].features}


def test_a_day_reported_again_replaces_its_snapshot_and_nothing_new_is_a_skip(
    tmp_path, daily_results
):
    from evidently.ui.workspace import Workspace

    drift, perf = daily_results
    instance = dg.DagsterInstance.ephemeral()
    for day in DAYS[:2]:
        report_drift(instance, "drift_report", day, drift[day])
    first = _tick(instance, tmp_path, None)
    assert isinstance(_tick(instance, tmp_path, first.cursor), dg.SkipReason)

    # The first day is reported again with the last day's (drifted) result; a malformed event
    # is named, not fed, and does not hold up the others.
    report_drift(instance, "drift_report", DAYS[0], drift[DAYS[-1]])
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key="drift_report", partition=DAYS[2], metadata={})
    )
    report_performance(instance, "performance_report", DAYS[1], perf[DAYS[1]])
    second = _tick(instance, tmp_path, first.cursor)
    assert "1 snapshots added, 1 replaced" in second.skip_reason.skip_message
    assert json.loads(second.cursor)["storage_id"] > json.loads(first.cursor)["storage_id"]

    path = workspace_dir(tmp_path)
    (project,) = Workspace(str(path)).list_projects()
    assert len(Workspace(str(path)).list_runs(project.id)) == 3
    assert _series(path, project.id, "share_of_drifted_features") == pytest.approx(
        [drift[DAYS[-1]].share_of_drifted_features, drift[DAYS[1]].share_of_drifted_features]
    )

    # Feeding from the start again (a lost cursor) adds nothing.
    again = _tick(instance, tmp_path, None)
    assert "0 snapshots added, 0 replaced, 4 unchanged" in again.skip_reason.skip_message


def test_dataset_names_come_from_the_asset_keys_or_the_metadata():
    assert dataset_of(["drift_report"], {}) == DEFAULT_DATASET
    assert dataset_of(["drift_report"], {"dataset": "cards"}) == "cards"
    assert dataset_of(["taiwan", "drift_report"], {"dataset": "ignored"}) == "taiwan"
    assert performance_figures({"labels_arrived": 0}) is None


def test_a_dashboard_written_again_keeps_its_ids():
    figures = ["share_of_drifted_features", "auc", "drift_score.income"]
    first = dashboard_model("cards", figures)
    second = dashboard_model("cards", [*figures, "drift_score.age", "rows"])
    assert {t.id for t in first.tabs} < {t.id for t in second.tabs}
    assert {p.id for p in first.panels} < {p.id for p in second.panels}
    assert not {p.id for p in first.panels} & {p.id for p in dashboard_model("x", figures).panels}


def test_a_dataset_folders_load_drift_gets_a_project_with_its_drift_panels(tmp_path):
    from evidently.ui.workspace import Workspace

    instance = dg.DagsterInstance.ephemeral()
    # What a dataset folder's <name>/drift asset records for each load (PSI per feature).
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=["cards", "drift"],
            metadata={
                "drifted_features": dg.MetadataValue.int(2),
                "drift_share": dg.MetadataValue.float(0.25),
                "max_psi": dg.MetadataValue.float(0.31),
                "load": dg.MetadataValue.text("2026-05-02"),
            },
        )
    )
    tick = _tick(instance, tmp_path, None)
    assert "1 snapshots added" in tick.skip_reason.skip_message

    path = workspace_dir(tmp_path)
    workspace = Workspace(str(path))
    (project,) = workspace.list_projects()
    assert project.name == "cards"
    (run,) = workspace.list_runs(project.id)
    # An unpartitioned report is dated by the day it was recorded.
    assert workspace.get_run(project.id, run).timestamp.date() == datetime.now(UTC).date()
    assert _series(path, project.id, "max_psi") == [pytest.approx(0.31)]
    assert _series(path, project.id, "share_of_drifted_features") == [pytest.approx(0.25)]
    titles = {panel.title for panel in workspace.get_dashboard(project.id).panels}
    assert titles == {
        "Share of drifted features, latest day",
        "Share of drifted features",
        "Drifted features",
        "Largest population stability index of a feature",
    }


def test_keel_dashboards_feed_reads_the_data_folders_instance(
    keel_home, monkeypatch, daily_results
):
    from click.testing import CliRunner
    from evidently.ui.workspace import Workspace

    from keel.cli import cli, prepare_dagster_home

    monkeypatch.setenv("DAGSTER_HOME", str(keel_home.dagster_home))
    prepare_dagster_home(keel_home, "local")
    drift, _ = daily_results
    with dg.DagsterInstance.get() as instance:
        for day in DAYS[:3]:
            report_drift(instance, ["cards", "drift_report"], day, drift[day])

    runner = CliRunner()
    first = runner.invoke(cli, ["dashboards", "feed"])
    assert first.exit_code == 0, first.output
    assert "3 snapshots added, 0 replaced, 0 unchanged; projects: cards" in first.output
    again = runner.invoke(cli, ["dashboards", "feed"])
    assert "0 snapshots added, 0 replaced, 3 unchanged" in again.output
    (project,) = Workspace(str(workspace_dir(keel_home.artefacts))).list_projects()
    assert project.name == "cards"


@pytest.mark.slow  # the service takes 15-60 s to start on a busy machine
def test_the_evidently_ui_serves_the_workspace_beside_a_command_and_stops_with_it(tmp_path):
    import socket
    import sys
    import urllib.request

    from keel.dashboards.service import run_beside
    from keel.dashboards.workspace import open_workspace, project_for

    workspace = tmp_path / "evidently"
    project_for(open_workspace(workspace), "cards")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    answer = tmp_path / "projects.json"
    # The command `keel dev` runs beside the UI (the Dagster UI there): here, a probe of the UI.
    probe = f"""
import time, urllib.request
for _ in range(300):
    try:
        with urllib.request.urlopen("http://127.0.0.1:{port}/api/projects", timeout=5) as r:
            open({str(answer)!r}, "wb").write(r.read())
            break
    except OSError:
        time.sleep(0.5)
"""
    said = []
    code = run_beside(
        [sys.executable, "-c", probe], tmp_path, workspace, host="127.0.0.1", port=port,
        echo=said.append,
    )  # fmt: skip
    assert code == 0
    assert [p["name"] for p in json.loads(answer.read_text())] == ["cards"]
    assert f"http://127.0.0.1:{port}" in said[0]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5)


def _recorded(key: dg.AssetKey, day: str) -> dg.AssetMaterialization:
    """A materialisation of ``key`` with the metadata entries its asset records for ``day``."""
    n = DAYS.index(day)
    kind = key.path[-1]
    if kind == "drift":  # a dataset folder's PSI drift of a load
        metadata = {
            "drifted_features": dg.MetadataValue.int(n),
            "drift_share": dg.MetadataValue.float(n / 8),
            "max_psi": dg.MetadataValue.float(0.05 + 0.1 * n),
            "features": dg.MetadataValue.md("| feature | PSI | drifted |"),
            "load": dg.MetadataValue.text(day),
        }
    elif kind == "scores":  # a dataset folder's scores of a load
        metadata = {
            "rows": dg.MetadataValue.int(1_000 + n),
            "load": dg.MetadataValue.text(day),
            "mean_score": dg.MetadataValue.float(0.2 + 0.01 * n),
            "flagged_share": dg.MetadataValue.float(0.1 + 0.02 * n),
            "version": dg.MetadataValue.text("1"),
            "family": dg.MetadataValue.text("lightgbm"),
            "path": dg.MetadataValue.path(f"/scores/{day}.parquet"),
        }
    else:  # rag_monitoring: a day of questions to the RAG service
        assert kind == "rag_monitoring", key
        metadata = {
            "questions": dg.MetadataValue.int(40 + n),
            "unanswered_share": dg.MetadataValue.float(0.05 * n),
            "cache_hit_rate": dg.MetadataValue.float(0.5),
            "drift_distance": dg.MetadataValue.float(0.01 * n),
            "drift_model_auc": dg.MetadataValue.float(0.5 + 0.05 * n),
        }
    return dg.AssetMaterialization(asset_key=key, partition=day, metadata=metadata)


def test_every_dataset_folder_and_the_rag_monitoring_get_a_project_fed_with_their_reports(
    tmp_path, daily_results
):
    from evidently.ui.workspace import Workspace

    import assets.datasets as folders
    from assets.rag import rag_monitoring

    # Every dataset folder the project discovers, by its drift and scores assets' key prefix.
    keys = [asset.key for asset in folders.DATASET_DRIFT + folders.DATASET_SCORES]
    datasets = sorted({key.path[0] for key in keys})
    assert datasets and all(len(key.path) == 2 for key in keys)
    instance = dg.DagsterInstance.ephemeral()
    drift, _ = daily_results
    for day in DAYS[:2]:
        report_drift(instance, "drift_report", day, drift[day])
        for key in [*keys, rag_monitoring.key]:
            instance.report_runless_asset_event(_recorded(key, day))
    tick = _tick(instance, tmp_path, None)
    assert not tick.skip_reason.skip_message.startswith("0 snapshots")

    path = workspace_dir(tmp_path)
    workspace = Workspace(str(path))
    projects = {project.name: project for project in workspace.list_projects()}
    assert set(projects) == {*datasets, "rag", DEFAULT_DATASET}
    for name in datasets:
        project = projects[name]
        stamped = sorted(
            (run.metadata["report"], run.metadata["day"])
            for run in (workspace.get_run(project.id, i) for i in workspace.list_runs(project.id))
        )
        assert stamped == sorted((r, d) for r in ("drift", "scores") for d in DAYS[:2]), name
        assert _series(path, project.id, "max_psi") == pytest.approx([0.05, 0.15])
        assert _series(path, project.id, "mean_score") == pytest.approx([0.2, 0.21])
        assert _series(path, project.id, "scored_rows") == pytest.approx([1_000, 1_001])
        titles = {panel.title for panel in workspace.get_dashboard(project.id).panels}
        assert {"Mean score and share flagged", "Rows scored per load"} <= titles
        assert "Largest population stability index of a feature" in titles
    rag = projects["rag"]
    assert len(workspace.list_runs(rag.id)) == 2
    assert _series(path, rag.id, "question_drift_model_auc") == pytest.approx([0.5, 0.55])
    assert _series(path, rag.id, "questions") == pytest.approx([40, 41])
    assert {panel.title for panel in workspace.get_dashboard(rag.id).panels} == {
        "Questions asked",
        "Unanswered share and cache hit rate",
        "Drift of the questions from the corpus",
    }
    # The main model's reports stay in their own project, apart from the folders'.
    assert len(workspace.list_runs(projects[DEFAULT_DATASET].id)) == 2


def test_a_scores_or_rag_report_without_its_figures_is_named_not_fed(tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    instance.report_runless_asset_event(
        dg.AssetMaterialization(asset_key=["cards", "scores"], partition=DAYS[0], metadata={})
    )
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key="rag_monitoring", partition=DAYS[0], metadata={"questions": 3}
        )
    )
    from keel.dashboards import reports_from_instance

    batch = reports_from_instance(instance)
    assert batch.reports == []
    assert [problem.split(" (event")[0] for problem in batch.problems] == [
        f"cards/scores {DAYS[0]}",
        f"rag_monitoring {DAYS[0]}",
    ]
    assert "no flagged_share, mean_score, rows" in batch.problems[0]
    assert "no cache_hit_rate, drift_distance" in batch.problems[1]
