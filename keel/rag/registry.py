"""Index versions in the MLflow registry, next to the models: one run and one version each.

The run records the lineage (corpus hash, chunker settings, embedding model and its hash,
index settings) as tags and the evaluation as metrics; the registered model version points
at the run and carries the same tags, so an index version is found, compared and audited as
a model version is.
"""

from __future__ import annotations

from typing import Any

REGISTERED_NAME = "keel-rag-index"
EXPERIMENT = "keel-rag"


def _flat(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(f"{prefix}{key}.", value))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def register_index(
    tracking_uri: str,
    experiment_id: str,
    manifest: dict[str, Any],
    evaluation: dict[str, Any],
) -> str:
    """Record ``manifest``'s version with its lineage and evaluation; returns the MLflow version.

    The caller holds the registry's write lock. A version already registered is not
    registered twice: its existing MLflow version is returned.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri)
    version = manifest["version"]
    try:
        client.get_registered_model(REGISTERED_NAME)
    except MlflowException:
        client.create_registered_model(
            REGISTERED_NAME, description="Retrieval index versions (chunks, vectors, BM25)."
        )
    for existing in client.search_model_versions(f"name='{REGISTERED_NAME}'"):
        if existing.tags.get("index_version") == version:
            return existing.version
    tags = {"index_version": version, **_flat("lineage.", manifest["lineage"])}
    run = client.create_run(experiment_id, run_name=f"rag-index-{version}", tags=tags)
    for key, value in evaluation.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            client.log_metric(run.info.run_id, key, float(value))
    client.log_dict(run.info.run_id, manifest, "index/manifest.json")
    client.set_terminated(run.info.run_id)
    created = client.create_model_version(
        REGISTERED_NAME,
        source=f"{run.info.artifact_uri}/index",
        run_id=run.info.run_id,
        tags=tags,
        description=f"index {version}",
    )
    client.set_registered_model_alias(REGISTERED_NAME, "published", created.version)
    return created.version
