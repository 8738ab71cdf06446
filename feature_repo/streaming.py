"""Keel's streaming features: a push source fed by ``keel stream consume`` and its feature view.

The consumer writes each account's window features to the online store and appends the same
rows, as Parquet, to ``$KEEL_HOME/streaming/account_stream``, the push source's batch source:
training reads from there through ``get_historical_features`` what serving read online.
"""

from __future__ import annotations

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_format import ParquetFormat
from feast.types import Float64, Int64

from keel import schema
from keel.settings import KeelPaths
from keel.streaming.features import FEATURE_VIEW, FEATURES, OFFLINE_FOLDER, PUSH_SOURCE

STREAM_OFFLINE = KeelPaths.current().home / OFFLINE_FOLDER

# The same entity as definitions.py declares: Keel's loader and Feast keep one of equal copies.
account = Entity(
    name=schema.ENTITY,
    join_keys=[schema.ENTITY_KEY],
    value_type=ValueType.INT64,
    description="A credit-card account.",
)

account_stream_push = PushSource(
    name=PUSH_SOURCE,
    batch_source=FileSource(
        name="account_stream_log",
        path=str(STREAM_OFFLINE),
        file_format=ParquetFormat(),
        timestamp_field=schema.EVENT_TIMESTAMP,
        created_timestamp_column=schema.CREATED_TIMESTAMP,
        description="Every value the stream consumer wrote online, one Parquet file per batch.",
    ),
    description="Window features of account events, pushed by the stream consumer.",
)

_TYPES = {"Float64": Float64, "Int64": Int64}

# Values are as of the account's newest event; a day without events leaves nothing current.
account_stream_fv = FeatureView(
    name=FEATURE_VIEW,
    entities=[account],
    ttl=timedelta(days=1),
    schema=[Field(name=schema.ENTITY_KEY, dtype=Int64)]
    + [Field(name=name, dtype=_TYPES[kind]) for name, kind in FEATURES.items()],
    source=account_stream_push,
    online=True,
    description="Spend and transactions of an account in the last hour and today, from events.",
)
