"""Names shared by every stage: the entity, timestamps, features, label and protected groups.

The dbt marts produce these columns, Feast serves them, training and monitoring consume them.
Changing a name here is a schema change for the whole loop.
"""

ENTITY = "account"
ENTITY_KEY = "account_id"
EVENT_TIMESTAMP = "event_timestamp"
CREATED_TIMESTAMP = "created_timestamp"
LABEL = "defaulted"
LABEL_TIMESTAMP = "label_timestamp"

# The first day of the generated world: the generator's default start and the first daily
# partition (ISO date).
FIRST_DAY = "2026-01-01"

# Protected attributes travel with the labels (for fairness reports), never into the model.
PROTECTED_ATTRIBUTES = ("age_band", "sex", "region")

# Columns of the daily feature mart `fct_account_features_daily` (one row per account per day,
# stamped at the end of that day) that the feature view `account_daily_fv` serves.
DAILY_NUMERIC_FEATURES = (
    "spend_7d",
    "spend_30d",
    "spend_90d",
    "payments_7d",
    "payments_30d",
    "payments_90d",
    "transactions_7d",
    "transactions_30d",
    "active_days_30d",
    "balance",
    "utilisation",
    "avg_utilisation_30d",
    "max_utilisation_90d",
    "missed_payments_30d",
    "missed_payments_90d",
    "credit_limit",
    "tenure_days",
)
DAILY_CATEGORICAL_FEATURES = ("product", "main_channel_30d")
DAILY_FEATURES = DAILY_NUMERIC_FEATURES + DAILY_CATEGORICAL_FEATURES

# Computed at request time by the on-demand feature view `account_ratios_odfv`.
ON_DEMAND_FEATURES = ("payment_to_spend_30d", "spend_trend_7d_vs_30d", "balance_to_limit")

MODEL_FEATURES = DAILY_FEATURES + ON_DEMAND_FEATURES
CATEGORICAL_FEATURES = DAILY_CATEGORICAL_FEATURES
NUMERIC_FEATURES = DAILY_NUMERIC_FEATURES + ON_DEMAND_FEATURES

FEATURE_SERVICE = "default_risk_v1"

# Categories the generator emits; anything else is an unknown category and is quarantined.
PRODUCTS = ("classic", "gold", "platinum")
CHANNELS = ("online", "pos", "atm", "branch")
REGIONS = ("north", "south", "east", "west", "central")
SEXES = ("F", "M")
AGE_BANDS = ("18-25", "26-35", "36-50", "51-65", "66+")

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

# Where dbt lands the marts for Feast and other readers, relative to the marts folder
# ($KEEL_HOME/marts): one Parquet file per daily partition, named YYYY-MM-DD.parquet.
# Timestamps are UTC (`timestamp with time zone` in DuckDB, tz=UTC in Arrow).
FEATURES_MART = "account_features_daily"  # one row per account per day
LABELS_MART = "default_labels"  # one row per account per observation day; file = arrival day
ACCOUNTS_MART = "accounts.parquet"  # one row per account: static and protected attributes
