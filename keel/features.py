"""The feature store stage as plain functions: open, apply, materialise, build training sets.

Feast is imported inside the functions that need it: loading Dagster definitions must stay fast.
The objects themselves live in ``feature_repo/definitions.py``; which stores back them is the
profile's ``feature_store.yaml`` (local: DuckDB, SQLite, file registry; team and production:
DuckDB over the marts, Redis, SQL registry on Postgres).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from keel import schema
from keel.files import atomic_write, replace_durably
from keel.settings import FEATURE_REPO_DIR, HOME_ENV, keel_home

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from feast import FeatureStore
    from feast.repo_config import RepoConfig
    from feast.repo_contents import RepoContents

PROFILE_CONFIG_FILES = {
    "local": "feature_store.yaml",
    "team": "feature_store.team.yaml",
    "production": "feature_store.production.yaml",
}

# The feature view that the daily online partitions write.
DAILY_FEATURE_VIEW = schema.FEATURE_VIEW

# Inputs of the on-demand ratios, each once, in the order the ratios name them.
RATIO_INPUTS = tuple(
    dict.fromkeys(name for r in schema.ON_DEMAND_RATIOS for name in (r.numerator, r.denominator))
)


def account_ratios(columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The on-demand features of ``schema.ON_DEMAND_VIEW``, computed from the daily features.

    Each is a ratio declared by the loop's dataset, its divisor floored (at 1) so that a new or
    unused entity gets a finite ratio rather than a division by zero. Works on anything with
    the input columns (a DataFrame, a dict of lists or arrays), so the feature view and the
    online fast path share one definition. Missing inputs give NaN.
    """
    inputs = {name: np.asarray(columns[name], dtype=np.float64) for name in RATIO_INPUTS}
    return {
        ratio.name: ratio.compute(inputs[ratio.numerator], inputs[ratio.denominator])
        for ratio in schema.ON_DEMAND_RATIOS
    }


class FeatureStoreError(RuntimeError):
    """The feature store cannot do what was asked; the message says why and what to do."""


_VARIABLE = re.compile(r"\$(\w+|\{[^}]*\})")
# Feast colours its diffs for terminals.
_ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")


