"""Dagster resources: the one place where deployment profiles swap implementations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:
    import duckdb
    from upath import UPath


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB warehouse: a file locally, a MotherDuck database (``md:...``) in production."""

    database: str

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        import duckdb

        if not self.database.startswith("md:"):
            Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        connection = duckdb.connect(self.database, read_only=read_only)
        try:
            yield connection
        finally:
            connection.close()


class ArtefactStore(dg.ConfigurableResource):
    """Where files that are not tables go: a local folder, or s3:// gs:// abfs:// in production."""

    root: str

    def path(self, *parts: str) -> UPath:
        from upath import UPath

        target = UPath(self.root).joinpath(*parts)
        if target.protocol in ("", "file", "local"):
            Path(target.path).parent.mkdir(parents=True, exist_ok=True)
        return target


class FeatureStoreResource(dg.ConfigurableResource):
    """The Feast repo in ``feature_repo/`` with the profile's ``feature_store.yaml``."""

    repo_path: str
    config_file: str

    def store(self):  # -> feast.FeatureStore (imported lazily: feast costs seconds)
        from feast import FeatureStore
        from feast.repo_config import load_repo_config

        config = load_repo_config(Path(self.repo_path), Path(self.config_file))
        return FeatureStore(repo_path=self.repo_path, config=config)


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking and model registry; registry writes take ``lock_file`` when it is set."""

    tracking_uri: str
    registry_uri: str
    artifact_location: str
    lock_file: str = ""


class ComputeResource(dg.ConfigurableResource):
    """Which device PyTorch trains on: ``auto`` takes CUDA when torch sees one, else the CPU."""

    device: str = "auto"
