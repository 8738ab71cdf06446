"""A fast newest-wins write of plain numeric rows into Keel's SQLite online store.

``KeelSqliteOnlineStore.online_write_batch`` takes Feast's row protos; a caller that holds
plain numbers (the stream consumer: an account id, its newest event and four counts) spends
most of a write building those protos and turning them back into bytes, text and JSON. This
writes the same table rows (Feast's row per entity and feature, Keel's row per entity) from
the numbers directly, under the same rule (a row replaces the stored one only when its
``(event_us, created_us)`` is strictly newer), in one transaction per call. Entity keys are
single int64 join keys; feature values are float64 or int64.

Mirrors: feast==0.67.0 (feast/infra/online_stores/sqlite.py row layout, key_encoding_utils.py)
Parity test: test_streaming_mirror.py::test_numeric_rows_write_what_the_store_writes_from_protos
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Literal

from feast.feature_view import FeatureView
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.sqlite import _table_id
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig

from keel.mirrors.feast_online_stores import KeelSqliteOnlineStore, newest_wins_upserts

Kind = Literal["double", "int64"]

_NAIVE_EPOCH = datetime(1970, 1, 1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class NumericRowWriter:
    """Writes ``(key, event_us, value, ...)`` rows of one feature view; keys cached per writer."""

    def __init__(
        self,
        store: KeelSqliteOnlineStore,
        config: RepoConfig,
        view: FeatureView,
        join_key: str,
        features: dict[str, Kind],
    ):
        if not isinstance(store, KeelSqliteOnlineStore):
            raise TypeError(
                "numeric rows are written only to KeelSqliteOnlineStore, "
                f"not {type(store).__name__}"
            )
        if config.online_store.vector_enabled:
            raise ValueError("KeelSqliteOnlineStore does not store vectors")
        self.connection = store._get_conn(config)
        self.join_key = join_key
        self.features = list(features.items())
        self.version = config.entity_key_serialization_version
        self.keys: dict[int, bytes] = {}
        table_id = _table_id(
            config.project, view, config.registry.enable_online_feature_view_versioning
        )
        # The statements of KeelSqliteOnlineStore.online_write_batch itself.
        self.upsert, self.upsert_entity = newest_wins_upserts(table_id)

    def key(self, entity: int) -> bytes:
        """Feast's serialised entity key of one int64 join key value."""
        key = self.keys.get(entity)
        if key is None:
            proto = EntityKeyProto(
                join_keys=[self.join_key], entity_values=[ValueProto(int64_val=entity)]
            )
            key = serialize_entity_key(proto, entity_key_serialization_version=self.version)
            self.keys[entity] = key
        return key

    def write(self, rows: list[tuple], created: datetime) -> None:
        """Write ``(entity, event_us, *values)`` rows, values in the order of ``features``.

        ``created`` is the write time of them all (tz-aware); float64 values must be floats.
        """
        created_naive = created.astimezone(UTC).replace(tzinfo=None)
        created_us = (created - _EPOCH) // timedelta(microseconds=1)
        names = [name for name, _ in self.features]
        feature_rows, entities = [], []
        for entity, event_us, *values in rows:
            key = self.key(entity)
            event_naive = _NAIVE_EPOCH + timedelta(microseconds=event_us)
            for (name, kind), value in zip(self.features, values, strict=True):
                proto = (
                    ValueProto(double_val=value)
                    if kind == "double"
                    else ValueProto(int64_val=value)
                )
                feature_rows.append(
                    (
                        key,
                        name,
                        proto.SerializeToString(),
                        str(value),
                        event_naive,
                        created_naive,
                        event_us,
                        created_us,
                    )
                )
            features = json.dumps(dict(zip(names, values, strict=True)), separators=(",", ":"))
            entities.append((key, event_us, created_us, features))
        with self.connection:
            self.connection.executemany(self.upsert, feature_rows)
            self.connection.executemany(self.upsert_entity, entities)