def expand_variables(text: str, variables: Mapping[str, str]) -> str:
    """Expand ``$NAME`` and ``${NAME}`` like Feast (``os.path.expandvars``), from ``variables``.

    Unknown names stay as they are, as with Feast; the config check afterwards names them.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1).strip("{}")
        return variables.get(name, match.group(0))

    return _VARIABLE.sub(replace, text)


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` over ``base``, section by section; a section of another type replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if (
            isinstance(value, Mapping)
            and isinstance(current, dict)
            and value.get("type", current.get("type")) == current.get("type")
        ):
            merged[key] = _merge(current, value)
        else:
            merged[key] = dict(value) if isinstance(value, Mapping) else value
    return merged


def store_config(
    config_file: str | Path,
    repo_path: str | Path = FEATURE_REPO_DIR,
    variables: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RepoConfig:
    """Read a ``feature_store.yaml`` as Feast does, with Keel's defaults for its variables.

    Args:
        config_file: The profile's yaml (relative paths are inside ``repo_path``).
        repo_path: The Feast repo folder.
        variables: Values for ``${NAME}`` in the yaml; they win over the environment.
            ``KEEL_HOME`` defaults to Keel's data folder.
        overrides: Settings merged over the yaml (tests use it for a project name or a Redis
            online store).
    """
    import yaml
    from feast.repo_config import RepoConfig

    path = Path(repo_path) / config_file
    if not path.is_file():
        raise FeatureStoreError(f"Feast config {path} does not exist.")
    values = {HOME_ENV: str(keel_home()), **os.environ, **(variables or {})}
    raw = yaml.safe_load(expand_variables(path.read_text(), values))
    unresolved = sorted(set(_VARIABLE.findall(json.dumps(raw))))
    if unresolved:
        names = ", ".join(name.strip("{}") for name in unresolved)
        raise FeatureStoreError(f"{path} needs environment variable(s) {names}; set them.")
    config = RepoConfig(**_merge(raw, overrides or {}))
    config.repo_path = Path(repo_path)
    return config


def open_store(
    config_file: str | Path = PROFILE_CONFIG_FILES["local"],
    repo_path: str | Path = FEATURE_REPO_DIR,
    variables: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> FeatureStore:
    """A ``feast.FeatureStore`` for the Keel feature repo under the given profile config."""
    from feast import FeatureStore

    config = store_config(config_file, repo_path, variables, overrides)
    if config.registry.registry_type == "file":
        Path(config.registry.path).parent.mkdir(parents=True, exist_ok=True)
    return FeatureStore(repo_path=str(repo_path), config=config)


def repo_contents(project: str, repo_path: str | Path = FEATURE_REPO_DIR) -> RepoContents:
    """Every Feast object in the repo's Python files, collected as ``feast apply`` does.

    The files run afresh on every call, so their sources point at the current ``KEEL_HOME``.
    """
    import importlib.util

    from feast import Entity, FeatureService, FeatureView, OnDemandFeatureView
    from feast.data_source import DataSource
    from feast.feature_view import DUMMY_ENTITY
    from feast.project import Project
    from feast.repo_contents import RepoContents

    modules = []
    # Every Python file of the repo, as `feast apply` reads them.
    for path in sorted(Path(repo_path).glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"feature_repo.{path.stem}", path)
        if spec is None or spec.loader is None:
            raise FeatureStoreError(f"Cannot load the Feast definitions {path}.")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    contents = RepoContents(
        projects=[Project(name=project)],
        data_sources=[],
        feature_views=[],
        on_demand_feature_views=[],
        stream_feature_views=[],
        label_views=[],
        entities=[],
        feature_services=[],
        permissions=[],
    )

    def add(bucket: list, value: object) -> None:
        # Files may each declare the same entity; equal copies register once.
        equal = isinstance(value, Entity)
        if not any(value is seen or (equal and value == seen) for seen in bucket):
            bucket.append(value)

    for value in (getattr(module, name) for module in modules for name in dir(module)):
        if isinstance(value, DataSource):
            add(contents.data_sources, value)
        elif isinstance(value, FeatureView):
            add(contents.feature_views, value)
            if value.batch_source is not None:
                add(contents.data_sources, value.batch_source)
        elif isinstance(value, OnDemandFeatureView):
            add(contents.on_demand_feature_views, value)
        elif isinstance(value, Entity):
            add(contents.entities, value)
        elif isinstance(value, FeatureService):
            add(contents.feature_services, value)
    # Feast registers this placeholder for entity-less views; apply keeps it as the CLI does.
    contents.entities.append(DUMMY_ENTITY)
    return contents


@dataclass(frozen=True)
class ApplyResult:
    """What ``apply_repo`` registered, by kind, and Feast's description of the change."""

    applied: dict[str, list[str]]
    deleted: list[str]
    diff: str


def apply_repo(store: FeatureStore) -> ApplyResult:
    """Register the repo's objects like ``feast apply``: add, update, and delete the stale ones."""
    from feast.feature_view import DUMMY_ENTITY
    from feast.repo_operations import extract_objects_for_apply_delete

    contents = repo_contents(store.project, store.repo_path)
    registry_diff, _, _ = store.plan(contents)
    to_apply, to_delete, _, _ = extract_objects_for_apply_delete(
        store.project, store.registry, contents
    )
    store.apply(to_apply, objects_to_delete=to_delete, partial=False)
    applied = {
        "entities": sorted(e.name for e in contents.entities if e.name != DUMMY_ENTITY.name),
        "data_sources": sorted(s.name for s in contents.data_sources),
        "feature_views": sorted(v.name for v in contents.feature_views),
        "on_demand_feature_views": sorted(v.name for v in contents.on_demand_feature_views),
        "feature_services": sorted(s.name for s in contents.feature_services),
    }
    return ApplyResult(
        applied=applied,
        deleted=sorted(getattr(o, "name", str(o)) for o in to_delete),
        diff=_ANSI_STYLE.sub("", registry_diff.to_string()),
    )


