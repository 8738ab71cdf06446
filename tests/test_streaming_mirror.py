"""The stream consumer's numeric write against the online store's own write from protos."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keel.streaming.features import FEATURE_VIEW, FEATURES

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
KINDS = {"spend_1h": "double", "transactions_1h": "int64"}
KINDS |= {"spend_today": "double", "transactions_today": "int64"}


def _store(home):
    from keel.features import open_store
    from keel.streaming.consumer import register_stream_features

    store = open_store(variables={"KEEL_HOME": str(home)})
    register_stream_features(store)
    return store


def _proto_rows(rows, created):
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    out = []
    for account, event_us, *values in rows:
        key = EntityKey(join_keys=["account_id"], entity_values=[Value(int64_val=account)])
        protos = {
            name: Value(double_val=v) if KINDS[name] == "double" else Value(int64_val=v)
            for name, v in zip(FEATURES, values, strict=True)
        }
        out.append((key, protos, _EPOCH + timedelta(microseconds=event_us), created))
    return out


def _tables(store):
    from feast.infra.online_stores.sqlite import _table_id

    from keel.mirrors.feast_online_stores import entity_table

    view = store.get_feature_view(FEATURE_VIEW)
    table = _table_id(store.config.project, view, False)
    path = store.config.online_store.path
    connection = sqlite3.connect(path)
    try:
        return [
            connection.execute(f'SELECT * FROM "{name}" ORDER BY 1, 2').fetchall()
            for name in (table, entity_table(table))
        ]
    finally:
        connection.close()


def _proto_and_numeric_stores(tmp_path: Path):
    """Two fresh stores: one written through Feast's protos, one by the numeric writer."""
    from feast.infra.online_stores.helpers import get_online_store_from_config

    from keel.mirrors.feast_sqlite_numeric_write import NumericRowWriter

    by_protos, by_numbers = _store(tmp_path / "protos"), _store(tmp_path / "numbers")
    online = get_online_store_from_config(by_protos.config.online_store)
    view = by_protos.get_feature_view(FEATURE_VIEW)
    writer = NumericRowWriter(
        get_online_store_from_config(by_numbers.config.online_store),
        by_numbers.config,
        by_numbers.get_feature_view(FEATURE_VIEW),
        "account_id",
        KINDS,
    )
    return by_protos, by_numbers, online, view, writer


def test_numeric_rows_write_what_the_store_writes_from_protos(tmp_path):

    day = 1_767_571_200_000_000
    first = [
        (1, day + 5, 12.5, 3, 40.25, 7),
        (2, day + 9, 0.1, 1, 0.1, 1),
        (7, day, 0.0, 0, 3.0, 2),
    ]
    # Account 1 newer, account 2 older (kept), account 7 the same event written later (replaces).
    second = [
        (1, day + 6, 1.0, 1, 41.25, 8),
        (2, day + 8, 9.9, 9, 9.9, 9),
        (7, day, 1.5, 1, 4.5, 3),
    ]
    created = [
        datetime(2026, 1, 5, 1, 2, 3, 456789, tzinfo=UTC),
        datetime(2026, 1, 5, 1, 2, 4, tzinfo=UTC),
    ]

    by_protos, by_numbers, online, view, writer = _proto_and_numeric_stores(tmp_path)
    for rows, at in zip((first, second), created, strict=True):
        online.online_write_batch(by_protos.config, view, _proto_rows(rows, at), None)
        writer.write(rows, at)

    assert _tables(by_numbers) == _tables(by_protos)
    refs = [f"{FEATURE_VIEW}:{name}" for name in FEATURES]
    entity_rows = [{"account_id": a} for a in (1, 2, 7)]
    read = [
        s.get_online_features(features=refs, entity_rows=entity_rows).to_dict()
        for s in (by_protos, by_numbers)
    ]
    assert read[0] == read[1]
    assert read[1]["spend_1h"] == [1.0, 0.1, 1.5]
    assert read[1]["transactions_today"] == [8, 1, 3]


def test_numeric_rows_refuse_a_store_they_do_not_mirror(tmp_path):
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    from keel.mirrors.feast_sqlite_numeric_write import NumericRowWriter

    store = _store(tmp_path)
    with pytest.raises(TypeError, match="KeelSqliteOnlineStore"):
        NumericRowWriter(
            SqliteOnlineStore(),
            store.config,
            store.get_feature_view(FEATURE_VIEW),
            "account_id",
            KINDS,
        )


def test_numeric_rows_in_whole_chunks_and_a_rest_write_what_the_store_writes(tmp_path):
    """Over a chunk of rows per statement, a key twice in one write, money given as ints."""
    import numpy as np

    from keel.mirrors.feast_sqlite_numeric_write import CHUNK_ROWS

    rng = np.random.default_rng(7)
    day = 1_767_571_200_000_000
    accounts = rng.choice(10_000, size=CHUNK_ROWS + 37, replace=False).tolist()
    writes = []
    for round_ in range(3):
        rows = [
            (
                int(a),
                day + int(rng.integers(0, 3)),  # newer, the same or older than the last write
                float(rng.integers(0, 10**6)) / 100.0,
                int(rng.integers(0, 50)),
                int(rng.integers(0, 10**6)),  # a whole amount given as an int
                int(rng.integers(0, 50)),
            )
            for a in accounts
        ]
        # The first account again at the end of the write, one microsecond newer.
        rows.append((rows[0][0], rows[0][1] + 1, 1.25, 1, 2.5, 2))
        writes.append((rows, datetime(2026, 1, 5, 1, 2, round_, tzinfo=UTC)))

    by_protos, by_numbers, online, view, writer = _proto_and_numeric_stores(tmp_path)
    for rows, at in writes:
        floats = [(a, t, float(h), hn, float(d), dn) for a, t, h, hn, d, dn in rows]
        online.online_write_batch(by_protos.config, view, _proto_rows(floats, at), None)
        writer.write(rows, at)

    assert _tables(by_numbers) == _tables(by_protos)
    refs = [f"{FEATURE_VIEW}:{name}" for name in FEATURES]
    entity_rows = [{"account_id": a} for a in accounts]
    read = [
        s.get_online_features(features=refs, entity_rows=entity_rows).to_dict()
        for s in (by_protos, by_numbers)
    ]
    assert read[0] == read[1]
    assert read[1]["spend_1h"][0] == 1.25
