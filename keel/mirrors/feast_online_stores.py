"""Feast online stores whose writes keep only the newest version of every value.

Feast's SQLite store overwrites unconditionally, so re-materialising an old day or a late
batch rolls values back; its Redis store skips equal or older event times, so a corrected
re-run of a day (same event time, later created time) never lands. Both stores here apply one
rule, the one offline retrieval uses to break ties: a row replaces the stored one only when its
``(event_timestamp, created_timestamp)`` is strictly newer. Writing the same rows twice, or
again after a crash, leaves the store byte for byte as one clean run does.

The layout stays Feast's own, so ``get_online_features`` reads these stores unchanged; the
SQLite store adds a row per entity for ``keel.mirrors.feast_online_reader``'s fast reads. Select
them in ``feature_store.yaml`` by class path::

    online_store:
      type: keel.mirrors.feast_online_stores.KeelSqliteOnlineStore

Mirrors: feast==0.67.0 (feast/infra/online_stores/sqlite.py and redis.py)
Parity test: test_features.py::test_a_store_feasts_own_sqlite_store_wrote_is_taken_over_exactly
Parity test: test_features.py::test_online_values_equal_historical_values_for_1000_entities
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from feast import Entity
from feast.feature_view import FeatureView
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3, _redis_key, extract_text_and_num
from feast.infra.online_stores.redis import (
    RedisOnlineStore,
    RedisOnlineStoreConfig,
    _versioned_fv_name,
)
from feast.infra.online_stores.sqlite import (
    SqliteOnlineStore,
    SqliteOnlineStoreConfig,
    _alter_table_add_column_if_missing,
    _quote_id,
    _table_id,
)
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig
from feast.type_map import feast_value_type_to_python_type
from feast.utils import make_tzaware, to_naive_utc
from google.protobuf.timestamp_pb2 import Timestamp

Row = tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# A missing created timestamp sorts below every real one, as in Feast's offline dedup.
_NO_TIME = -(2**63)


def epoch_us(moment: datetime | None) -> int:
    """Exact microseconds since 1970 (naive datetimes are UTC); ``None`` sorts first."""
    if moment is None:
        return _NO_TIME
    return (make_tzaware(moment) - _EPOCH) // _MICROSECOND


def write_order(event_ts: datetime, created_ts: datetime | None) -> str:
    """A fixed-width string that sorts like ``(event_ts, created_ts)``."""
    return f"{epoch_us(event_ts) - _NO_TIME:020d}{epoch_us(created_ts) - _NO_TIME:020d}"


def entity_table(table_id: str) -> str:
    """The table that holds one row per entity next to Feast's row per feature."""
    return f"{table_id}__entities"


def entity_json(values: dict[str, ValueProto]) -> str | None:
    """An entity's values as ``get_online_features(...).to_dict()`` gives them, as JSON.

    ``None`` where a value has no JSON form (bytes, timestamps): readers then use Feast's rows.
    """
    try:
        return json.dumps(
            {name: feast_value_type_to_python_type(value) for name, value in values.items()},
            separators=(",", ":"),
        )
    except TypeError:
        return None


def newest_wins_upserts(table_id: str, rows: int = 1) -> tuple[str, str]:
    """The store's two upserts: feature rows, then entity rows, each only when newer.

    Each statement takes ``rows`` rows (in order, as that many one-row statements would).
    Rows written before event_us existed compare by Feast's whole-second event_ts.
    """
    feature_upsert = (
        f"INSERT INTO {_quote_id(table_id)} (entity_key, feature_name, value, value_text, "
        "event_ts, created_ts, event_us, created_us) VALUES "
        f"{', '.join(['(?, ?, ?, ?, ?, ?, ?, ?)'] * rows)} "
        "ON CONFLICT(entity_key, feature_name) DO UPDATE SET value = excluded.value, "
        "value_text = excluded.value_text, event_ts = excluded.event_ts, "
        "created_ts = excluded.created_ts, event_us = excluded.event_us, "
        "created_us = excluded.created_us "
        "WHERE (excluded.event_us, excluded.created_us) > "
        f"(coalesce(event_us, event_ts * 1000000), coalesce(created_us, {_NO_TIME}))"
    )
    entity_upsert = (
        f"INSERT INTO {_quote_id(entity_table(table_id))} (entity_key, event_us, created_us, "
        f"features) VALUES {', '.join(['(?, ?, ?, ?)'] * rows)} "
        "ON CONFLICT(entity_key) DO UPDATE SET "
        "event_us = excluded.event_us, created_us = excluded.created_us, "
        "features = excluded.features "
        "WHERE (excluded.event_us, excluded.created_us) > (event_us, created_us)"
    )
    return feature_upsert, entity_upsert


