"""The store stage's writer: window rows into Feast's online store and the offline files.

It runs in the store process (``keel.streaming.store_process``), apart from the consumer that
logs and acknowledges the events.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from keel import schema
from keel.streaming.features import FEATURE_VIEW, FEATURES

if TYPE_CHECKING:
    import pyarrow as pa
    from feast import FeatureStore

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class FeatureWriter:
    """Writes window rows to Feast's online store and to the push source's offline files.

    On Keel's SQLite store rows go in as plain numbers
    (``keel.mirrors.feast_sqlite_numeric_write``: the store's own rows and newest-wins rule);
    on others, to the store's ``online_write_batch`` as protos built here: Feast's
    ``write_to_online_store`` first converts a DataFrame to those protos, a quarter of its time
    for 1,000 rows when measured. Feast's offline push for file sources rereads and rewrites the
    whole Parquet file on every push; here each batch adds a file of its own.
    """

    def __init__(self, store: FeatureStore, offline_dir: Path):
        from feast.infra.online_stores.helpers import get_online_store_from_config

        from keel.mirrors.feast_online_stores import KeelSqliteOnlineStore

        self.store = store
        self.config = store.config
        self.online = get_online_store_from_config(store.config.online_store)
        self.view = store.get_feature_view(FEATURE_VIEW)
        # On the SQLite store rows go in as plain numbers: building and unpacking the protos
        # cost more than the database's own work when profiled.
        self.numeric = None
        if isinstance(self.online, KeelSqliteOnlineStore):
            from keel.mirrors.feast_sqlite_numeric_write import NumericRowWriter

            kinds = {n: "double" if t == "Float64" else "int64" for n, t in FEATURES.items()}
            self.numeric = NumericRowWriter(
                self.online, self.config, self.view, schema.ENTITY_KEY, kinds
            )
        self.offline_dir = Path(offline_dir)
        self.scratch = self.offline_dir.parent / f".{self.offline_dir.name}.scratch"
        self.offline_dir.mkdir(parents=True, exist_ok=True)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.offline_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-offline")
        # Feast's first online read imports modules for seconds, Parquet's writer for a fraction
        # of one: pay both before any event waits.
        self.read_back(0)
        import pyarrow.parquet  # noqa: F401

    def write(self, windows: list[tuple], first_seq: int, last_seq: int) -> pa.Table:
        """Write ``EventLog.windows`` rows online and offline; return them as the offline table."""
        import pyarrow as pa

        written_at = datetime.now(UTC)
        columns = list(zip(*windows, strict=True))
        spend_1h = np.asarray(columns[2], dtype=np.int64) / 100.0
        spend_today = np.asarray(columns[4], dtype=np.int64) / 100.0
        hour_count = np.asarray(columns[3], dtype=np.int64)
        day_count = np.asarray(columns[5], dtype=np.int64)
        table = pa.table(
            {
                schema.ENTITY_KEY: pa.array(columns[0], pa.int64()),
                schema.EVENT_TIMESTAMP: pa.array(columns[1], pa.int64()).cast(
                    pa.timestamp("us", tz="UTC")
                ),
                schema.CREATED_TIMESTAMP: pa.array(
                    [written_at] * len(windows), pa.timestamp("us", tz="UTC")
                ),
                "spend_1h": pa.array(spend_1h),
                "transactions_1h": pa.array(hour_count),
                "spend_today": pa.array(spend_today),
                "transactions_today": pa.array(day_count),
            }
        )
        # The offline file is written and synced to disk while the online store writes and
        # syncs its own; the call returns when both are done.
        offline = self.offline_writer.submit(self._write_offline, table, first_seq, last_seq)
        try:
            if self.numeric is not None:
                values = [spend_1h, hour_count, spend_today, day_count]
                self.numeric.write_columns(columns[0], columns[1], values, written_at)
            else:
                self.online.online_write_batch(
                    self.config, self.view, _proto_rows(windows, written_at), None
                )
        finally:
            offline.result()
        return table

    def _write_offline(self, table: pa.Table, first_seq: int, last_seq: int) -> None:
        import pyarrow.parquet as pq

        from keel.files import replace_durably

        # Named by the batch's stream sequences: the same batch delivered again replaces its
        # file; a batch cut differently after a crash repeats equal values, which
        # point-in-time retrieval (latest write time) reads once.
        scratch = self.scratch / f"{uuid.uuid4().hex}.parquet"
        pq.write_table(table, scratch)
        replace_durably(scratch, self.offline_dir / f"{first_seq:012d}-{last_seq:012d}.parquet")

    def read_back(self, account_id: int) -> dict:
        """One account's values read through the online store, as serving reads them."""
        refs = [f"{FEATURE_VIEW}:{name}" for name in FEATURES]
        values = self.store.get_online_features(
            features=refs, entity_rows=[{schema.ENTITY_KEY: int(account_id)}]
        ).to_dict()
        return {name: values[name][0] for name in FEATURES}


def _proto_rows(windows: list[tuple], written_at: datetime) -> list[tuple]:
    """``EventLog.windows`` rows as the protos of an online store's ``online_write_batch``."""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    rows = []
    for account, newest, hour_cents, hour_count, day_cents, day_count in windows:
        key = EntityKey(join_keys=[schema.ENTITY_KEY], entity_values=[Value(int64_val=account)])
        values = {
            "spend_1h": Value(double_val=hour_cents / 100.0),
            "transactions_1h": Value(int64_val=hour_count),
            "spend_today": Value(double_val=day_cents / 100.0),
            "transactions_today": Value(int64_val=day_count),
        }
        rows.append((key, values, _EPOCH + timedelta(microseconds=newest), written_at))
    return rows
