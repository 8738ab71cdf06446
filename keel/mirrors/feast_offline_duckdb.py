"""A Feast offline store that compiles point-in-time retrieval into DuckDB ASOF joins.

Feast's DuckDB store joins every entity row to every older feature row of its entity and then
ranks them: the work grows with the history kept per entity. ``ASOF JOIN`` finds the newest
feature row at or before each entity row in one sorted pass. Feast's rules stay as they are:

- the newest ``event_timestamp`` at or before the entity row wins, and among rows with the same
  event time the newest ``created_timestamp`` (a missing one counts as oldest);
- a row older than the feature view's TTL yields nulls, as if there were none;
- on-demand feature views run the registered transformation on the joined values.

``filter_by_created_timestamp`` is honoured too (with a ranked inequality join). Users keep
calling ``store.get_historical_features(...)``. Sources other than Parquet files and substrait
transformations go to Feast's own DuckDB store, whose ibis query cannot compile a TTL with the
pinned ibis 12 and sqlglot 30. Select this store in ``feature_store.yaml``::

    offline_store:
      type: keel.mirrors.feast_offline_duckdb.KeelDuckDBOfflineStore

Mirrors: feast==0.67.0 (feast/infra/offline_stores/duckdb.py and offline_utils.py)
Parity test: test_features.py::test_asof_store_returns_the_same_rows_as_feasts_duckdb_store
Parity test: test_features.py::test_asof_store_keeps_feasts_ttl_and_tie_break_rules
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
from feast.data_format import ParquetFormat
from feast.feature_view import FeatureView
from feast.infra.offline_stores.duckdb import (
    DuckDBOfflineStore,
    DuckDBOfflineStoreConfig,
    _write_data_source,
)
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.offline_stores.offline_utils import infer_event_timestamp_from_entity_df
from feast.infra.registry.base_registry import BaseRegistry
from feast.on_demand_feature_view import OnDemandFeatureView
from feast.repo_config import RepoConfig
from feast.saved_dataset import SavedDatasetStorage
from pydantic import StrictStr

_ENTITY_TABLE = "__keel_entity_df"
# (event time, created time) packed into one HUGEINT that sorts like the pair:
# event_us * 2^64 + (created_us + 2^63), so one ASOF inequality applies both tie-break rules.
_HIGH = "18446744073709551616"
_BIAS = "9223372036854775808"
_ENTITY_LOW = "18446744073709551615"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class KeelDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    """Feast's DuckDB offline store settings, plus limits for the ASOF plan's DuckDB session."""

    type: StrictStr = "keel.mirrors.feast_offline_duckdb.KeelDuckDBOfflineStore"
    threads: int | None = None
    """DuckDB worker threads for retrieval (default: one per core)."""
    memory_limit: StrictStr | None = None
    """DuckDB memory limit such as ``8GB``; beyond it DuckDB spills to disk."""


@dataclass(frozen=True)
class _ViewPlan:
    """What the SQL needs to know about one feature view."""

    alias: str
    path: str
    join_keys: dict[str, str]  # feature table column -> entity column
    timestamp: str
    created: str | None
    ttl: timedelta | None
    columns: dict[str, str]  # output column -> source column


def _source_path(config: RepoConfig, source: FileSource) -> str:
    from keel.storage import duckdb_parquet_source

    return duckdb_parquet_source(FileSource.get_uri_for_file_path(config.repo_path, source.path))


def _can_plan(view: FeatureView) -> bool:
    source = view.batch_source
    return (
        type(source) is FileSource
        and isinstance(source.file_format, ParquetFormat | None)
        and not source.file_options.s3_endpoint_override
    )


def _view_plan(
    index: int, view: FeatureView, feature_refs: list[str], full_feature_names: bool, path: str
) -> _ViewPlan:
    source = view.batch_source
    prefix = view.projection.name_to_use()
    features = [ref.split(":", 1)[1] for ref in feature_refs if ref.startswith(f"{prefix}:")]
    output_prefix = view.projection.name_alias or view.name
    to_source = {feature: name for name, feature in source.field_mapping.items()}
    columns = {
        (f"{output_prefix}__{feature}" if full_feature_names else feature): to_source.get(
            feature, feature
        )
        for feature in features
    }
    join_keys = view.projection.join_key_map or {e.name: e.name for e in view.entity_columns}
    return _ViewPlan(
        alias=f"fv{index}",
        path=path,
        join_keys={to_source.get(column, column): entity for column, entity in join_keys.items()},
        timestamp=source.timestamp_field,
        created=source.created_timestamp_column or None,
        ttl=view.ttl or None,
        columns=columns,
    )


def point_in_time_sql(
    plans: list[_ViewPlan],
    event_timestamp: str,
    filter_by_created_timestamp: bool = False,
    entity_range: tuple[datetime, datetime] | None = None,
) -> str:
    """The feature columns of every entity row, with its ``__keel_row``, as one statement.

    Each view joins with ``ASOF LEFT JOIN`` on the packed (event, created) order. With
    ``filter_by_created_timestamp`` a row also needs a created time at or before the entity
    row, a second inequality ASOF cannot take, so that view ranks an inequality join instead.
    Only join keys and times go through the joins; the entity's other columns stay in Arrow.
    ``entity_range`` (earliest, latest entity time) skips feature rows no entity row can use.
    """
    entity_ts = f"CAST({_quote(event_timestamp)} AS TIMESTAMPTZ)"
    keys = sorted({entity for plan in plans for entity in plan.join_keys.values()})
    ctes = [
        f"__entity AS (SELECT __keel_row, {', '.join(map(_quote, keys))}, "
        f"{entity_ts} AS __entity_ts, epoch_us({entity_ts}) AS __entity_us, "
        f"epoch_us({entity_ts})::HUGEINT * {_HIGH} + {_ENTITY_LOW} AS __entity_order "
        f"FROM {_ENTITY_TABLE})"
    ]
    joins, selected = [], ["__entity.__keel_row"]
    for plan in plans:
        ctes.append(_view_cte(plan, entity_range))
        keys = [
            f"__entity.{_quote(entity)} = {plan.alias}.{_quote(f'__key_{i}')}"
            for i, entity in enumerate(plan.join_keys.values())
        ]
        fresh = ""
        if plan.ttl:
            # The event time is the order's high 64 bits: no timestamp column to carry along.
            micros = plan.ttl // timedelta(microseconds=1)
            fresh = f"({plan.alias}.__order >> 64) + {micros} >= __entity.__entity_us"
        if filter_by_created_timestamp and plan.created:
            conditions = [
                *keys,
                f"{plan.alias}.__ts <= __entity_ts",
                f"{plan.alias}.__created_ts <= __entity_ts",
                *([fresh] if fresh else []),
            ]
            ctes.append(
                f"{plan.alias}_match AS (SELECT __entity.__keel_row, {plan.alias}.* "
                f"FROM __entity JOIN {plan.alias} ON {' AND '.join(conditions)} "
                f"QUALIFY row_number() OVER (PARTITION BY __entity.__keel_row "
                f"ORDER BY {plan.alias}.__order DESC) = 1)"
            )
            joins.append(f"LEFT JOIN {plan.alias}_match USING (__keel_row)")
            selected += [
                f"{plan.alias}_match.{_quote(out)} AS {_quote(out)}" for out in plan.columns
            ]
            continue
        keys.append(f"__entity.__entity_order >= {plan.alias}.__order")
        joins.append(f"ASOF LEFT JOIN {plan.alias} ON {' AND '.join(keys)}")
        for out in plan.columns:
            value = f"{plan.alias}.{_quote(out)}"
            # The ASOF match is the newest row at or before; if even that one is older than
            # the TTL, no row inside the TTL exists and Feast returns nulls.
            if fresh:
                value = f"CASE WHEN {fresh} THEN {value} END"
            selected.append(f"{value} AS {_quote(out)}")
    return f"WITH {', '.join(ctes)} SELECT {', '.join(selected)} FROM __entity {' '.join(joins)}"


def _view_cte(plan: _ViewPlan, entity_range: tuple[datetime, datetime] | None) -> str:
    """One feature view's rows: join keys, features, event time and the packed order."""
    event = f"CAST({_quote(plan.timestamp)} AS TIMESTAMPTZ)"
    created = f"CAST({_quote(plan.created)} AS TIMESTAMPTZ)" if plan.created else "NULL"
    fields = [f"{_quote(source)} AS __key_{i}" for i, source in enumerate(plan.join_keys)]
    fields += [f"{_quote(source)} AS {_quote(out)}" for out, source in plan.columns.items()]
    # A missing created time sorts below every real one, as in Feast's dedup.
    order = (
        f"epoch_us({event})::HUGEINT * {_HIGH} + "
        f"(coalesce(epoch_us({created}), -{_BIAS}) + {_BIAS})"
    )
    # Rows after the last entity row never match; rows older than the first one minus the TTL
    # only match to be nulled, which no match does too.
    where = []
    if entity_range:
        earliest, latest = entity_range
        where.append(f"{event} <= TIMESTAMPTZ {_literal(latest.isoformat())}")
        if plan.ttl:
            oldest = (earliest - plan.ttl).isoformat()
            where.append(f"{event} >= TIMESTAMPTZ {_literal(oldest)}")
    return (
        f"{plan.alias} AS (SELECT {', '.join(fields)}, {event} AS __ts, "
        f"{created} AS __created_ts, {order} AS __order "
        f"FROM read_parquet({_literal(plan.path)})"
        f"{' WHERE ' + ' AND '.join(where) if where else ''})"
    )


