"""The feature store as assets: the applied Feast registry, the online store, training sets.

The maths lives in ``keel.features``; these wrappers pick the profile's store through
``FeatureStoreResource`` and report what a person checks first. Steps that write the Feast
registry or the online store share the ``feast`` pool: Feast's file registry and SQLite online
store take one writer at a time.
"""

import json
import tempfile
from datetime import date
from pathlib import Path

import dagster as dg
from dagster_dbt import get_asset_key_for_model
from pydantic import Field

from assets.partitions import DAILY_PARTITIONS
from assets.transformation import daily_dbt_models, dbt_models
from keel import schema
from keel.datasets.spec import DatasetSpec, discover
from orchestration.resources import ArtefactStore, FeatureStoreResource

GROUP = "features"
FEAST_POOL = "feast"

# The marts as dagster-dbt names them (its translator decides the keys, not this module).
FEATURES_MART = get_asset_key_for_model([daily_dbt_models], schema.FEATURES_MODEL)
LABELS_MART = get_asset_key_for_model([daily_dbt_models], schema.LABELS_MODEL)


class TrainingSetConfig(dg.Config):
    """How far back a training set reaches."""

    lookback_days: int = Field(
        default=365,
        ge=1,
        description="Days of labels, by event time, ending with the newest label; older label "
        "files are not read.",
    )


class DatasetTrainingSetConfig(dg.Config):
    """How far back a dataset's training set reaches: by default its whole history."""

    lookback_days: int = Field(
        default=100 * 365,
        ge=1,
        description="Days of labels, by event time, ending with the newest label.",
    )


@dg.asset(group_name=GROUP, kinds={"feast"}, pool=FEAST_POOL)
def feast_registry(feature_store: FeatureStoreResource) -> dg.MaterializeResult:
    """The Feast registry with every entity, source, feature view and service of feature_repo/."""
    from keel.features import apply_repo

    store = feature_store.store()
    result = apply_repo(store)
    metadata: dict[str, dg.MetadataValue] = {
        kind: dg.MetadataValue.json(names) for kind, names in result.applied.items()
    }
    metadata["objects"] = dg.MetadataValue.int(sum(map(len, result.applied.values())))
    metadata["deleted"] = dg.MetadataValue.json(result.deleted)
    metadata["changes"] = dg.MetadataValue.md(f"```\n{result.diff.strip() or 'no changes'}\n```")
    metadata["project"] = dg.MetadataValue.text(store.project)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    group_name=GROUP,
    kinds={"feast"},
    deps=[feast_registry, FEATURES_MART],
    partitions_def=DAILY_PARTITIONS,
    pool=FEAST_POOL,
)
def online_features(
    context: dg.AssetExecutionContext, feature_store: FeatureStoreResource
) -> dg.MaterializeResult:
    """The online store holding the newest daily account features, written one day at a time."""
    from keel.features import materialize_day

    day = date.fromisoformat(context.partition_key)
    result = materialize_day(feature_store.store(), day)
    metadata: dict[str, dg.MetadataValue] = {
        "feature_views": dg.MetadataValue.json(result.feature_views),
        "window_start": dg.MetadataValue.timestamp(result.start),
        "window_end": dg.MetadataValue.timestamp(result.end),
    }
    if None not in result.rows.values():
        metadata["rows"] = dg.MetadataValue.int(sum(result.rows.values()))
    return dg.MaterializeResult(metadata=metadata)


def _training_set(
    feature_store: FeatureStoreResource,
    artefacts: ArtefactStore,
    labels_mart: str,
    feature_service: str,
    entity_key: str,
    lookback_days: int,
    label: str = schema.LABEL,
    spec: DatasetSpec | None = None,
) -> dg.MaterializeResult:
    from keel.features import build_training_set, read_label_window

    store = feature_store.store()
    labels = read_label_window(f"{feature_store.marts.rstrip('/')}/{labels_mart}", lookback_days)
    extra: dict[str, dg.MetadataValue] = {}
    if spec is not None:
        labels, excluded = _complete_outcomes(spec, labels)
        extra["incomplete_outcomes_excluded"] = dg.MetadataValue.int(excluded)
    target = artefacts.path("training_sets", feature_service)
    if target.protocol in ("", "file", "local"):
        result = build_training_set(
            store, labels, Path(target.path), feature_service, entity_key, label
        )
        location = str(result.path)
    else:
        from keel.storage import publish, write_pointer

        with tempfile.TemporaryDirectory() as scratch:
            result = build_training_set(
                store, labels, Path(scratch), feature_service, entity_key, label
            )
            pointer = json.loads((Path(scratch) / "latest.json").read_text())
            # The set first, then the pointer that names it at its stored location.
            uploaded = publish(result.path, target.joinpath(result.path.name))
            write_pointer(target, {**pointer, "path": str(uploaded)})
        location = str(uploaded)
    return dg.MaterializeResult(
        metadata={
            "dataset_version": dg.MetadataValue.text(result.dataset_version),
            "path": dg.MetadataValue.path(location),
            "rows": dg.MetadataValue.int(result.rows),
            "label_rate": dg.MetadataValue.float(result.label_rate),
            "features": dg.MetadataValue.int(len(result.features)),
            "feature_service": dg.MetadataValue.text(result.feature_service),
            "first_event": dg.MetadataValue.timestamp(result.start),
            "last_event": dg.MetadataValue.timestamp(result.end),
            "lookback_days": dg.MetadataValue.int(lookback_days),
            **extra,
        }
    )


