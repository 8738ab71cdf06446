"""Whether the production profile's settings describe one deployment whose parts agree.

Every ``dg.EnvVar`` in ``production_resources()`` and every ``env:`` of the production Dagster
instance (``orchestration/instance/production.yaml``) must be set, and the parts that exchange
files or tables must point at the same places:

- the marts dbt's export writes are the marts Feast's offline store reads;
- the lake's data, the marts, the landing files, the artefacts and MLflow's artefacts are on
  one store (one bucket, or one folder every machine mounts: an absolute path);
- the lake's catalog, Feast's registry and the audit log are Postgres databases and MLflow is
  a server, so that every machine sees the same state.

``keel profile check`` prints the problems; a run of the production profile would otherwise
meet them one step at a time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import dagster as dg
import yaml

from keel.settings import DAGSTER_CONFIG_DIR, FEATURE_REPO_DIR

# The resource fields that hold a location on the shared store.
SHARED_LOCATIONS = (
    ("warehouse", "data_path"),
    ("warehouse", "marts_dir"),
    ("sources", "landing_dir"),
    ("artefacts", "root"),
    ("mlflow", "artifact_location"),
)
OFFLINE_STORE = "keel.mirrors.feast_offline_duckdb.KeelDuckDBOfflineStore"
POSTGRES_SCHEMES = ("postgresql://", "postgresql+psycopg://", "postgresql+psycopg2://")


def environment_variables(resources: Mapping[str, Any]) -> dict[str, str]:
    """Every environment variable the resources read, with the field that reads it."""
    found: dict[str, str] = {}
    for name, resource in resources.items():
        for field, value in dict(resource).items():
            values = value.items() if isinstance(value, dict) else [(None, value)]
            for key, item in values:
                if isinstance(item, dg.EnvVar):
                    found.setdefault(
                        item.env_var_name, f"{name}.{field}" + (f"[{key}]" if key else "")
                    )
    return found


def instance_variables(path=DAGSTER_CONFIG_DIR / "production.yaml") -> dict[str, str]:
    """Every ``{env: NAME}`` of a Dagster instance file, with where the file uses it."""
    found: dict[str, str] = {}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if set(node) == {"env"}:
                found.setdefault(str(node["env"]), f"instance {where}")
                return
            for key, value in node.items():
                walk(value, f"{where}.{key}" if where else str(key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}[{index}]")

    walk(yaml.safe_load(path.read_text()), "")
    return found


def _value(resource: Any, field: str, environ: Mapping[str, str]) -> str:
    value = getattr(resource, field)
    if isinstance(value, dg.EnvVar):
        return environ.get(value.env_var_name, "").strip()
    return str(value)


def check_production(
    resources: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> list[str]:
    """The problems of the production profile's settings; empty when it is consistent.

    Args:
        resources: The resource set to check (default ``production_resources()``).
        environ: The environment its variables come from (default ``os.environ``).
    """
    from keel.storage import store_of
    from orchestration.profiles import production_resources

    resources = production_resources() if resources is None else resources
    environ = os.environ if environ is None else environ
    problems = [
        f"{name} is not set (it configures {where})"
        for name, where in sorted(
            {**instance_variables(), **environment_variables(resources)}.items()
        )
        if not environ.get(name, "").strip()
    ]

    warehouse, feature_store = resources["warehouse"], resources["feature_store"]
    if not _value(warehouse, "catalog", environ) and not problems:
        problems.append("the warehouse is not the lake: production needs a DuckLake catalog")
    marts = _value(warehouse, "marts_dir", environ).rstrip("/")
    read = _value(feature_store, "marts", environ).rstrip("/")
    if marts and read and marts != read:
        problems.append(
            f"dbt's export writes the marts to {marts} but Feast reads them from {read}"
        )
    config = yaml.safe_load((FEATURE_REPO_DIR / feature_store.config_file).read_text())
    offline = (config.get("offline_store") or {}).get("type")
    if offline != OFFLINE_STORE:
        problems.append(
            f"{feature_store.config_file}: the offline store is {offline!r}, which does not read "
            f"the Parquet marts; use {OFFLINE_STORE}"
        )

    stores: dict[str, list[str]] = {}
    for resource, field in SHARED_LOCATIONS:
        value = _value(resources[resource], field, environ)
        if not value:
            continue
        where = f"{resource}.{field}={value}"
        store = store_of(value)
        if store == "local" and not PurePosixPath(value).is_absolute():
            problems.append(f"{where} is a relative path: other machines cannot find it")
        stores.setdefault(store, []).append(where)
    if len(stores) > 1:
        listed = "; ".join(f"{store}: {', '.join(parts)}" for store, parts in stores.items())
        problems.append(f"the shared locations are on different stores ({listed})")

    generated = _value(resources["sources"], "generated_dir", environ)
    if generated and store_of(generated) != "local":
        problems.append(
            f"sources.generated_dir={generated}: the generator writes its extracts to a folder "
            "of the machine that runs ingestion"
        )

    for label, value in (
        ("warehouse.catalog", _value(warehouse, "catalog", environ)),
        (
            "feature_store.variables[KEEL_FEAST_REGISTRY_URL]",
            environ.get("KEEL_FEAST_REGISTRY_URL", "")
            if "KEEL_FEAST_REGISTRY_URL" in (feature_store.variables or {})
            else "",
        ),
        ("governance.audit_uri", _value(resources["governance"], "audit_uri", environ)),
    ):
        if value and not _is_postgres(value):
            problems.append(f"{label}={value} is not a Postgres database every machine reaches")
    tracking = _value(resources["mlflow"], "tracking_uri", environ)
    if tracking and not tracking.startswith(("http://", "https://", *POSTGRES_SCHEMES)):
        problems.append(
            f"mlflow.tracking_uri={tracking} is not an MLflow server or a Postgres database"
        )
    return problems


def _is_postgres(value: str) -> bool:
    # A libpq keyword string (``dbname=keel host=db``), as DuckLake's catalog takes it, or a URL.
    return value.startswith(POSTGRES_SCHEMES) or "dbname=" in value


class ProfileError(RuntimeError):
    """The production profile's settings are incomplete or disagree."""


def require_production(
    resources: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> None:
    """Raise ``ProfileError`` listing every problem ``check_production`` finds."""
    problems = check_production(resources, environ)
    if problems:
        raise ProfileError(
            "the production profile cannot run:\n" + "\n".join(f"- {p}" for p in problems)
        )
