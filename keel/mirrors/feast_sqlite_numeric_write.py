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
import math
import struct
from datetime import UTC, datetime, timedelta
from typing import Literal

from feast.feature_view import FeatureView
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.sqlite import _table_id, adapt_datetime_epoch
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig

from keel.mirrors.feast_online_stores import KeelSqliteOnlineStore, newest_wins_upserts

Kind = Literal["double", "int64"]

_NAIVE_EPOCH = datetime(1970, 1, 1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A stored double is its Value proto: the double_val field's tag, then 8 little-endian bytes.
_DOUBLE_TAG = b"\x29"
_DOUBLE = struct.Struct("<d")
# Rows per upsert statement (at most; a write's rows go in as few statements as that allows).
# One statement runs all its rows inside SQLite, away from Python's interpreter lock: row by
# row, each row waited for the lock again while other threads of the process ran Python.
CHUNK_ROWS = 1_024
# The page cache of the store's connection, in KiB.
CACHE_KIB = 64 * 1024


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
        unknown = {kind for kind in features.values()} - {"double", "int64"}
        if unknown:
            raise ValueError(f"numeric rows hold double and int64 values, not {sorted(unknown)}")
        if ValueProto(double_val=-1.5).SerializeToString() != _DOUBLE_TAG + _DOUBLE.pack(-1.5):
            raise RuntimeError("Feast's Value proto changed; update the numeric writer's tag.")
        self.connection = store._get_conn(config)
        # Batches touch most pages of a view's tables: keep them in memory between batches
        # (SQLite's default is 2 MiB), instead of reading them back from the file each time.
        self.connection.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        self.join_key = join_key
        self.features = list(features.items())
        self.names = [name for name, _ in self.features]
        self.doubles = [kind == "double" for _, kind in self.features]
        self.version = config.entity_key_serialization_version
        self.keys: dict[int, bytes] = {}
        # Small counts repeat: their serialised protos are cached.
        self.int_values: dict[int, bytes] = {}
        # Keel's entity row as the store's json.dumps writes it: a float's and an int's repr
        # are their JSON (non-finite floats go through json.dumps itself).
        self.entity_json = "{" + ",".join(f"{json.dumps(n)}:%r" for n in self.names) + "}"
        table_id = _table_id(
            config.project, view, config.registry.enable_online_feature_view_versioning
        )
        # The statements of KeelSqliteOnlineStore.online_write_batch itself, by rows they take.
        self.table_id = table_id
        self.statements: dict[int, tuple[str, str]] = {}

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

    def int_value(self, value: int) -> bytes:
        raw = self.int_values.get(value)
        if raw is None:
            raw = ValueProto(int64_val=value).SerializeToString()
            if len(self.int_values) < 100_000:
                self.int_values[value] = raw
        return raw

    def write(self, rows: list[tuple], created: datetime) -> None:
        """Write ``(entity, event_us, *values)`` rows, values in the order of ``features``.

        ``created`` is the write time of them all (tz-aware). The timestamps go in as the
        store's SQLite adapter turns its naive datetimes into numbers, once per entity.
        """
        created_naive = created.astimezone(UTC).replace(tzinfo=None)
        created_s = adapt_datetime_epoch(created_naive)
        created_us = (created - _EPOCH) // timedelta(microseconds=1)
        names, doubles, pack, int_value = self.names, self.doubles, _DOUBLE.pack, self.int_value
        template = self.entity_json
        feature_rows, entities = [], []
        add_row, add_entity = feature_rows.extend, entities.extend
        for entity, event_us, *values in rows:
            key = self.key(entity)
            event_s = adapt_datetime_epoch(_NAIVE_EPOCH + timedelta(microseconds=event_us))
            values = [
                float(v) if double else int(v) for v, double in zip(values, doubles, strict=True)
            ]
            for name, double, value in zip(names, doubles, values, strict=True):
                raw = _DOUBLE_TAG + pack(value) if double else int_value(value)
                add_row((key, name, raw, str(value), event_s, created_s, event_us, created_us))
            if all(math.isfinite(v) for v in values):
                features = template % tuple(values)
            else:
                features = json.dumps(dict(zip(names, values, strict=True)), separators=(",", ":"))
            add_entity((key, event_us, created_us, features))
        with self.connection:
            self._upsert(feature_rows, 8, 0)
            self._upsert(entities, 4, 1)

    def _upsert(self, flat: list, width: int, which: int) -> None:
        """Upsert rows given flat (``width`` values each), up to CHUNK_ROWS to a statement."""
        rows = len(flat) // width
        for start in range(0, rows, CHUNK_ROWS):
            count = min(CHUNK_ROWS, rows - start)
            statements = self.statements.get(count)
            if statements is None:
                statements = newest_wins_upserts(self.table_id, count)
                if count == CHUNK_ROWS or len(self.statements) < 16:
                    self.statements[count] = statements
            values = flat[start * width : (start + count) * width]
            self.connection.execute(statements[which], values)
