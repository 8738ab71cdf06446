"""Resource sets keyed by deployment profile; ``KEEL_PROFILE`` picks one."""

from __future__ import annotations

from typing import Any

import dagster as dg

from keel.settings import KeelPaths, active_profile, taiwan_csv
from orchestration.resources import ArtefactStore, SourcesResource, WarehouseResource


def dbt_resource():
    """The dbt CLI resource (imported lazily: dagster-dbt is part of the transformation stage)."""
    from assets.transformation import dbt_resource as build

    return build()


def local_resources(paths: KeelPaths) -> dict[str, Any]:
    """Embedded profile: everything in one data folder, nothing to start by hand."""
    return {
        # DuckDB file holding raw, quarantine and dbt tables; marts also land as Parquet.
        "warehouse": WarehouseResource(database=str(paths.warehouse), marts_dir=str(paths.marts)),
        # The generator's extracts, the landing folder, the Taiwan CSV, the bad-row limit.
        "sources": SourcesResource(
            generated_dir=str(paths.generated),
            landing_dir=str(paths.landing),
            taiwan_csv=str(taiwan_csv()),
        ),
        # dbt CLI on dbt_project/ (profiles.yml there points at the warehouse).
        "dbt": dbt_resource(),
        # Models, reports and training sets as files.
        "artefacts": ArtefactStore(root=str(paths.artefacts)),
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
            taiwan_csv=dg.EnvVar("KEEL_TAIWAN_CSV"),
        ),
        "dbt": dbt_resource(),
        # Object store URL such as s3://bucket/keel.
        "artefacts": ArtefactStore(root=dg.EnvVar("KEEL_ARTEFACT_ROOT")),
    }


def resources_for(profile: str | None = None) -> dict[str, Any]:
    """The resource set of ``profile`` (default: the active one)."""
    profile = profile or active_profile()
    if profile == "production":
        return production_resources()
    return local_resources(KeelPaths.current())
