"""Jobs are asset selections: what runs together, on a schedule, from a sensor or by hand."""

import dagster as dg
from dagster_dbt import build_dbt_asset_selection

from assets.datasets import partitions as dataset_partitions
from assets.ingestion import DAILY_RAW_ASSETS, REFERENCE_RAW_ASSETS
from assets.partitions import DAILY_PARTITIONS
from assets.transformation import daily_dbt_models, dbt_models, dbt_unit_tests
from keel.datasets.spec import DatasetSpec, discover

# dbt's unit tests check SQL logic, not data: they run with `dbt build` itself and on demand as
# the dbt_unit_tests checks, not in every scheduled run.
WITHOUT_UNIT_TESTS = dg.AssetSelection.checks(dbt_unit_tests)
# The loop dataset's raw tables the source delivers every day (with their validation checks).
DAILY_RAW = dg.AssetSelection.assets(*DAILY_RAW_ASSETS)

# Raw data in, validated, through dbt to the marts, into the online store, scored and
# monitored: everything a day needs, one partition at a time.
daily_pipeline = dg.define_asset_job(
    "daily_pipeline",
    selection=(
        DAILY_RAW
        | dg.AssetSelection.assets(daily_dbt_models)
        | dg.AssetSelection.assets(
            "online_features", "batch_predictions", "drift_report", "performance_report"
        )
    )
    - WITHOUT_UNIT_TESTS,
    partitions_def=DAILY_PARTITIONS,
    description="One day: ingest, validate, dbt, online features, batch scores, monitoring.",
)

# Slowly changing data: the entities' snapshot, the unpartitioned marts, the Feast registry.
reference_data = dg.define_asset_job(
    "reference_data",
    selection=dg.AssetSelection.assets(*REFERENCE_RAW_ASSETS, "feast_registry")
    | dg.AssetSelection.assets(dbt_models) - WITHOUT_UNIT_TESTS,
    description="Account holders, the unpartitioned dbt models and the applied Feast registry.",
)


def dataset_job(spec: DatasetSpec):
    """A dataset's own job: raw table, Feast, training set, models, registration, scores, drift."""
    return dg.define_asset_job(
        spec.name,
        selection=(
            dg.AssetSelection.groups(spec.name)
            # Its Feast objects applied before its training set is built, on a fresh folder too.
            | dg.AssetSelection.assets("feast_registry")
            # The dataset's marts and the dbt models upstream of them, as dbt selects them.
            | build_dbt_asset_selection(
                [dbt_models], " ".join(f"+{m}" for m in (spec.features_model, spec.labels_model))
            )
        )
        - WITHOUT_UNIT_TESTS,
        description=(
            f"Load and validate {spec.name}, build its marts and training set, train, gate and "
            "register its model, score the load and report its drift."
        ),
        # A daily dataset's job runs one day: its raw, scores and drift are partitioned by day.
        partitions_def=dataset_partitions(spec),
    )


DATASET_JOBS = [dataset_job(spec) for spec in discover()]

# A fresh training set, both model families, the gates against the champion, the registry.
retrain = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.assets("training_set")
    | dg.AssetSelection.groups("training", "evaluation", "registry"),
    description="Training set, LightGBM and PyTorch models, evaluation gates, registration.",
    # The instance's `gpu` limit counts run tags: one retraining holds the GPU at a time.
    tags={"gpu": "true"},
)

# Live traffic: the day's serving log as a table, the shadow model's report, drift of live features.
live_traffic = dg.define_asset_job(
    "live_traffic",
    selection=dg.AssetSelection.assets(
        "online_predictions", "shadow_report", "online_drift_report"
    ),
    partitions_def=DAILY_PARTITIONS,
    description="One day of served traffic: online predictions, shadow report, live drift.",
)

# A canary of the registered challenger; the canary sensor promotes it or rolls it back.
release = dg.define_asset_job(
    "release",
    selection=dg.AssetSelection.assets("canary_deployment"),
    description="Start a canary of the registered challenger (judged by canary_sensor).",
)

JOBS = [daily_pipeline, reference_data, *DATASET_JOBS, retrain, live_traffic, release]
