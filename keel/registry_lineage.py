"""What a registered version was built from, read back from its MLflow tags."""

from __future__ import annotations

import hashlib
from typing import Any

TAG_TRAINING_SET_SHA256 = "keel.training_set_sha256"
TAG_STAGE = "keel.stage"
TAG_APPROVAL = "keel.approval_status"
TAG_GATES_PASSED = "keel.gates_passed"
TAG_PREVIOUS_CHAMPION = "keel.previous_champion"
TAG_EVALUATION_REPORT = "keel.evaluation_report"
METRIC_PREFIX = "keel.metric."
GATE_PREFIX = "keel.gate."


def file_sha256(path: str) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted).

    Raises:
        FileNotFoundError: nothing exists at ``path``.
    """
    from upath import UPath

    target = UPath(path)
    if not target.exists():
        raise FileNotFoundError(path)
    digest = hashlib.sha256()
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    for file in files:
        if target.is_dir():
            digest.update(str(file.relative_to(target)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def version_lineage(
    model_name: str, version: Any, asked_for: str, aliases: list[str]
) -> dict[str, Any]:
    """Training set (and whether its file still has the recorded hash), features, code, metrics.

    Args:
        model_name: The registered model.
        version: The MLflow ``ModelVersion``.
        asked_for: The number or alias the caller named.
        aliases: The aliases that point at the version now.
    """
    number = str(version.version)
    tags = version.tags
    path = tags.get("keel.training_set_path", "")
    recorded = tags.get(TAG_TRAINING_SET_SHA256, "")
    try:
        current = file_sha256(path) if path else None
    except FileNotFoundError:
        current = None
    return {
        "model": model_name,
        "version": number,
        "asked_for": asked_for,
        "aliases": aliases,
        "stage": tags.get(TAG_STAGE),
        "approval_status": tags.get(TAG_APPROVAL),
        "model_uri": f"models:/{model_name}/{number}",
        "source": version.source,
        "mlflow_run_id": version.run_id,
        "training_set": {
            "path": path,
            "sha256": recorded,
            "dataset_version": tags.get("keel.dataset_version"),
            "exists": current is not None,
            "sha256_matches": current == recorded if current is not None else None,
        },
        "feature_service": tags.get("keel.feature_service"),
        "dbt_models": [m for m in tags.get("keel.dbt_models", "").split(",") if m],
        "dbt_manifest_hash": tags.get("keel.dbt_manifest_hash"),
        "code_commit": tags.get("keel.code_commit"),
        "code_dirty": tags.get("keel.code_dirty") == "true",
        "dagster_data_version": tags.get("keel.dagster_data_version"),
        "model_family": tags.get("keel.model_family"),
        "trained_by": tags.get("keel.trained_by"),
        "evaluation_report": tags.get(TAG_EVALUATION_REPORT),
        "metrics": {
            k.removeprefix(METRIC_PREFIX): float(v)
            for k, v in tags.items()
            if k.startswith(METRIC_PREFIX)
        },
        "gates": {
            k.removeprefix(GATE_PREFIX): v for k, v in tags.items() if k.startswith(GATE_PREFIX)
        },
    }
