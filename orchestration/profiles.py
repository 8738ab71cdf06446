"""Resource sets keyed by deployment profile; ``KEEL_PROFILE`` picks one."""

from __future__ import annotations

from typing import Any

import dagster as dg

from keel.settings import FEATURE_REPO_DIR, KeelPaths, active_profile
from orchestration.dbt import DBT_EXECUTABLE, dbt_project
from orchestration.resources import (
    ArtefactStore,
    ComputeResource,
    FeatureStoreResource,
    KeelDbtCliResource,
    MlflowResource,
    ModelGovernance,
    MonitoringResource,
    SourcesResource,
    StreamResource,
    WarehouseResource,
)


def dbt_resource() -> KeelDbtCliResource:
    """The dbt CLI of this environment, on the project in ``dbt_project/``."""
    return KeelDbtCliResource(project_dir=dbt_project, dbt_executable=DBT_EXECUTABLE)


def local_resources(paths: KeelPaths) -> dict[str, Any]:
    """Embedded profile: everything in one data folder, nothing to start by hand."""
    return {
        # DuckDB file holding raw, quarantine and dbt tables; marts also land as Parquet.
        "warehouse": WarehouseResource(database=str(paths.warehouse), marts_dir=str(paths.marts)),
        # The generator's extracts, the landing folder, the bad-row limit.
        "sources": SourcesResource(
            generated_dir=str(paths.generated),
            landing_dir=str(paths.landing),
        ),
        # dbt CLI on dbt_project/; each call passes the warehouse's path as a dbt variable.
        "dbt": dbt_resource(),
        # Models, reports and training sets as files.
        "artefacts": ArtefactStore(root=str(paths.artefacts)),
        # Feast: DuckDB offline store over the marts, SQLite online store, file registry.
        "feature_store": FeatureStoreResource(
            repo_path=str(FEATURE_REPO_DIR),
            config_file="feature_store.yaml",
            marts=str(paths.marts),
            variables={"KEEL_HOME": str(paths.home)},
        ),
        # MLflow tracking and registry on SQLite; the lock serialises registry writes.
        "mlflow": MlflowResource(
            tracking_uri=f"sqlite:///{paths.mlflow / 'mlflow.db'}",
            registry_uri=f"sqlite:///{paths.mlflow / 'mlflow.db'}",
            artifact_location=str(paths.mlflow / "artifacts"),
            lock_file=str(paths.mlflow / "registry.lock"),
        ),
        # CUDA when torch sees a GPU, else the CPU; checkpoints and Optuna studies on disk.
        "compute": ComputeResource(
            device="auto",
            checkpoint_dir=str(paths.artefacts / "checkpoints"),
            study_storage=str(paths.optuna),
        ),
        # Gates, SLA, approvals: a laptop auto-approves a candidate that passed every gate, and
        # its latency SLA allows for a machine that is busy with other work.
        "governance": ModelGovernance(auto_approve=True, latency_p99_ms=250.0),
        # Drift and decay policies for the sensors, and where alerts go.
        "monitoring": MonitoringResource(),
        # NATS on this machine; `keel stream consume` keeps its log in the data folder.
        "stream": StreamResource(state_dir=str(paths.home / "streaming")),
    }