def _fill_entity_table(connection: sqlite3.Connection, table_id: str) -> None:
    """Entity rows for values written before this store kept them (by Feast's own store).

    An entity whose features carry different write times gets no JSON, so that readers use
    Feast's rows for it until a newer write of all its features arrives.
    """
    rows = connection.execute(
        "SELECT entity_key, feature_name, value, coalesce(event_us, event_ts * 1000000), "
        f"coalesce(created_us, {_NO_TIME}) FROM {_quote_id(table_id)} ORDER BY entity_key"
    )
    entities = []
    for key, group in itertools.groupby(rows, key=lambda row: row[0]):
        group = list(group)
        orders = {(event_us, created_us) for *_, event_us, created_us in group}
        event_us, created_us = max(orders)
        values = {feature: ValueProto.FromString(raw) for _, feature, raw, _, _ in group}
        features = entity_json(values) if len(orders) == 1 else None
        entities.append((key, event_us, created_us, features))
    connection.executemany(
        f"INSERT INTO {_quote_id(entity_table(table_id))} VALUES (?, ?, ?, ?)", entities
    )


class KeelSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    """Feast's SQLite online store settings, for the store that never rolls values back."""

    type: Literal["keel.mirrors.feast_online_stores.KeelSqliteOnlineStore"] = (  # type: ignore[assignment]
        "keel.mirrors.feast_online_stores.KeelSqliteOnlineStore"
    )


class KeelSqliteOnlineStore(SqliteOnlineStore):
    """Feast's SQLite online store with newest-wins upserts, one transaction per batch.

    Next to Feast's table (a row per entity and feature) it keeps ``<table>__entities``, a row
    per entity with all its values as JSON, under the same rule and in the same transaction:
    ``keel.mirrors.feast_online_reader`` serves a hundred entities from a hundred rows instead
    of two thousand.
    """

    def plan(self, config: RepoConfig, desired_registry_proto: Any) -> list:
        """The tables an apply would create: the desired ones the database does not hold yet.

        Feast records a store's tables in the registry only on the apply path it takes for
        ``type: sqlite``; a store named by class path, like this one, is applied without that
        record, so Feast's own plan would list every table as new after every apply. The
        database says which tables exist.
        """
        planned = super().plan(config, desired_registry_proto)
        path = self._get_db_path(config)
        if not Path(path).exists():
            return planned
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            existing = {
                name
                for (name,) in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            }
        finally:
            connection.close()
        return [table for table in planned if table.name not in existing]

    def update(
        self,
        config: RepoConfig,
        tables_to_delete: Sequence[FeatureView],
        tables_to_keep: Sequence[FeatureView],
        entities_to_delete: Sequence[Entity],
        entities_to_keep: Sequence[Entity],
        partial: bool,
    ) -> None:
        super().update(
            config, tables_to_delete, tables_to_keep, entities_to_delete, entities_to_keep, partial
        )
        connection = self._get_conn(config)
        versioning = config.registry.enable_online_feature_view_versioning
        for table in tables_to_keep:
            name = _table_id(config.project, table, versioning)
            # Feast stores whole seconds; the write rule needs the exact instants.
            _alter_table_add_column_if_missing(connection, name, "event_us", "INTEGER")
            _alter_table_add_column_if_missing(connection, name, "created_us", "INTEGER")
            exists = connection.execute(
                "SELECT 1 FROM sqlite_master WHERE name = ?", (entity_table(name),)
            ).fetchone()
            if not exists:
                connection.execute(
                    f"CREATE TABLE {_quote_id(entity_table(name))} "
                    "(entity_key BLOB PRIMARY KEY, event_us INTEGER, created_us INTEGER, "
                    "features TEXT) WITHOUT ROWID"
                )
                _fill_entity_table(connection, name)
        for table in tables_to_delete:
            name = _table_id(config.project, table, versioning)
            connection.execute(f"DROP TABLE IF EXISTS {_quote_id(entity_table(name))}")
        connection.commit()

    def online_write_batch(
        self,
        config: RepoConfig,
        table: FeatureView,
        data: list[Row],
        progress: Callable[[int], Any] | None,
    ) -> None:
        if config.online_store.vector_enabled:
            raise ValueError(
                "KeelSqliteOnlineStore does not store vectors; use Feast's 'sqlite' online "
                "store for vector search."
            )
        connection = self._get_conn(config)
        table_id = _table_id(
            config.project, table, config.registry.enable_online_feature_view_versioning
        )
        upsert, upsert_entity = newest_wins_upserts(table_id)
        version = config.entity_key_serialization_version
        rows, entities = [], []
        for entity_key, values, event_ts, created_ts in data:
            key = serialize_entity_key(entity_key, entity_key_serialization_version=version)
            naive_event = to_naive_utc(event_ts)
            naive_created = to_naive_utc(created_ts) if created_ts is not None else None
            event_us, created_us = epoch_us(event_ts), epoch_us(created_ts)
            entities.append((key, event_us, created_us, entity_json(values)))
            for feature_name, value in values.items():
                text, _ = extract_text_and_num(value, False)
                rows.append(
                    (
                        key,
                        feature_name,
                        value.SerializeToString(),
                        text,
                        naive_event,
                        naive_created,
                        event_us,
                        created_us,
                    )
                )
        with connection:
            connection.executemany(upsert, rows)
            connection.executemany(upsert_entity, entities)
        if progress:
            progress(len(data))


