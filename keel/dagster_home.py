"""DAGSTER_HOME of a profile: its instance file, and for the team its database and pools.

Every entry point (`keel`, `keel team`, `keel scenario`) points its process at the instance
here before Dagster reads it, so this module sets the environment as entry points do.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from keel.settings import DAGSTER_CONFIG_DIR, KeelPaths


def prepare_dagster_home(paths: KeelPaths, profile: str) -> Path:
    """Write the profile's ``dagster.yaml`` into DAGSTER_HOME and point the environment at it.

    The team instance also gets its database and its pool limits (orchestration.pools).
    """
    paths.ensure()
    target = paths.dagster_home / "dagster.yaml"
    source = DAGSTER_CONFIG_DIR / f"{profile}.yaml"
    if not target.exists() or target.read_bytes() != source.read_bytes():
        shutil.copyfile(source, target)
    os.environ.setdefault("DAGSTER_HOME", str(paths.dagster_home))
    if profile == "team":
        from keel.team import services

        # The instance file and the MLflow resource read the environment; default to this
        # machine's services, as `keel team up` starts them.
        for name, value in services.environment_defaults(paths).items():
            os.environ.setdefault(name, value)
        _set_team_pool_limits(paths)
    return paths.dagster_home


def _set_team_pool_limits(paths: KeelPaths) -> None:
    import dagster as dg

    from keel.team import services
    from orchestration.pools import set_pool_limits

    # Pool limits live in the instance's storage, so the database must exist first.
    services.ensure_database(os.environ[services.PG_URL_ENV])
    with dg.DagsterInstance.from_config(str(paths.dagster_home)) as instance:
        set_pool_limits(instance, "team")