class AsofRetrievalJob(RetrievalJob):
    """Runs the ASOF statement in DuckDB, then the on-demand transformations on its result."""

    def __init__(
        self,
        sql: str,
        entity_df: pd.DataFrame,
        on_demand_views: list[OnDemandFeatureView],
        full_feature_names: bool,
        metadata: RetrievalMetadata,
        config: RepoConfig,
        object_store: bool = False,
    ) -> None:
        super().__init__()
        self._sql = sql
        self._object_store = object_store
        self._entity_df = entity_df
        self._on_demand_views = on_demand_views
        self._full_feature_names = full_feature_names
        self._metadata = metadata
        self._config = config

    @property
    def full_feature_names(self) -> bool:
        return self._full_feature_names

    @property
    def on_demand_feature_views(self) -> list[OnDemandFeatureView]:
        # Applied inside _to_arrow_internal on just their inputs, not by Feast on the full table.
        return []

    @property
    def metadata(self) -> RetrievalMetadata:
        return self._metadata

    def to_sql(self) -> str:
        return self._sql

    def _connect(self) -> duckdb.DuckDBPyConnection:
        connection = duckdb.connect()
        # Naive timestamps mean UTC, in the entity frame and in the sources, as in Feast.
        connection.execute("SET TimeZone = 'UTC'")
        offline = self._config.offline_store
        if getattr(offline, "threads", None):
            connection.execute(f"SET threads = {int(offline.threads)}")
        if getattr(offline, "memory_limit", None):
            connection.execute(f"SET memory_limit = {_literal(offline.memory_limit)}")
        if self._object_store:
            # Sources on s3://: httpfs from its wheel, credentials from the AWS variables.
            from keel.storage import duckdb_object_store

            duckdb_object_store(connection)
        return connection

    def _to_arrow_internal(self, timeout: int | None = None) -> pa.Table:
        entity = pa.Table.from_pandas(self._entity_df, preserve_index=False)
        entity = entity.append_column("__keel_row", pa.array(np.arange(entity.num_rows)))
        connection = self._connect()
        try:
            connection.register(_ENTITY_TABLE, entity)
            features = connection.sql(self._sql).to_arrow_table()
        finally:
            connection.close()
        # Back into entity order: __keel_row is a permutation, so inverting it is one pass
        # (cheaper than an ORDER BY over every column).
        rows = features.column("__keel_row").to_numpy()
        inverse = np.empty_like(rows)
        inverse[rows] = np.arange(len(rows))
        features = features.take(inverse).drop_columns(["__keel_row"])
        table = entity.drop_columns(["__keel_row"])
        for name, column in zip(features.column_names, features.columns, strict=True):
            table = table.append_column(name, column)
        for view in self._on_demand_views:
            table = self._append_on_demand(table, view)
        return table

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        return self._to_arrow_internal(timeout).to_pandas()

    def _append_on_demand(self, table: pa.Table, view: OnDemandFeatureView) -> pa.Table:
        inputs = []
        for projection in view.source_feature_view_projections.values():
            for feature in projection.features:
                inputs += [feature.name, f"{projection.name}__{feature.name}"]
        for request in view.source_request_sources.values():
            inputs += [field.name for field in request.schema]
        slim = table.select([name for name in dict.fromkeys(inputs) if name in table.column_names])
        transformed = view.transform_arrow(slim, self._full_feature_names)
        name = view.projection.name_to_use()
        wanted = {
            f"{name}__{ref.split(':', 1)[1]}" if self._full_feature_names else ref.split(":", 1)[1]
            for ref in self._metadata.features
            if ref.split(":", 1)[0] in (view.name, name)
        }
        for column in transformed.column_names:
            if column in wanted:
                table = table.append_column(column, transformed[column])
        return table

    def persist(
        self,
        storage: SavedDatasetStorage,
        allow_overwrite: bool = False,
        timeout: int | None = None,
    ) -> None:
        import ibis

        _write_data_source(
            ibis.memtable(self.to_arrow()),
            storage.to_data_source(),
            str(self._config.repo_path),
            "overwrite",
            allow_overwrite,
        )