# Compares the stored write order with the new one and writes only a strictly newer row, in
# one atomic step on the server. The order field counts only while Feast's own timestamp field
# is there, so a feature view that Feast deleted starts afresh.
_NEWEST_WINS = """
local stored = redis.call('HMGET', KEYS[1], ARGV[3], ARGV[1])
if stored[1] and stored[2] and stored[2] >= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], unpack(ARGV, 3))
return 1
"""


class KeelRedisOnlineStoreConfig(RedisOnlineStoreConfig):
    """Feast's Redis online store settings, for the store that applies the newest-wins rule."""

    type: Literal["keel.mirrors.feast_online_stores.KeelRedisOnlineStore"] = (  # type: ignore[assignment]
        "keel.mirrors.feast_online_stores.KeelRedisOnlineStore"
    )


class KeelRedisOnlineStore(RedisOnlineStore):
    """Feast's Redis online store whose writes compare (event, created) time on the server."""

    def online_write_batch(
        self,
        config: RepoConfig,
        table: FeatureView,
        data: list[Row],
        progress: Callable[[int], Any] | None,
    ) -> None:
        online_config = config.online_store
        client = self._get_client(online_config)
        newest_wins = client.register_script(_NEWEST_WINS)
        view = _versioned_fv_name(table, config)
        ts_field = f"_ts:{view}".encode()
        order_field = f"_order:{view}".encode()
        field_names: dict[str, bytes] = {}
        version = config.entity_key_serialization_version
        with client.pipeline(transaction=False) as pipe:
            for entity_key, values, event_ts, created_ts in data:
                key = _redis_key(config.project, entity_key, version)
                stamp = Timestamp()
                stamp.FromDatetime(make_tzaware(event_ts))
                args: list[bytes | str] = [
                    order_field,
                    write_order(event_ts, created_ts),
                    ts_field,
                    stamp.SerializeToString(),
                ]
                for feature_name, value in values.items():
                    if feature_name not in field_names:
                        field_names[feature_name] = _mmh3(f"{view}:{feature_name}")
                    args += [field_names[feature_name], value.SerializeToString()]
                newest_wins(keys=[key], args=args, client=pipe)
                if online_config.key_ttl_seconds:
                    pipe.expire(name=key, time=online_config.key_ttl_seconds)
            pipe.execute()
        if progress:
            progress(len(data))

    async def online_write_batch_async(
        self,
        config: RepoConfig,
        table: FeatureView,
        data: list[Row],
        progress: Callable[[int], Any] | None,
    ) -> None:
        # Feast's async writer keeps the plain rule; route it through the newest-wins one.
        await asyncio.to_thread(self.online_write_batch, config, table, data, progress)
