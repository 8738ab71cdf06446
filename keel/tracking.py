"""MLflow tracking for the training stage: lineage, one run per final fit, the pyfunc model.

Every final fit becomes one MLflow run in `keel.training.EXPERIMENT_NAME` whose ``keel.*``
tags say where the model came from (data, code, feature service, dbt models) and whose model
is an MLflow pyfunc: ``predict(DataFrame of schema.MODEL_FEATURES)`` returns P(defaulted=1).
The model is saved through this module as its ``loader_module``, so loading it runs Keel's own
code (which checks the weights' sha256) and never unpickles anything.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import platform
import subprocess
import tempfile
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature

from keel.schema import (
    ACCOUNTS_MART,
    FEATURES_MART,
    LABELS_MART,
    MODEL_FEATURES,
)
from keel.settings import DBT_PROJECT_DIR, PROJECT_ROOT
from keel.training.models import RiskModel, load_model_folder, save_risk_model
from keel.training.run import TrainingOutcome

DBT_MANIFEST = DBT_PROJECT_DIR / "target" / "manifest.json"
# The marts the point-in-time training set is read from (features, labels, accounts).
TRAINING_MARTS = (FEATURES_MART, LABELS_MART, Path(ACCOUNTS_MART).stem)
MODEL_ARTIFACT = "model"
# Logged as params for a quick look in the UI; the full list goes to an artefact.
KEY_PACKAGES = (
    "dagster",
    "lightgbm",
    "torch",
    "optuna",
    "mlflow",
    "numpy",
    "pandas",
    "scikit-learn",
    "safetensors",
    "pyarrow",
    "feast",
    "dbt-core",
)
# What the logged model needs at predict time, besides the keel package itself.
MODEL_REQUIREMENTS = {
    "lightgbm": ("mlflow", "numpy", "pandas", "lightgbm"),
    "torch": ("mlflow", "numpy", "pandas", "torch", "safetensors"),
}


class LineageError(RuntimeError):
    """Something a run must record (code version, dbt manifest) cannot be found."""


@dataclass(frozen=True)
class CodeVersion:
    """The git commit the code came from, and whether the working tree differed from it."""

    commit: str
    dirty: bool


@dataclass(frozen=True)
class DbtLineage:
    """The dbt manifest's sha256 and the dbt models upstream of the training set."""

    manifest_hash: str
    models: tuple[str, ...]


@dataclass(frozen=True)
class Lineage:
    """Everything a training run records about where its model came from."""

    dataset_version: str
    training_set_path: str
    dagster_data_version: str
    feature_service: str
    trained_by: str
    code: CodeVersion
    dbt: DbtLineage

    def tags(self, family: str) -> dict[str, str]:
        """The run's ``keel.*`` tags (and MLflow's own commit and user tags)."""
        return {
            "keel.dataset_version": self.dataset_version,
            "keel.training_set_path": self.training_set_path,
            "keel.dagster_data_version": self.dagster_data_version,
            "keel.code_commit": self.code.commit,
            "keel.code_dirty": "true" if self.code.dirty else "false",
            "keel.feature_service": self.feature_service,
            "keel.dbt_manifest_hash": self.dbt.manifest_hash,
            "keel.dbt_models": ",".join(self.dbt.models),
            "keel.model_family": family,
            "keel.trained_by": self.trained_by,
            "mlflow.source.git.commit": self.code.commit,
            "mlflow.user": self.trained_by,
        }


@dataclass(frozen=True)
class LoggedRun:
    """Where a final fit was logged."""

    run_id: str
    experiment_id: str
    model_uri: str
    logged_model_uri: str


def code_version(root: Path = PROJECT_ROOT, commit: str = "") -> CodeVersion:
    """The git commit of ``root`` and its dirty flag (uncommitted or untracked files).

    Args:
        root: A git working tree.
        commit: A commit fixed at build time (images carry no .git); skips git.
    """
    if commit:
        return CodeVersion(commit, dirty=False)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=normal"))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        raise LineageError(
            f"cannot read the git commit of {root} ({detail.strip()}); run from a git checkout "
            "or set MlflowResource.code_commit"
        ) from error
    return CodeVersion(head, dirty)


