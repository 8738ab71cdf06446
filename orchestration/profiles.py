"""Resource sets keyed by deployment profile; ``KEEL_PROFILE`` picks one."""

from __future__ import annotations

from typing import Any

import dagster as dg

from keel.settings import KeelPaths, active_profile
from orchestration.resources import ArtefactStore, WarehouseResource


def local_resources(paths: KeelPaths) -> dict[str, Any]:
    """Embedded profile: everything in one data folder, nothing to start by hand."""
    return {
        # DuckDB file holding raw, quarantine and dbt tables.
        "warehouse": WarehouseResource(database=str(paths.warehouse)),
        # Models, reports and training sets as files.
        "artefacts": ArtefactStore(root=str(paths.artefacts)),
    }


def production_resources() -> dict[str, Any]:
    """Production profile: hosted warehouse and object storage, secrets from the environment."""
    return {
        # MotherDuck database (md:NAME), token in MOTHERDUCK_TOKEN.
        "warehouse": WarehouseResource(database=dg.EnvVar("KEEL_WAREHOUSE")),
        # Object store URL such as s3://bucket/keel.
        "artefacts": ArtefactStore(root=dg.EnvVar("KEEL_ARTEFACT_ROOT")),
    }


def resources_for(profile: str | None = None) -> dict[str, Any]:
    """The resource set of ``profile`` (default: the active one)."""
    profile = profile or active_profile()
    if profile == "production":
        return production_resources()
    return local_resources(KeelPaths.current())