def partition_window(day: date) -> tuple[datetime, datetime]:
    """Event times that belong to daily partition ``day``: after its start, up to its end.

    The mart stamps day D's activity at D+1 00:00 UTC, so that instant closes partition D.
    Feast's materialisation filter includes both ends, hence the start one microsecond in.
    """
    start = datetime.combine(day, time(), UTC)
    return start + timedelta(microseconds=1), start + timedelta(days=1)


@dataclass(frozen=True)
class MaterializeResult:
    """One partition written to the online store."""

    day: date
    start: datetime
    end: datetime
    feature_views: list[str]
    rows: dict[str, int | None]  # source rows in the window per view; None: not a file source


def _rows_in_window(
    store: FeatureStore, view_name: str, start: datetime, end: datetime
) -> int | None:
    import duckdb
    from feast.infra.offline_stores.file_source import FileSource

    view = store.get_feature_view(view_name)
    source = view.batch_source
    if not isinstance(source, FileSource):
        return None
    from keel.storage import duckdb_object_store, duckdb_parquet_source, is_local, location

    path = FileSource.get_uri_for_file_path(store.config.repo_path, source.path)
    if not location(path).exists():
        return 0
    connection = duckdb.connect()
    try:
        connection.execute("SET TimeZone = 'UTC'")
        if not is_local(path):
            duckdb_object_store(connection)
        path = duckdb_parquet_source(path)
        column = '"' + source.timestamp_field.replace('"', '""') + '"'
        (count,) = connection.execute(
            f"SELECT count(*) FROM read_parquet(?) WHERE CAST({column} AS TIMESTAMPTZ) "
            "BETWEEN ? AND ?",
            [path, start, end],
        ).fetchone()
    finally:
        connection.close()
    return int(count)


def materialize_day(
    store: FeatureStore, day: date, feature_views: list[str] | None = None
) -> MaterializeResult:
    """Write daily partition ``day`` of the feature views into the online store.

    Incremental (only that day's event times), idempotent and crash-safe: the online stores in
    ``keel.mirrors.feast_online_stores`` keep a value only while nothing newer arrives, so
    running a day again, after a crash or out of order, leaves the store as one clean run does.

    Raises:
        FeatureStoreError: A file-backed view has no rows in the day's window, which means the
            mart partition is missing; materialise it first.
    """
    views = feature_views or [DAILY_FEATURE_VIEW]
    start, end = partition_window(day)
    rows = {view: _rows_in_window(store, view, start, end) for view in views}
    empty = [view for view, count in rows.items() if count == 0]
    if empty:
        raise FeatureStoreError(
            f"No rows stamped in ({start - timedelta(microseconds=1)}, {end}] for "
            f"{', '.join(empty)}: the mart partition for {day} is missing or empty. "
            "Materialise the mart first."
        )
    store.materialize(start_date=start, end_date=end, feature_views=views)
    return MaterializeResult(day=day, start=start, end=end, feature_views=views, rows=rows)


def read_mart(path: str | Path, what: str) -> pa.Table:
    """One mart (a Parquet file or a folder of daily files, local or a URL) as one Arrow table."""
    import pyarrow.dataset as ds

    if "://" not in str(path) and not Path(path).exists():
        raise FeatureStoreError(f"The {what} mart {path} does not exist; build the marts first.")
    table = ds.dataset(str(path), format="parquet").to_table()
    if table.num_rows == 0:
        raise FeatureStoreError(f"The {what} mart {path} has no rows.")
    return table


