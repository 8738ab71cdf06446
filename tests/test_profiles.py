"""The production profile's check: every variable set, and the parts agree on where things are."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestration.profile_check import ProfileError, check_production, require_production
from orchestration.profiles import production_resources

REPO_ROOT = Path(__file__).resolve().parent.parent

BUCKET = "s3://keel-prod/keel"
SETTINGS = {
    "KEEL_LAKE_CATALOG": "postgresql://keel@db.internal:5432/keel_lake",
    "KEEL_LAKE_DATA_PATH": f"{BUCKET}/lake/",
    "KEEL_MARTS_DIR": f"{BUCKET}/marts",
    "KEEL_GENERATED_DIR": "/srv/keel/generated",
    "KEEL_LANDING_DIR": f"{BUCKET}/landing",
    "KEEL_ARTEFACT_ROOT": f"{BUCKET}/artefacts",
    "KEEL_FEAST_REGISTRY_URL": "postgresql+psycopg://keel:secret@db.internal:5432/feast",
    "KEEL_FEAST_REDIS": "redis.internal:6379,password=secret",
    "MLFLOW_TRACKING_URI": "https://mlflow.internal",
    "MLFLOW_REGISTRY_URI": "https://mlflow.internal",
    "KEEL_MLFLOW_ARTIFACTS": f"{BUCKET}/mlflow",
    "KEEL_CODE_COMMIT": "0123abc",
    "KEEL_CHECKPOINT_DIR": "/mnt/checkpoints",
    "KEEL_OPTUNA_STORAGE": "postgresql://keel@db.internal:5432/optuna",
    "KEEL_REGISTRY_AUDIT_URI": "postgresql+psycopg://auditor@db.internal:5432/audit",
    "KEEL_REGISTRY_AUDIT_KEY": "secret",
    "KEEL_ALERT_WEBHOOK": "https://alerts.internal/hook",
    "KEEL_NATS_URL": "nats://nats.internal:4222",
    "KEEL_STREAM_STATE_DIR": "/var/lib/keel/stream",
    # The Dagster instance: runs on Postgres, launched as Kubernetes jobs.
    "DAGSTER_PG_HOST": "db.internal",
    "DAGSTER_PG_USER": "dagster",
    "DAGSTER_PG_PASSWORD": "secret",
    "DAGSTER_PG_DB": "dagster",
    "KEEL_IMAGE": "registry.internal/keel:0123abc",
    "KEEL_K8S_NAMESPACE": "keel",
    "KEEL_K8S_SERVICE_ACCOUNT": "keel-runs",
}


def test_a_complete_consistent_setting_passes():
    assert check_production(environ=SETTINGS) == []
    require_production(environ=SETTINGS)


def test_every_missing_variable_is_named_with_what_it_configures():
    assert len(SETTINGS) == 26
    for name in SETTINGS:
        environ = {key: value for key, value in SETTINGS.items() if key != name}
        problems = check_production(environ=environ)
        assert [p for p in problems if p.startswith(f"{name} is not set")], name
        environ[name] = "  "
        assert any(p.startswith(f"{name} is not set") for p in check_production(environ=environ))


def test_lake_data_and_artefacts_on_different_stores_are_refused():
    for artefacts in ("/srv/keel/artefacts", "s3://another-bucket/keel/artefacts"):
        environ = {**SETTINGS, "KEEL_ARTEFACT_ROOT": artefacts}
        with pytest.raises(ProfileError, match="different stores") as refused:
            require_production(environ=environ)
        assert f"artefacts.root={artefacts}" in str(refused.value)
        assert f"warehouse.data_path={BUCKET}/lake/" in str(refused.value)


def test_a_shared_folder_for_everything_passes_but_a_relative_one_is_refused():
    folders = {
        "KEEL_LAKE_DATA_PATH": "/mnt/keel/lake/",
        "KEEL_MARTS_DIR": "/mnt/keel/marts",
        "KEEL_LANDING_DIR": "/mnt/keel/landing",
        "KEEL_ARTEFACT_ROOT": "/mnt/keel/artefacts",
        "KEEL_MLFLOW_ARTIFACTS": "/mnt/keel/mlflow",
    }
    assert check_production(environ={**SETTINGS, **folders}) == []
    relative = {**SETTINGS, **folders, "KEEL_ARTEFACT_ROOT": "keel/artefacts"}
    assert check_production(environ=relative) == [
        "artefacts.root=keel/artefacts is a relative path: other machines cannot find it"
    ]


def test_feast_reading_other_marts_than_dbt_writes_is_refused():
    resources = production_resources()
    resources["feature_store"] = resources["feature_store"].model_copy(
        update={"marts": "s3://keel-prod/keel/old-marts"}
    )
    problems = check_production(resources, SETTINGS)
    assert problems == [
        f"dbt's export writes the marts to {BUCKET}/marts but Feast reads them from "
        "s3://keel-prod/keel/old-marts"
    ]


def test_local_services_are_refused_where_every_machine_must_share_them():
    environ = {
        **SETTINGS,
        "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db",
        "KEEL_LAKE_CATALOG": "/tmp/catalog.duckdb",
        "KEEL_REGISTRY_AUDIT_URI": "sqlite:///audit.db",
        "KEEL_GENERATED_DIR": f"{BUCKET}/generated",
    }
    problems = check_production(environ=environ)
    assert len(problems) == 4
    assert any(p.startswith(f"sources.generated_dir={BUCKET}/generated") for p in problems)
    assert any(p.startswith("warehouse.catalog=/tmp/catalog.duckdb") for p in problems)
    assert any(p.startswith("governance.audit_uri=sqlite:///audit.db") for p in problems)
    assert any(p.startswith("mlflow.tracking_uri=sqlite:///mlflow.db") for p in problems)


def test_keel_profile_check_prints_the_problems_and_fails(monkeypatch):
    from keel.cli import cli

    for name, value in SETTINGS.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    passed = runner.invoke(cli, ["profile", "check"])
    assert passed.exit_code == 0, passed.output
    assert "consistent" in passed.output
    monkeypatch.delenv("KEEL_FEAST_REDIS")
    monkeypatch.setenv("KEEL_ARTEFACT_ROOT", "/srv/keel/artefacts")
    failed = runner.invoke(cli, ["profile", "check"])
    assert failed.exit_code == 1
    assert "KEEL_FEAST_REDIS is not set" in failed.output
    assert "different stores" in failed.output


def test_the_deployment_example_names_every_variable_and_passes_the_check():
    from orchestration.profile_check import environment_variables, instance_variables

    example = REPO_ROOT / "deploy" / "keel.env.example"
    settings = dict(
        line.split("=", 1)
        for line in example.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    read = {*environment_variables(production_resources()), *instance_variables()}
    assert {name for name in settings if not name.startswith("AWS_")} == read
    assert check_production(environ=settings) == []
    helm = (REPO_ROOT / "deploy" / "helm" / "values.yaml").read_text()
    assert "deploy/keel.env.example" in helm
