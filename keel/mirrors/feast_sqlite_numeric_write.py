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

import contextlib
import json
import sqlite3
import struct
from datetime import UTC, datetime, timedelta
from itertools import chain, repeat
from typing import Literal

import numpy as np
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
_INT64 = struct.Struct("<q")
# The same, for a whole column at once: a tag byte and a little-endian double, packed.
_PACKED_DOUBLE = np.dtype([("tag", "u1"), ("value", "<f8")])
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
        # A write-ahead log: a commit syncs one file once, where the rollback journal syncs the
        # journal, the database and the journal's removal (synchronous stays as it was, FULL).
        # Readers of the store (serving) read on while a write commits. The file keeps the mode.
        with contextlib.suppress(sqlite3.OperationalError):  # busy: the journal stays
            self.connection.execute("PRAGMA journal_mode = WAL")
        self.join_key = join_key
        self.features = list(features.items())
        self.names = [name for name, _ in self.features]
        self.doubles = [kind == "double" for _, kind in self.features]
        self.version = config.entity_key_serialization_version
        self.keys: dict[int, bytes] = {}
        self.prefix = self._key_prefix()
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
            key = self._serialise(entity)
            self.keys[entity] = key
        return key

    def _serialise(self, entity: int) -> bytes:
        proto = EntityKeyProto(
            join_keys=[self.join_key], entity_values=[ValueProto(int64_val=entity)]
        )
        return serialize_entity_key(proto, entity_key_serialization_version=self.version)

    def _key_prefix(self) -> bytes | None:
        """The bytes Feast puts before a key's 8 little-endian value bytes, where it does so."""
        prefix = self._serialise(0)[:-8]
        samples = (0, 1, -1, 2**40 + 7, -(2**63), 2**63 - 1)
        if all(self._serialise(v) == prefix + _INT64.pack(v) for v in samples):
            return prefix
        return None

    def keys_of(self, entities: list[int]) -> list[bytes]:
        """``key`` of each entity; in Feast's layout of today, its prefix and value bytes."""
        if self.prefix is None:
            return [self.keys.get(entity) or self.key(entity) for entity in entities]
        packed = np.asarray(entities, dtype="<i8").tobytes()
        prefix = self.prefix
        return [prefix + packed[i : i + 8] for i in range(0, len(packed), 8)]

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
        if not rows:
            return
        columns = list(zip(*rows, strict=True))
        values = [
            np.asarray(column, dtype=np.float64 if double else np.int64)
            for column, double in zip(columns[2:], self.doubles, strict=True)
        ]
        self.write_columns(columns[0], columns[1], values, created)

    def write_columns(
        self, entities, event_us, values: list[np.ndarray], created: datetime
    ) -> None:
        """``write`` from columns: entity ids, event times (us) and one array per feature.

        Each feature's stored values are built for the whole column at once; the rows go to
        SQLite in the order ``write`` gives them (per entity, its features in order).
        """
        created_naive = created.astimezone(UTC).replace(tzinfo=None)
        created_s = adapt_datetime_epoch(created_naive)
        created_us = (created - _EPOCH) // timedelta(microseconds=1)
        entities = [int(entity) for entity in entities]
        event_us = [int(us) for us in event_us]
        if len(values) != len(self.names) or any(len(v) != len(entities) for v in values):
            raise ValueError(f"numeric rows need one value per entity of each of {self.names}")
        keys = self.keys_of(entities)
        event_s = [
            adapt_datetime_epoch(_NAIVE_EPOCH + timedelta(microseconds=us)) for us in event_us
        ]
        per_feature, plain = [], []
        for name, double, column in zip(self.names, self.doubles, values, strict=True):
            if double:
                column = np.asarray(column, dtype=np.float64)
                packed = np.empty(len(column), dtype=_PACKED_DOUBLE)
                packed["tag"] = _DOUBLE_TAG[0]
                packed["value"] = column
                raws = packed.view(f"V{_PACKED_DOUBLE.itemsize}").tolist()
            else:
                column = np.asarray(column, dtype=np.int64)
                raws = list(map(self.int_value, column.tolist()))
            numbers = column.tolist()
            plain.append(numbers)
            per_feature.append(
                zip(
                    keys, repeat(name), raws, map(str, numbers), event_s,
                    repeat(created_s), event_us, repeat(created_us),
                )
            )  # fmt: skip
        # Per entity, its features in order: Feast's row per entity and feature, flattened.
        feature_rows = list(
            chain.from_iterable(chain.from_iterable(zip(*per_feature, strict=True)))
        )
        finite = all(
            bool(np.isfinite(column).all())
            for column, d in zip(values, self.doubles, strict=True)
            if d
        )
        if finite:
            documents = [self.entity_json % numbers for numbers in zip(*plain, strict=True)]
        else:
            documents = [
                json.dumps(dict(zip(self.names, numbers, strict=True)), separators=(",", ":"))
                for numbers in zip(*plain, strict=True)
            ]
        entity_rows = list(chain.from_iterable(zip(keys, event_us, repeat(created_us), documents)))
        with self.connection:
            self._upsert(feature_rows, 8, 0)
            self._upsert(entity_rows, 4, 1)

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
