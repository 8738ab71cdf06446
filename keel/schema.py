"""Names shared by every stage of the daily loop, read from the loop's dataset folder.

The dataset whose ``dataset.yaml`` says ``loop: daily`` (``keel.datasets.spec.loop_dataset``)
names the entity, timestamps, features, label, protected groups, Feast objects, dbt marts and
MLflow names; the dbt marts produce these columns, Feast serves them, training and monitoring
consume them. Changing a name in that file is a schema change for the whole loop.
"""

from keel.datasets.spec import loop_dataset

_SPEC = loop_dataset()

DATASET = _SPEC.name
# The daily raw table the source delivers, and its columns in delivery order.
RAW_TABLE = _SPEC.raw_table
RAW_COLUMNS = tuple(_SPEC.columns)
ENTITY = _SPEC.entity
ENTITY_KEY = _SPEC.entity_key
EVENT_TIMESTAMP = _SPEC.event_time
# When a row was written (Feast's tie-break between two rows of one event time): every mart.
CREATED_TIMESTAMP = "created_timestamp"
LABEL = _SPEC.label.column
# When a streamed label became known.
LABEL_TIMESTAMP = _SPEC.label.known_at or _SPEC.label.observed_at

# The first day of the loop's data: the generator's default start and the first daily
# partition (ISO date).
FIRST_DAY = _SPEC.first_day or ""

# Protected attributes travel with the labels (for fairness reports), never into the model.
PROTECTED_ATTRIBUTES = _SPEC.protected_attributes

# Columns of the daily features mart (one row per entity per day, stamped at the end of that
# day) that the feature view ``FEATURE_VIEW`` serves.
DAILY_NUMERIC_FEATURES = _SPEC.numeric_features
DAILY_CATEGORICAL_FEATURES = tuple(_SPEC.categorical_features)
DAILY_FEATURES = DAILY_NUMERIC_FEATURES + DAILY_CATEGORICAL_FEATURES

# Computed at request time by the on-demand feature view ``ON_DEMAND_VIEW``, one ratio each.
ON_DEMAND_RATIOS = _SPEC.on_demand
ON_DEMAND_FEATURES = _SPEC.on_demand_features

MODEL_FEATURES = DAILY_FEATURES + ON_DEMAND_FEATURES
CATEGORICAL_FEATURES = DAILY_CATEGORICAL_FEATURES
NUMERIC_FEATURES = DAILY_NUMERIC_FEATURES + ON_DEMAND_FEATURES
# Features whose rise never lowers the risk: the models are constrained to respect it.
MONOTONE_INCREASING = tuple(f for f, direction in _SPEC.monotone.items() if direction == 1)

FEATURE_VIEW = _SPEC.feature_view
# How long a feature row stays current in Feast: past it, a training row gets nulls.
FEATURE_TTL_DAYS = _SPEC.feature_ttl_days
ON_DEMAND_VIEW = _SPEC.on_demand_view
FEATURE_SERVICE = _SPEC.feature_service
EXPERIMENT = _SPEC.experiment
REGISTERED_MODEL = _SPEC.registered_model

# Categories the source emits; anything else is an unknown category and is quarantined.
PRODUCTS = _SPEC.vocabulary("product")
CHANNELS = _SPEC.vocabulary("channel")
REGIONS = _SPEC.vocabulary("region")
SEXES = _SPEC.vocabulary("sex")
AGE_BANDS = _SPEC.vocabulary("age_band")

# Tags every training run carries in MLflow and every registered model version copies: the
# lineage from a model back to its data, features, transformations and code.
LINEAGE_TAGS = (
    "keel.dataset_version",
    "keel.training_set_path",
    "keel.dagster_data_version",
    "keel.code_commit",
    "keel.code_dirty",
    "keel.feature_service",
    "keel.dbt_manifest_hash",
    "keel.dbt_models",
    "keel.model_family",
    "keel.trained_by",
)

# The dbt models the loop reads: daily features, daily labels, the entity dimension.
FEATURES_MODEL = _SPEC.features_model
LABELS_MODEL = _SPEC.labels_model
ENTITIES_MODEL = _SPEC.entities_model or ""
ENTITY_COLUMNS = _SPEC.entity_columns
# Each daily mart's day column: one Parquet file per value.
FEATURES_DAY = _SPEC.mart_day_columns.get("features")
LABELS_DAY = _SPEC.mart_day_columns.get("labels")

# Where dbt lands the marts for Feast and other readers, relative to the marts folder
# ($KEEL_HOME/marts): one Parquet file per daily partition, named YYYY-MM-DD.parquet.
# Timestamps are UTC (`timestamp with time zone` in DuckDB, tz=UTC in Arrow).
FEATURES_MART = _SPEC.features_mart  # one row per entity per day
LABELS_MART = _SPEC.labels_mart  # one row per entity per observation day; file = arrival day
ACCOUNTS_MART = _SPEC.entities_mart  # one row per entity: static and protected attributes
