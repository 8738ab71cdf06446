"""Resource sets keyed by deployment profile; ``KEEL_PROFILE`` picks one."""

from __future__ import annotations

from typing import Any

import dagster as dg

from keel.settings import FEATURE_REPO_DIR, KeelPaths, active_profile
from keel.storage import MARTS_ENV
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
    """Production profile: one DuckLake, one shared store, services by URL, secrets from the env.

    The lake's catalog is a Postgres database and its data, the marts, the landing files and
    every artefact live on one store (a bucket, or a folder every machine mounts);
    ``orchestration.profile_check`` refuses settings where these parts disagree.
    """
    return {
        # DuckLake: catalog in Postgres, tables as Parquet under the data path (keel.lake); the
        # marts land as Parquet under KEEL_MARTS_DIR, where Feast's offline store reads them.
        "warehouse": WarehouseResource(
            catalog=dg.EnvVar("KEEL_LAKE_CATALOG"),
            data_path=dg.EnvVar("KEEL_LAKE_DATA_PATH"),
            marts_dir=dg.EnvVar(MARTS_ENV),
        ),
        # Source files on the shared store: the landing folder is what ingestion reads.
        "sources": SourcesResource(
            generated_dir=dg.EnvVar("KEEL_GENERATED_DIR"),
            landing_dir=dg.EnvVar("KEEL_LANDING_DIR"),
        ),
        # The same dbt models; the warehouse picks the lake's target.
        "dbt": dbt_resource(),
        # Models, reports, training sets and predictions: s3://bucket/prefix or a shared folder.
        "artefacts": ArtefactStore(root=dg.EnvVar("KEEL_ARTEFACT_ROOT")),
        # Feast: DuckDB offline store over the marts, Redis online store, SQL registry on Postgres.
        "feature_store": FeatureStoreResource(
            repo_path=str(FEATURE_REPO_DIR),
            config_file="feature_store.production.yaml",
            marts=dg.EnvVar(MARTS_ENV),
            variables={
                name: dg.EnvVar(name) for name in ("KEEL_FEAST_REGISTRY_URL", "KEEL_FEAST_REDIS")
            },
        ),
        # An MLflow server backed by Postgres, its artefacts on the shared store.
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