def _readable(source: Any) -> Any:
    """``source`` as Feast's own DuckDB reader (ibis) can read it.

    A Parquet folder on an object store becomes a glob, and ibis's DuckDB session gets httpfs
    from its package (ibis would download it) and the store's credentials.
    """
    if type(source) is not FileSource or "://" not in source.path:
        return source
    import copy

    import ibis

    from keel.storage import duckdb_object_store, duckdb_parquet_source

    duckdb_object_store(ibis.get_backend().con)
    readable = copy.deepcopy(source)
    readable.file_options.uri = duckdb_parquet_source(source.path)
    return readable


class KeelDuckDBOfflineStore(DuckDBOfflineStore):
    """Feast's DuckDB offline store with point-in-time retrieval compiled to ASOF joins.

    Materialisation reads through Feast's own store, with sources on ``s3://`` made readable.
    """

    @staticmethod
    def pull_latest_from_table_or_query(
        config: RepoConfig, data_source: Any, *args: Any, **kwargs: Any
    ) -> RetrievalJob:
        return DuckDBOfflineStore.pull_latest_from_table_or_query(
            config, _readable(data_source), *args, **kwargs
        )

    @staticmethod
    def pull_all_from_table_or_query(
        config: RepoConfig, data_source: Any, *args: Any, **kwargs: Any
    ) -> RetrievalJob:
        return DuckDBOfflineStore.pull_all_from_table_or_query(
            config, _readable(data_source), *args, **kwargs
        )

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: list[FeatureView],
        feature_refs: list[str],
        entity_df: pd.DataFrame | str | None,
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
        **kwargs: Any,
    ) -> RetrievalJob:
        if not isinstance(entity_df, pd.DataFrame):
            raise ValueError(
                "KeelDuckDBOfflineStore needs entity_df as a pandas DataFrame with an "
                f"event timestamp column; got {type(entity_df).__name__}."
            )
        on_demand = OnDemandFeatureView.get_requested_odfvs(feature_refs, project, registry)
        if not all(_can_plan(view) for view in feature_views) or any(
            view.mode not in ("pandas", "python") for view in on_demand
        ):
            return DuckDBOfflineStore.get_historical_features(
                config,
                feature_views,
                feature_refs,
                entity_df,
                registry,
                project,
                full_feature_names,
                filter_by_created_timestamp,
            )
        event_timestamp = infer_event_timestamp_from_entity_df(dict(entity_df.dtypes))
        plans = [
            _view_plan(
                i, view, feature_refs, full_feature_names, _source_path(config, view.batch_source)
            )
            for i, view in enumerate(feature_views)
        ]
        for plan in plans:
            missing = set(plan.join_keys.values()) - set(entity_df.columns)
            if missing:
                raise ValueError(
                    f"entity_df lacks join key column(s) {sorted(missing)} that feature view "
                    f"{plan.alias} needs; it has {list(entity_df.columns)}."
                )
        timestamps = pd.to_datetime(entity_df[event_timestamp], utc=True, cache=False)
        metadata = RetrievalMetadata(
            features=feature_refs,
            keys=[column for column in entity_df.columns if column != event_timestamp],
            min_event_timestamp=timestamps.min().to_pydatetime(),
            max_event_timestamp=timestamps.max().to_pydatetime(),
        )
        return AsofRetrievalJob(
            sql=point_in_time_sql(
                plans,
                event_timestamp,
                filter_by_created_timestamp,
                (
                    timestamps.min().floor("us").to_pydatetime(),
                    timestamps.max().ceil("us").to_pydatetime(),
                )
                if timestamps.notna().any()
                else None,
            ),
            entity_df=entity_df,
            on_demand_views=on_demand,
            full_feature_names=full_feature_names,
            metadata=metadata,
            config=config,
            object_store=any("://" in plan.path for plan in plans),
        )
