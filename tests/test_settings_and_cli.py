import subprocess

import dagster as dg
import pytest
import yaml
from click.testing import CliRunner

from keel import cli as keel_cli
from keel.settings import KeelPaths, SettingsError, active_profile
from orchestration.profiles import resources_for
from orchestration.resources import ArtefactStore, MlflowResource, WarehouseResource
from tests.conftest import REPO_ROOT


def test_keel_home_moves_every_path(keel_home: KeelPaths):
    paths = KeelPaths.current()
    assert paths.home == keel_home.home
    assert paths.warehouse.parent == keel_home.home
    assert paths.mlflow.is_relative_to(keel_home.home)


def test_unknown_profile_is_refused(monkeypatch):
    monkeypatch.setenv("KEEL_PROFILE", "staging")
    with pytest.raises(SettingsError, match="not a Keel profile"):
        active_profile()


PRODUCTION_SETTINGS = {
    "KEEL_LAKE_CATALOG": "postgresql://keel@db/keel_lake",
    "KEEL_LAKE_DATA_PATH": "s3://bucket/keel/lake/",
    "KEEL_MARTS_DIR": "s3://bucket/keel/marts",
    "KEEL_ARTEFACT_ROOT": "s3://bucket/keel",
    "MLFLOW_TRACKING_URI": "https://mlflow.example.com",
    "MLFLOW_REGISTRY_URI": "postgresql://mlflow@db/registry",
    "KEEL_MLFLOW_ARTIFACTS": "s3://bucket/mlflow",
    "KEEL_CODE_COMMIT": "0123abc",
}


@dg.asset
def resolved_settings(
    warehouse: WarehouseResource, artefacts: ArtefactStore, mlflow: MlflowResource
) -> dict:
    """What the resources hold once Dagster has resolved their configuration."""
    # A DuckDB file (local) or a lake (production): the settings of the kind in use.
    kind = (
        {"KEEL_WAREHOUSE": warehouse.database}
        if warehouse.database
        else {"KEEL_LAKE_CATALOG": warehouse.catalog, "KEEL_LAKE_DATA_PATH": warehouse.data_path}
    )
    return {
        **kind,
        "KEEL_MARTS_DIR": warehouse.marts_dir,
        "KEEL_ARTEFACT_ROOT": artefacts.root,
        "MLFLOW_TRACKING_URI": mlflow.tracking_uri,
        "MLFLOW_REGISTRY_URI": mlflow.registry_uri,
        "KEEL_MLFLOW_ARTIFACTS": mlflow.artifact_location,
        "KEEL_CODE_COMMIT": mlflow.code_commit,
    }


def _resolve(profile: str) -> dict:
    resources = resources_for(profile)
    result = dg.materialize(
        [resolved_settings],
        resources={name: resources[name] for name in ("warehouse", "artefacts", "mlflow")},
    )
    return result.output_for_node("resolved_settings")


def test_local_profile_resources_point_into_the_data_folder(keel_home):
    seen = _resolve("local")
    assert seen["KEEL_WAREHOUSE"] == str(keel_home.warehouse)
    assert seen["KEEL_MARTS_DIR"] == str(keel_home.marts)
    assert seen["KEEL_ARTEFACT_ROOT"] == str(keel_home.artefacts)


def test_production_resources_read_their_settings_from_the_environment(keel_home, monkeypatch):
    for name, value in PRODUCTION_SETTINGS.items():
        monkeypatch.setenv(name, value)
    assert resources_for("production").keys() == resources_for("local").keys()

    # Dagster resolves each EnvVar when the run starts: the step sees the variable's value.
    assert _resolve("production") == PRODUCTION_SETTINGS

    monkeypatch.setenv("KEEL_LAKE_CATALOG", "postgresql://keel@db/other_lake")
    assert _resolve("production")["KEEL_LAKE_CATALOG"] == "postgresql://keel@db/other_lake"


def test_a_missing_production_setting_stops_the_run_and_names_the_variable(keel_home, monkeypatch):
    for name, value in PRODUCTION_SETTINGS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KEEL_LAKE_CATALOG")
    with pytest.raises(dg.DagsterInvalidConfigError, match="KEEL_LAKE_CATALOG"):
        _resolve("production")


@pytest.mark.parametrize("profile", ["local", "production"])
def test_dagster_home_gets_the_profile_instance(keel_home, monkeypatch, profile):
    home = keel_cli.prepare_dagster_home(keel_home, profile)
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    limits = config["concurrency"]["runs"]["tag_concurrency_limits"]
    # One GPU run at a time on a laptop; production shares a node pool of four.
    assert {"key": "gpu", "limit": 1 if profile == "local" else 4} in limits
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    storage = "sqlite" if profile == "local" else "postgres"
    assert storage in config["storage"]


def test_keel_info_reports_the_data_folder(keel_home):
    result = CliRunner().invoke(keel_cli.cli, ["info"])
    assert result.exit_code == 0, result.output
    assert str(keel_home.warehouse) in result.output


def test_keel_help_lists_the_stage_commands(venv_bin):
    result = subprocess.run(
        [str(venv_bin / "keel"), "--help"], capture_output=True, text=True, check=True
    )
    for command in ("info", "prepare", "dev", "demo"):
        assert f"  {command}" in result.stdout


def test_torch_is_a_cpu_build_without_cuda_packages(venv_bin):
    freeze = subprocess.run(
        [str(venv_bin / "pip"), "freeze"], capture_output=True, text=True, check=True
    ).stdout.lower()
    assert "nvidia-" not in freeze and "triton" not in freeze
    pins = [
        line
        for line in (REPO_ROOT / "requirements.lock").read_text().lower().splitlines()
        if line and not line.startswith("#")
    ]
    assert not [pin for pin in pins if pin.startswith(("nvidia-", "cuda-", "triton"))]
    assert "torch==2.13.0" in pins