def read_label_window(path: str | Path, lookback_days: int) -> pa.Table:
    """The labels whose event falls in the ``lookback_days`` days ending with the newest one.

    The newest event comes from the Parquet statistics and the window's start is pushed down
    to the reader, so older daily files are never read: memory grows with the lookback, not
    with the history.
    """
    from keel.windows import newest_timestamp, read_since, window_start

    if lookback_days < 1:
        raise FeatureStoreError(f"the label lookback must be at least 1 day, got {lookback_days}")
    if "://" not in str(path) and not Path(path).exists():
        raise FeatureStoreError(f"The labels mart {path} does not exist; build the marts first.")
    newest = newest_timestamp(path, schema.EVENT_TIMESTAMP)
    if newest is None:
        raise FeatureStoreError(f"The labels mart {path} has no rows.")
    return read_since(path, schema.EVENT_TIMESTAMP, window_start(newest, lookback_days))


def label_rows(labels: pa.Table, entity_key: str, label: str) -> pd.DataFrame:
    """Labels as Feast entity rows, in one canonical order (so equal data hashes equally)."""
    required = {entity_key, schema.EVENT_TIMESTAMP, label}
    missing = required - set(labels.column_names)
    if missing:
        raise FeatureStoreError(
            f"The labels lack column(s) {sorted(missing)}; they have {labels.column_names}."
        )
    import pandas as pd
    import pyarrow as pa

    ordered = labels.combine_chunks().sort_by(
        [(schema.EVENT_TIMESTAMP, "ascending"), (entity_key, "ascending")]
    )
    # Arrow-backed strings: a million labels convert in milliseconds, not seconds.
    strings = {pa.string(): pd.StringDtype("pyarrow"), pa.large_string(): pd.StringDtype("pyarrow")}
    return ordered.to_pandas(types_mapper=strings.get)


@dataclass(frozen=True)
class TrainingSet:
    """A point-in-time training set written as Parquet, named by its content hash."""

    path: Path
    dataset_version: str  # sha256 of the Parquet file
    feature_service: str
    features: list[str]
    rows: int
    label_rate: float
    start: datetime
    end: datetime


def write_versioned_parquet(table: pa.Table, directory: Path) -> tuple[Path, str]:
    """Write ``table`` as ``<sha256>.parquet`` in ``directory``, atomically; return path, hash."""
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    scratch = directory / f".{uuid.uuid4().hex}.parquet.tmp"
    try:
        pq.write_table(table, scratch, compression="zstd")
        digest = hashlib.sha256()
        with scratch.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        version = digest.hexdigest()
        target = replace_durably(scratch, directory / f"{version}.parquet")
    finally:
        scratch.unlink(missing_ok=True)
    return target, version


def build_training_set(
    store: FeatureStore,
    labels: pa.Table,
    directory: Path,
    feature_service: str = schema.FEATURE_SERVICE,
    entity_key: str = schema.ENTITY_KEY,
    label: str = schema.LABEL,
) -> TrainingSet:
    """Join every label row to the feature service as of its event time, write it as Parquet.

    The labels are the entity rows of ``get_historical_features``: each row keeps its own
    columns (label, label time, protected attributes) and gains the features as they were at
    its ``event_timestamp``, never later. ``directory/latest.json`` names the newest set.
    """
    service = store.get_feature_service(feature_service)
    entity_rows = label_rows(labels, entity_key, label)
    job = store.get_historical_features(entity_df=entity_rows, features=service)
    table = job.to_arrow()
    path, version = write_versioned_parquet(table, directory)
    timestamps = entity_rows[schema.EVENT_TIMESTAMP]
    feature_names = [name for name in table.column_names if name not in entity_rows.columns]
    result = TrainingSet(
        path=path,
        dataset_version=version,
        feature_service=feature_service,
        features=feature_names,
        rows=table.num_rows,
        label_rate=float(entity_rows[label].mean()),
        start=timestamps.min().to_pydatetime(),
        end=timestamps.max().to_pydatetime(),
    )
    pointer = {
        "path": str(path),
        "dataset_version": version,
        "feature_service": feature_service,
        "rows": result.rows,
    }
    atomic_write(directory / "latest.json", json.dumps(pointer, indent=2) + "\n")
    return result
