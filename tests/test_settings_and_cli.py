import subprocess

import pytest
import yaml
from click.testing import CliRunner

from keel import cli as keel_cli
from keel.settings import KeelPaths, SettingsError, active_profile
from orchestration.profiles import resources_for
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


def test_profile_switch_changes_the_resources(keel_home, monkeypatch):
    local = resources_for("local")
    assert local["warehouse"].database == str(keel_home.warehouse)
    monkeypatch.setenv("KEEL_WAREHOUSE", "md:keel_prod")
    monkeypatch.setenv("KEEL_ARTEFACT_ROOT", "s3://bucket/keel")
    production = resources_for("production")
    assert production.keys() == local.keys()
    assert production["warehouse"].database != local["warehouse"].database


@pytest.mark.parametrize("profile", ["local", "production"])
def test_dagster_home_gets_the_profile_instance(keel_home, monkeypatch, profile):
    home = keel_cli.prepare_dagster_home(keel_home, profile)
    config = yaml.safe_load((home / "dagster.yaml").read_text())
    limits = config["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": "gpu", "limit": limits[0]["limit"]} in limits
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
