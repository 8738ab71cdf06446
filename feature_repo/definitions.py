"""Keel's Feast objects: entities, sources over the dbt marts, feature views, feature services.

`feast plan` and `feast apply` read this file from this folder; ``keel.features.apply_repo``
applies the same objects from Python. The sources are the Parquet marts that dbt's export
writes: under ``$KEEL_HOME/marts``, or with ``KEEL_PROFILE=production`` under
``KEEL_MARTS_DIR`` (a shared folder or ``s3://...``), both from ``keel.storage.marts_location``.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pandas as pd
from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.data_format import ParquetFormat
from feast.data_source import DataSource
from feast.on_demand_feature_view import on_demand_feature_view
from feast.types import Float64, Int64, String

from keel import schema
from keel.datasets.spec import DatasetSpec, discover
from keel.features import RATIO_INPUTS
from keel.storage import marts_location

MARTS = marts_location()


class DeclaredFeatureView(FeatureView):
    """A feature view as this file declares it, equal to its registered copy once materialised.

    `feast plan` compares each declared view with the registry's, and Feast's equality counts
    the materialisation intervals, which only the registry's copy has; a view found unequal is
    then reported as "Updated" with its source's creation timestamps, the one field that always
    differs. Python lets a subclass's comparison take precedence over its base class's, so in
    plan's ``registered != declared`` this equality, without the intervals, decides.
    """

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureView):
            return False
        declared = copy.copy(self)
        declared.materialization_intervals = other.materialization_intervals
        return FeatureView.__eq__(declared, other)

    __hash__ = FeatureView.__hash__


def _mart_source(name: str, mart: str, description: str) -> DataSource:
    """A Parquet mart under the marts location (a folder of daily files, or one file)."""
    return FileSource(
        name=name,
        path=f"{MARTS}/{mart}",
        file_format=ParquetFormat(),
        timestamp_field=schema.EVENT_TIMESTAMP,
        created_timestamp_column=schema.CREATED_TIMESTAMP,
        description=description,
    )


account = Entity(
    name=schema.ENTITY,
    join_keys=[schema.ENTITY_KEY],
    value_type=ValueType.INT64,
    description="A credit-card account.",
)

account_daily_source = _mart_source(
    "account_daily_source",
    schema.FEATURES_MART,
    "dbt mart fct_account_features_daily: one row per account per day, stamped at day end.",
)

# The mart writes a row for every open account every day, so on a healthy pipeline the newest
# row is at most one day old. Two days tolerate one late or missed daily run; after that a
# training row gets nulls instead of silently reusing a value from before the outage.
account_daily_fv = DeclaredFeatureView(
    name=schema.FEATURE_VIEW,
    entities=[account],
    ttl=timedelta(days=schema.FEATURE_TTL_DAYS),
    schema=[Field(name=schema.ENTITY_KEY, dtype=Int64)]
    + [Field(name=name, dtype=Float64) for name in schema.DAILY_NUMERIC_FEATURES]
    + [Field(name=name, dtype=String) for name in schema.DAILY_CATEGORICAL_FEATURES],
    source=account_daily_source,
    online=True,
    description="Rolling spend, payment and utilisation features of an account, per day.",
)


@on_demand_feature_view(
    name=schema.ON_DEMAND_VIEW,
    sources=[account_daily_fv[list(RATIO_INPUTS)]],
    schema=[Field(name=name, dtype=Float64) for name in schema.ON_DEMAND_FEATURES],
    mode="pandas",
    description="Ratios computed at request time from the daily features.",
)
def account_ratios_odfv(inputs: pd.DataFrame) -> pd.DataFrame:
    """Payment, spend-trend and balance ratios (``keel.features.account_ratios``)."""
    # Feast rebuilds this function from its source text with only pd and np in scope.
    from keel.features import account_ratios

    return pd.DataFrame(account_ratios(inputs))


default_risk_v1 = FeatureService(
    name=schema.FEATURE_SERVICE,
    features=[account_daily_fv, account_ratios_odfv],
    description="Every feature the default-risk model reads, version 1.",
)


def dataset_objects(spec: DatasetSpec) -> dict[str, object]:
    """A dataset's entity, mart source, feature view and versioned feature service, by name."""
    integer_key = spec.columns[spec.entity_key] == "integer"
    entity = Entity(
        name=spec.entity,
        join_keys=[spec.entity_key],
        value_type=ValueType.INT64 if integer_key else ValueType.STRING,
        description=f"The {spec.entity} of dataset {spec.name}.",
    )
    source = _mart_source(f"{spec.name}_source", spec.features_mart, spec.description)
    view = DeclaredFeatureView(
        name=f"{spec.name}_fv",
        entities=[entity],
        ttl=timedelta(days=spec.feature_ttl_days),
        schema=[Field(name=spec.entity_key, dtype=Int64 if integer_key else String)]
        + [Field(name=name, dtype=Float64) for name in spec.numeric_features]
        + [Field(name=name, dtype=String) for name in spec.categorical_features],
        source=source,
        online=True,
        description=f"The features of dataset {spec.name}, one row per {spec.entity} per event.",
    )
    service = FeatureService(
        name=spec.feature_service,
        features=[view],
        description=f"Every feature the {spec.name} model reads.",
    )
    return {f"{spec.name}_entity": entity, view.name: view, service.name: service}


# Feast collects the module's globals: one set of objects per dataset folder.
for _spec in discover():
    globals().update(dataset_objects(_spec))