def _complete_outcomes(spec: DatasetSpec, labels):
    """The labels whose outcome is complete now, and how many were left out (not negatives)."""
    import pandas as pd
    import pyarrow as pa

    from keel.datasets.guards import complete_outcomes

    frame = labels.to_pandas()
    kept = complete_outcomes(spec, frame, pd.Timestamp.now(tz="UTC"))
    return pa.Table.from_pandas(kept, preserve_index=False), len(frame) - len(kept)


@dg.asset(
    group_name=GROUP, kinds={"feast", "parquet"}, deps=[feast_registry, FEATURES_MART, LABELS_MART]
)
def training_set(
    config: TrainingSetConfig, feature_store: FeatureStoreResource, artefacts: ArtefactStore
) -> dg.MaterializeResult:
    """The lookback's labels joined point-in-time to the feature service, named by content hash."""
    return _training_set(
        feature_store,
        artefacts,
        schema.LABELS_MART,
        schema.FEATURE_SERVICE,
        schema.ENTITY_KEY,
        config.lookback_days,
    )


def dataset_training_set(spec: DatasetSpec) -> dg.AssetsDefinition:
    """A dataset's labels joined point-in-time to its feature service, as an asset."""

    @dg.asset(
        key=dg.AssetKey([spec.name, "training_set"]),
        group_name=spec.name,
        kinds={"feast", "parquet"},
        deps=[
            feast_registry,
            get_asset_key_for_model([dbt_models], spec.features_model),
            get_asset_key_for_model([dbt_models], spec.labels_model),
        ],
        description=(
            f"The {spec.name} labels joined point-in-time to {spec.feature_service}, "
            "named by content hash."
        ),
    )
    def _training_set_asset(
        config: DatasetTrainingSetConfig,
        feature_store: FeatureStoreResource,
        artefacts: ArtefactStore,
    ) -> dg.MaterializeResult:
        return _training_set(
            feature_store,
            artefacts,
            spec.labels_mart,
            spec.feature_service,
            spec.entity_key,
            config.lookback_days,
            spec.label.column,
            spec,
        )

    return _training_set_asset


def dataset_guard_check(spec: DatasetSpec, asset: dg.AssetsDefinition) -> dg.AssetChecksDefinition:
    """A blocking check of a dataset's newest training set: leakage, then its composition."""

    @dg.asset_check(
        asset=asset,
        name="dataset_guards",
        blocking=True,
        description=(
            "Fails on a declared leakage column among the features, a feature row stamped after "
            "the label's outcome began, or a period whose rows, label rate or key feature means "
            "leave the bounds in dataset.yaml."
        ),
    )
    def _check(
        feature_store: FeatureStoreResource, artefacts: ArtefactStore
    ) -> dg.AssetCheckResult:
        import json

        import pandas as pd

        from keel.datasets.guards import guard_training_set
        from keel.reporting import markdown_table

        folder = artefacts.path("training_sets", spec.feature_service)
        pointer = json.loads(folder.joinpath("latest.json").read_text())
        training = pd.read_parquet(pointer["path"])
        mart = f"{feature_store.marts.rstrip('/')}/{spec.features_mart}"
        times = pd.read_parquet(mart, columns=[spec.entity_key, spec.event_time])
        served = [c for c in training.columns if c not in spec.label_columns]
        result = guard_training_set(spec, training, served, times)
        columns = list(dict.fromkeys(k for period in result.periods for k in period))
        return dg.AssetCheckResult(
            passed=result.passed,
            description="; ".join(result.failures) or "no leakage; every period within bounds",
            metadata={
                "failures": dg.MetadataValue.json(result.failures),
                "periods": dg.MetadataValue.md(
                    markdown_table(
                        columns, [[p.get(c, "") for c in columns] for p in result.periods]
                    )
                ),
            },
        )

    return _check


DATASET_TRAINING_SETS = [dataset_training_set(spec) for spec in discover()]
DATASET_GUARDS = [
    dataset_guard_check(spec, asset)
    for spec, asset in zip(discover(), DATASET_TRAINING_SETS, strict=True)
]
