"""Where Keel keeps its data, and which deployment profile is active.

Two environment variables steer everything: ``KEEL_PROFILE`` picks the deployment profile
(``local``, the embedded default, ``team`` on shared services, or ``production``) and
``KEEL_HOME`` moves the one data folder of the local profile (warehouse, marts, artefacts,
MLflow store, Feast stores, Dagster storage). Nothing else reads the environment for paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DBT_PROJECT_DIR = PROJECT_ROOT / "dbt_project"
FEATURE_REPO_DIR = PROJECT_ROOT / "feature_repo"
DAGSTER_CONFIG_DIR = PROJECT_ROOT / "orchestration" / "instance"

DATASETS_ENV = "KEEL_DATASETS_DIR"
# dbt writes its manifest here (relative to the dbt project, or absolute).
DBT_TARGET_ENV = "DBT_TARGET_PATH"

PROFILES = ("local", "team", "production")
PROFILE_ENV = "KEEL_PROFILE"
HOME_ENV = "KEEL_HOME"


class SettingsError(ValueError):
    """An environment setting Keel cannot work with."""


def active_profile() -> str:
    """The deployment profile named by ``KEEL_PROFILE`` (default ``local``)."""
    profile = os.environ.get(PROFILE_ENV, "local").strip() or "local"
    if profile not in PROFILES:
        raise SettingsError(
            f"{PROFILE_ENV}={profile!r} is not a Keel profile; use one of {', '.join(PROFILES)}."
        )
    return profile


def keel_home() -> Path:
    """The data folder: ``KEEL_HOME`` if set, else ``.keel`` in the project."""
    raw = os.environ.get(HOME_ENV, "").strip()
    return Path(raw).expanduser().resolve() if raw else PROJECT_ROOT / ".keel"


def datasets_dir() -> Path:
    """The folder of dataset folders: ``KEEL_DATASETS_DIR`` if set, else ``datasets/``.

    dbt reads the same variable for its model paths, relative to the dbt project, so Keel
    reads it that way too. An absolute path is refused: dbt writes each model's compiled SQL
    to its target folder joined with the model's path, which for an absolute path is the
    model file itself. A folder outside the project wants ``DBT_TARGET_PATH`` outside too.
    """
    raw = os.environ.get(DATASETS_ENV, "").strip()
    if not raw:
        return PROJECT_ROOT / "datasets"
    if Path(raw).is_absolute():
        raise SettingsError(
            f"{DATASETS_ENV}={raw!r} must be relative to {DBT_PROJECT_DIR} (dbt reads it too); "
            f"e.g. {os.path.relpath(raw, DBT_PROJECT_DIR)}"
        )
    return (DBT_PROJECT_DIR / raw).resolve()


def dbt_target_path() -> str:
    """Where dbt parses into: ``DBT_TARGET_PATH`` if set (dbt reads it too), else ``target``."""
    return os.environ.get(DBT_TARGET_ENV, "").strip() or "target"


@dataclass(frozen=True)
class KeelPaths:
    """Every location inside the data folder, derived from its root."""

    home: Path

    @classmethod
    def current(cls) -> KeelPaths:
        return cls(keel_home())

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse.duckdb"

    @property
    def marts(self) -> Path:
        return self.home / "marts"

    @property
    def landing(self) -> Path:
        return self.home / "landing"

    @property
    def generated(self) -> Path:
        return self.home / "generated"

    @property
    def artefacts(self) -> Path:
        return self.home / "artefacts"

    @property
    def mlflow(self) -> Path:
        return self.home / "mlflow"

    @property
    def feast(self) -> Path:
        return self.home / "feast"

    @property
    def optuna(self) -> Path:
        return self.home / "optuna"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    def ensure(self) -> KeelPaths:
        for folder in (
            self.home,
            self.marts,
            self.landing,
            self.generated,
            self.artefacts,
            self.mlflow,
            self.feast,
            self.optuna,
            self.dagster_home,
        ):
            folder.mkdir(parents=True, exist_ok=True)
        return self