def dbt_lineage(
    manifest_path: Path = DBT_MANIFEST, marts: Iterable[str] = TRAINING_MARTS
) -> DbtLineage:
    """Hash the dbt manifest and list the models that build ``marts`` and everything upstream.

    A model builds a mart when its name or alias is the mart's name or ends in ``_<mart>``
    (``fct_<mart>``), or when its external location names the mart.
    """
    try:
        raw = Path(manifest_path).read_bytes()
    except FileNotFoundError as error:
        raise LineageError(
            f"dbt manifest {manifest_path} is missing; run `keel prepare` (it parses the dbt "
            "project) before training"
        ) from error
    try:
        nodes = json.loads(raw)["nodes"]
    except (ValueError, KeyError) as error:
        raise LineageError(f"{manifest_path} is not a dbt manifest") from error
    models = {key: node for key, node in nodes.items() if node.get("resource_type") == "model"}

    def builds_mart(node: Mapping[str, Any], mart: str) -> bool:
        names = {node.get("name") or "", node.get("alias") or ""}
        location = str((node.get("config") or {}).get("location") or "")
        return (
            any(name == mart or name.endswith(f"_{mart}") for name in names)
            or f"/{mart}" in location
        )

    marts = tuple(marts)
    queue = deque(key for key, node in models.items() if any(builds_mart(node, m) for m in marts))
    upstream: set[str] = set()
    while queue:
        key = queue.popleft()
        if key in upstream or key not in models:
            continue
        upstream.add(key)
        queue.extend(models[key].get("depends_on", {}).get("nodes", []))
    names = tuple(sorted(models[key]["name"] for key in upstream))
    return DbtLineage(hashlib.sha256(raw).hexdigest(), names)


def collect_lineage(
    *,
    dataset_version: str,
    training_set_path: str,
    dagster_data_version: str,
    feature_service: str,
    trained_by: str = "",
    code_commit: str = "",
    manifest_path: Path | None = None,
) -> Lineage:
    """Gather a run's lineage; the trainer is the authenticated identity (`keel.access`).

    ``trained_by`` names it only where it is that identity, or, in the local profile, as an
    unverified name; an empty one is the identity's (``KEEL_API_KEY``, else the OS user).
    """
    from keel.access import AccessError
    from keel.access.store import acting_name

    if not dataset_version:
        raise LineageError("the training set's dataset_version is empty")
    try:
        trainer = acting_name(trained_by)
    except AccessError as error:
        raise LineageError(f"no trainer for the run: {error}") from error
    return Lineage(
        dataset_version=dataset_version,
        training_set_path=training_set_path,
        dagster_data_version=dagster_data_version,
        feature_service=feature_service,
        trained_by=trainer,
        code=code_version(commit=code_commit),
        dbt=dbt_lineage(manifest_path or DBT_MANIFEST),
    )


def package_versions() -> dict[str, str]:
    """Every installed distribution and its version, plus the Python version."""
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> tuple[tuple[str, str], ...]:
    # Cached: the environment does not change under a running process, and reading every
    # distribution's metadata takes about a second.
    versions = {"python": platform.python_version()}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            versions[name.lower()] = distribution.version
    return tuple(sorted(versions.items()))


def _loggable_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


