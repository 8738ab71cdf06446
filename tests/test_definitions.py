import subprocess
import sys

import dagster as dg

from keel.datasets.spec import discover
from tests.conftest import REPO_ROOT

HEAVY_MODULES = (
    "feast",
    "evidently",
    "mlflow",
    "torch",
    "great_expectations",
    "lightgbm",
    "pandas",
)


def test_definitions_load_and_validate():
    from orchestration.definitions import defs

    dg.Definitions.validate_loadable(defs)


def test_loading_definitions_imports_no_heavy_library():
    probe = (
        "import sys, orchestration.definitions\n"
        f"print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "", f"imported at load time: {result.stdout.strip()}"


def test_dagster_cli_validates_the_workspace(venv_bin):
    result = subprocess.run(
        [str(venv_bin / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_pipeline_stage_is_an_asset_group():
    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    groups = {graph.get(key).group_name for key in graph.get_all_asset_keys()}
    # Besides the stages, each dataset folder is a group of its own.
    datasets = {spec.name for spec in discover()}
    assert datasets <= groups
    assert groups - datasets == {
        "ingestion",
        "transformation",
        "features",
        "training",
        "evaluation",
        "registry",
        "inference",
        "monitoring",
        "serving",
        "streaming",
        "rag",
    }


def test_jobs_schedules_and_sensors_are_wired():
    from orchestration.definitions import defs

    for job in (
        "daily_pipeline",
        "reference_data",
        "retrain",
        *(spec.name for spec in discover()),
        "registry_action",
        "live_traffic",
        "release",
        "rag_documents",
        "rag_index",
        "rag_monitoring_daily",
    ):
        assert defs.resolve_job_def(job).name == job
    # Each job runs the stages it is named for, and not the others.
    expected = {
        "daily_pipeline": {"raw_account_activity", "batch_predictions", "drift_report"},
        "reference_data": {"raw_account_holders", "feast_registry"},
        "retrain": {"training_set", "lightgbm_model", "torch_model", "registered_model"},
        # A dataset's job applies the Feast registry itself before its training set.
        **{
            spec.name: {f"{spec.name}/raw", f"{spec.name}/training_set", "feast_registry"}
            for spec in discover()
        },
    }
    for job, assets in expected.items():
        keys = defs.resolve_job_def(job).asset_layer.selected_asset_keys
        selected = {key.to_user_string() for key in keys}
        assert assets <= selected, (job, assets - selected)
        others = set().union(*(a for name, a in expected.items() if name != job)) - assets
        assert not others & selected, (job, others & selected)
    assert {s.name for s in defs.schedules} == {
        "daily_pipeline_schedule",
        "reference_data_schedule",
        "weekly_retrain_schedule",
        "rag_index_daily",
        "rag_monitoring_daily_schedule",
    }
    assert {s.name for s in defs.sensors} == {
        "landing_file_sensor",
        "drift_sensor",
        "performance_sensor",
        "run_failure_alert",
        "canary_sensor",
        "monitoring_dashboards",
        "cost_observations",
        "stream_lag_sensor",
        "new_manual_pages",
    }
    assert defs.resolve_job_def("retrain").tags["gpu"] == "true"