def production_resources() -> dict[str, Any]:
    """Production profile: hosted warehouse and object storage, secrets from the environment."""
    return {
        # MotherDuck database (md:NAME, token in MOTHERDUCK_TOKEN); marts on object storage.
        "warehouse": WarehouseResource(
            database=dg.EnvVar("KEEL_WAREHOUSE"), marts_dir=dg.EnvVar("KEEL_MARTS_DIR")
        ),
        # Source locations on shared storage.
        "sources": SourcesResource(
            generated_dir=dg.EnvVar("KEEL_GENERATED_DIR"),
            landing_dir=dg.EnvVar("KEEL_LANDING_DIR"),
        ),
        "dbt": dbt_resource(),
        # Object store URL such as s3://bucket/keel.
        "artefacts": ArtefactStore(root=dg.EnvVar("KEEL_ARTEFACT_ROOT")),
        # Feast: BigQuery offline store, Redis online store, SQL registry on Postgres.
        "feature_store": FeatureStoreResource(
            repo_path=str(FEATURE_REPO_DIR),
            config_file="feature_store.production.yaml",
            marts=dg.EnvVar("KEEL_MARTS_DIR"),
            variables={
                name: dg.EnvVar(name)
                for name in (
                    "KEEL_FEAST_REGISTRY_URL",
                    "KEEL_FEAST_REDIS",
                    "KEEL_BIGQUERY_PROJECT",
                    "KEEL_BIGQUERY_DATASET",
                    "KEEL_BIGQUERY_LOCATION",
                )
            },
        ),
        # An MLflow server backed by Postgres and object storage.
        "mlflow": MlflowResource(
            tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"),
            registry_uri=dg.EnvVar("MLFLOW_REGISTRY_URI"),
            artifact_location=dg.EnvVar("KEEL_MLFLOW_ARTIFACTS"),
            code_commit=dg.EnvVar("KEEL_CODE_COMMIT"),
        ),
        # GPU nodes (the torch asset asks Kubernetes for nvidia.com/gpu); checkpoints on a
        # persistent volume so that a preempted pod resumes.
        "compute": ComputeResource(
            device="auto",
            checkpoint_dir=dg.EnvVar("KEEL_CHECKPOINT_DIR"),
            study_storage=dg.EnvVar("KEEL_OPTUNA_STORAGE"),
        ),
        # People approve promotions; the audit log lives in Postgres, its key in a secret.
        "governance": ModelGovernance(
            auto_approve=False,
            audit_uri=dg.EnvVar("KEEL_REGISTRY_AUDIT_URI"),
            audit_key=dg.EnvVar("KEEL_REGISTRY_AUDIT_KEY"),
        ),
        "monitoring": MonitoringResource(webhook_url=dg.EnvVar("KEEL_ALERT_WEBHOOK")),
        # The NATS cluster and the consumer's log folder on the machine that runs it.
        "stream": StreamResource(
            url=dg.EnvVar("KEEL_NATS_URL"), state_dir=dg.EnvVar("KEEL_STREAM_STATE_DIR")
        ),
    }


def team_resources(paths: KeelPaths) -> dict[str, Any]:
    """Team profile: the local stores in a KEEL_HOME every worker mounts, MLflow as a server.

    Its Dagster instance (Postgres) and executor (Celery workers) are what differ most.
    """
    from keel.lake import lake_catalog, lake_data_path

    local = local_resources(paths)
    return {
        **local,
        # DuckLake: catalog in Postgres (KEEL_LAKE_CATALOG), Parquet under KEEL_LAKE_DATA_PATH
        # (default: the shared data folder's lake/); marts land as Parquet as in the local one.
        "warehouse": WarehouseResource(
            catalog=lake_catalog(),
            data_path=lake_data_path(paths.home),
            extension_dir=str(paths.home / "duckdb_extensions"),
            marts_dir=str(paths.marts),
        ),
        # Feast: SQL registry on Postgres and Redis online store that every worker shares;
        # the offline store reads the marts' Parquet in the shared data folder.
        "feature_store": FeatureStoreResource(
            repo_path=str(FEATURE_REPO_DIR),
            config_file="feature_store.team.yaml",
            marts=str(paths.marts),
            variables={
                "KEEL_HOME": str(paths.home),
                "KEEL_FEAST_REGISTRY_URL": dg.EnvVar("KEEL_FEAST_REGISTRY_URL"),
                "KEEL_FEAST_REDIS": dg.EnvVar("KEEL_FEAST_REDIS"),
            },
        ),
        # The audit log in Postgres, written by a role that may only INSERT and SELECT it
        # (`keel team up` creates both); its key is a secret every worker shares.
        "governance": ModelGovernance(
            **{
                **local["governance"].model_dump(),
                "audit_uri": dg.EnvVar("KEEL_REGISTRY_AUDIT_URI"),
                "audit_key": dg.EnvVar("KEEL_REGISTRY_AUDIT_KEY"),
            }
        ),
        # `keel team up` serves MLflow on Postgres; artefacts go to the shared data folder.
        "mlflow": MlflowResource(
            tracking_uri=dg.EnvVar("KEEL_MLFLOW_TRACKING_URI"),
            registry_uri=dg.EnvVar("KEEL_MLFLOW_TRACKING_URI"),
            artifact_location=str(paths.mlflow / "artifacts"),
            lock_file=str(paths.mlflow / "registry.lock"),
        ),
    }


def resources_for(profile: str | None = None) -> dict[str, Any]:
    """The resource set of ``profile`` (default: the active one)."""
    profile = profile or active_profile()
    if profile == "production":
        return production_resources()
    if profile == "team":
        return team_resources(KeelPaths.current())
    return local_resources(KeelPaths.current())