def log_training_run(
    outcome: TrainingOutcome,
    lineage: Lineage,
    *,
    experiment_id: str,
    settings: Mapping[str, Any],
) -> LoggedRun:
    """Log one final fit as an MLflow run: tags, params, metrics, artefacts and the model.

    The caller sets the tracking URI first (`orchestration.resources.MlflowResource.configure`)
    and, on a SQLite store, holds its write lock.

    Args:
        outcome: What `keel.training.train_family` returned.
        lineage: Data, code and dbt lineage (`collect_lineage`).
        experiment_id: The experiment to log into.
        settings: Training settings (trials, budget, seed, windows) logged as ``setting.*``.
    """
    versions = package_versions()
    family = outcome.family
    with tempfile.TemporaryDirectory(prefix="keel-model-") as scratch:
        folder = save_risk_model(outcome.model, Path(scratch) / "risk_model")
        example = outcome.input_example
        if example is None or example.empty:
            raise ValueError("the training outcome carries no input example")
        signature = infer_signature(example, outcome.model.predict_proba(example))
        run_name = f"{family}-{lineage.dataset_version[:12]}"
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=run_name, tags=lineage.tags(family)
        ) as run:
            mlflow.log_params(outcome.params)
            mlflow.log_params({f"setting.{key}": value for key, value in settings.items()})
            mlflow.log_params(
                {f"package.{name}": versions[name] for name in KEY_PACKAGES if name in versions}
            )
            mlflow.log_params({"package.python": versions["python"]})
            mlflow.log_metrics(_loggable_metrics(outcome.metrics))
            mlflow.log_metrics(_loggable_metrics(outcome.details))
            mlflow.log_metrics({f"{name}_rows": count for name, count in outcome.rows.items()})
            mlflow.log_metrics(
                _loggable_metrics(
                    {
                        "tuning_best_value": outcome.tuning.best_value,
                        "tuning_finished_trials": outcome.tuning.finished_trials,
                        "tuning_pruned_trials": outcome.tuning.pruned_trials,
                        "training_seconds": outcome.seconds,
                    }
                )
            )
            for entry in outcome.history:
                mlflow.log_metrics(
                    _loggable_metrics(
                        {f"epoch_{key}": value for key, value in entry.items() if key != "epoch"}
                    ),
                    step=int(entry["epoch"]),
                )
            mlflow.log_dict(versions, "environment/packages.json")
            mlflow.log_dict(
                {
                    "study_name": outcome.tuning.study_name,
                    "storage": outcome.tuning.storage,
                    "best_trial": outcome.tuning.best_trial,
                    "best_value": outcome.tuning.best_value,
                    "best_params": outcome.best_params,
                    "finished_trials": outcome.tuning.finished_trials,
                    "pruned_trials": outcome.tuning.pruned_trials,
                },
                "tuning/study.json",
            )
            mlflow.log_dict(
                {
                    "validation_start": outcome.cutoffs.validation_start.isoformat(),
                    "test_start": outcome.cutoffs.test_start.isoformat(),
                    "end": outcome.cutoffs.end.isoformat(),
                    "rows": outcome.rows,
                },
                "data/split.json",
            )
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                loader_module=__name__,
                data_path=str(folder),
                signature=signature,
                input_example=example,
                pip_requirements=[
                    f"{name}=={versions[name]}" for name in MODEL_REQUIREMENTS[family]
                ],
                metadata={"keel_family": family, "keel_package": versions.get("keel", "")},
            )
    run_id = run.info.run_id
    return LoggedRun(
        run_id=run_id,
        experiment_id=experiment_id,
        model_uri=f"runs:/{run_id}/{MODEL_ARTIFACT}",
        logged_model_uri=info.model_uri,
    )


class PyfuncRiskModel:
    """What MLflow's ``pyfunc.load_model`` returns for a Keel model: P(defaulted=1) per row."""

    def __init__(self, model: RiskModel) -> None:
        self.model = model

    def predict(
        self, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input, columns=list(MODEL_FEATURES))
        return self.model.predict_proba(model_input)

    def get_raw_model(self) -> RiskModel:
        return self.model


def _load_pyfunc(data_path: str) -> PyfuncRiskModel:
    """MLflow's entry point for models logged with ``loader_module="keel.tracking"``."""
    return PyfuncRiskModel(load_model_folder(data_path))


def load_logged_model(model_uri: str) -> RiskModel:
    """The Keel model behind an MLflow model URI (runs:/..., models:/name@alias, models:/m-...)."""
    pyfunc_model = mlflow.pyfunc.load_model(model_uri)
    if pyfunc_model.loader_module != __name__:
        raise LineageError(
            f"{model_uri} was not logged by Keel's training stage "
            f"(loader module {pyfunc_model.loader_module!r})"
        )
    return pyfunc_model.get_raw_model()
