import os
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow.parquet as pq
import pytest

from assets.ingestion import (
    INGESTION_ASSETS,
    INGESTION_CHECKS,
    raw_account_activity,
    raw_account_holders,
    raw_default_labels,
)
from assets.transformation import TRANSFORMATION_ASSETS, TRANSFORMATION_CHECKS, dbt_models
from keel import schema
from keel.datasets.spec import DATASETS_DIR, load_spec
from keel.settings import DBT_PROJECT_DIR, KeelPaths
from orchestration.resources import DriftScenarioConfig, SourcesResource

START = date(2026, 1, 1)
TAIWAN = load_spec(DATASETS_DIR / "taiwan_credit")


def _definitions(resources) -> dg.Definitions:
    return dg.Definitions(
        assets=[*INGESTION_ASSETS, *TRANSFORMATION_ASSETS],
        asset_checks=[*INGESTION_CHECKS, *TRANSFORMATION_CHECKS],
        jobs=[
            dg.define_asset_job(
                "static",
                # Every unpartitioned model; a dataset's build empty until its file is loaded.
                selection=dg.AssetSelection.assets(raw_account_holders, dbt_models),
            ),
            dg.define_asset_job(
                "daily",
                selection=dg.AssetSelection.assets(raw_account_activity, raw_default_labels)
                | dg.AssetSelection.tag("dagster/kind/dbt", "").downstream()
                & dg.AssetSelection.assets(
                    "stg_generator__account_activity",
                    "stg_landing__account_activity",
                    "int_account_activity_unioned",
                    "stg_generator__default_labels",
                    "fct_account_features_daily",
                    "fct_default_labels",
                ),
            ),
            dg.define_asset_job(
                "features_only", selection=dg.AssetSelection.assets("fct_account_features_daily")
            ),
            # The dataset's group: its raw table and its own dbt models.
            dg.define_asset_job("taiwan", selection=dg.AssetSelection.groups(TAIWAN.name)),
        ],
        resources=resources,
    )


def _run(defs, job, first=None, last=None, instance=None, raise_on_error=True):
    tags = (
        {
            "dagster/asset_partition_range_start": first.isoformat(),
            "dagster/asset_partition_range_end": last.isoformat(),
        }
        if first
        else {}
    )
    return defs.resolve_job_def(job).execute_in_process(
        tags=tags, instance=instance, raise_on_error=raise_on_error
    )


def _features_of(warehouse: Path, day: date):
    with duckdb.connect(str(warehouse), read_only=True) as connection:
        return connection.execute(
            f"""select account_id, {", ".join(schema.DAILY_NUMERIC_FEATURES)}
                from fct_account_features_daily where feature_date = ? order by account_id""",
            [day],
        ).fetchall()


@pytest.fixture(scope="module")
def built_world(tmp_path_factory):
    """Forty generated days built through Dagster: twenty first, then twenty more."""
    from orchestration.profiles import resources_for

    home = KeelPaths(tmp_path_factory.mktemp("world") / "keel-home").ensure()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEEL_HOME", str(home.home))
        patch.setenv("KEEL_PROFILE", "local")
        sources = SourcesResource(
            generated_dir=str(home.generated),
            landing_dir=str(home.landing),
            accounts=300,
            late_share=0.02,
        )
        resources = {**resources_for("local"), "sources": sources}
        defs = _definitions(resources)
        instance = dg.DagsterInstance.ephemeral()
        assert _run(defs, "static", instance=instance).success
        assert _run(defs, "daily", START, START + timedelta(days=19), instance).success
        day_ten_before = _features_of(home.warehouse, START + timedelta(days=9))
        later = _run(
            defs, "daily", START + timedelta(days=20), START + timedelta(days=39), instance
        )
        assert later.success
        yield {
            "home": home,
            "defs": defs,
            "instance": instance,
            "day_ten_before": day_ten_before,
            "later_run": later,
        }


def test_features_of_a_day_never_change_when_later_days_arrive(built_world):
    before = built_world["day_ten_before"]
    assert len(before) > 250
    assert _features_of(built_world["home"].warehouse, START + timedelta(days=9)) == before
    checks = {
        e.check_name: e.passed for e in built_world["later_run"].get_asset_check_evaluations()
    }
    assert checks and all(checks.values()), checks


def test_marts_land_as_parquet_in_the_feature_store_contract(built_world):
    marts = built_world["home"].marts
    features = pq.read_table(marts / schema.FEATURES_MART / "2026-02-09.parquet")
    assert features.column_names == [
        schema.ENTITY_KEY,
        schema.EVENT_TIMESTAMP,
        schema.CREATED_TIMESTAMP,
        *schema.DAILY_FEATURES,
    ]
    assert str(features.schema.field(schema.EVENT_TIMESTAMP).type) == "timestamp[us, tz=UTC]"
    stamps = features.column(schema.EVENT_TIMESTAMP).to_pylist()
    assert {s.isoformat() for s in stamps} == {"2026-02-10T00:00:00+00:00"}
    assert len(list((marts / schema.FEATURES_MART).glob("*.parquet"))) == 40

    labels = pq.read_table(marts / schema.LABELS_MART / "2026-02-09.parquet").to_pandas()
    assert len(labels) == 10  # 300 accounts, one statement cycle in thirty
    delay = labels[schema.LABEL_TIMESTAMP] - labels[schema.EVENT_TIMESTAMP]
    assert (delay == timedelta(days=30)).all()
    assert set(labels.columns) >= {schema.LABEL, *schema.PROTECTED_ATTRIBUTES}
    assert (marts / schema.ACCOUNTS_MART).exists()


def test_a_blocked_day_stops_downstream_in_the_same_run_and_in_later_runs(
    data_resources, small_sources, keel_home
):
    bad_day = START + timedelta(days=2)
    sources = SourcesResource(
        **{
            **small_sources.model_dump(),
            "scenarios": [
                DriftScenarioConfig(kind="malformed", start=bad_day.isoformat(), strength=0.3)
            ],
        }
    )
    defs = _definitions({**data_resources, "sources": sources})
    instance = dg.DagsterInstance.ephemeral()
    assert _run(defs, "static", instance=instance).success

    same_run = _run(defs, "daily", bad_day, bad_day, instance, raise_on_error=False)
    assert not same_run.success
    built = {m.asset_key.to_user_string() for m in same_run.get_asset_materialization_events()}
    assert "fct_account_features_daily" not in built
    assert not (keel_home.marts / schema.FEATURES_MART / f"{bad_day}.parquet").exists()

    later_run = _run(defs, "features_only", bad_day, bad_day, instance, raise_on_error=False)
    assert not later_run.success
    failure = next(e for e in later_run.all_events if e.event_type_value == "STEP_FAILURE")
    assert "failed validation" in str(failure.event_specific_data.error)
    assert not (keel_home.marts / schema.FEATURES_MART / f"{bad_day}.parquet").exists()


def test_dbt_build_works_on_its_own_in_the_project_folder(built_world):
    result = subprocess.run(
        [str(Path(sys.executable).with_name("dbt")), "build", "--quiet"],
        cwd=DBT_PROJECT_DIR,
        env={**os.environ, "KEEL_WAREHOUSE": str(built_world["home"].warehouse)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dbt_unit_tests_report_as_asset_checks(built_world):
    unit_job = dg.define_asset_job(
        "unit", selection=dg.AssetSelection.checks(*TRANSFORMATION_CHECKS)
    )
    defs = dg.Definitions.merge(built_world["defs"], dg.Definitions(jobs=[unit_job]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEEL_HOME", str(built_world["home"].home))
        result = _run(defs, "unit")
    evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evaluations == {
        "dbt_unit_rolling_windows_use_only_the_past": True,
        "dbt_unit_labels_are_stamped_at_the_end_of_their_days": True,
        "dbt_unit_taiwan_delay_window_looks_back_three_months": True,
    }


def test_taiwan_data_loads_and_its_features_use_no_month_after_the_label(data_resources, keel_home):
    result = _run(_definitions(data_resources), "taiwan")
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["great_expectations"]
    features = pq.read_table(keel_home.marts / TAIWAN.features_mart).to_pandas()
    labels = pq.read_table(keel_home.marts / TAIWAN.labels_mart).to_pandas()
    assert len(labels) == 30_000 and len(features) == 180_000
    assert labels[TAIWAN.label.column].mean() == pytest.approx(0.2212, abs=1e-4)
    # Every protected attribute reaches the labels, as named groups the fairness report prints.
    assert set(TAIWAN.protected_attributes) <= set(labels.columns)
    assert set(labels["marriage"]) <= {"married", "single", "other", "unknown"}
    assert labels["education"].value_counts().idxmax() == "university"
    merged = features.merge(
        labels[[TAIWAN.entity_key, schema.EVENT_TIMESTAMP]],
        on=TAIWAN.entity_key,
        suffixes=("", "_label"),
    )
    assert (merged[schema.EVENT_TIMESTAMP] < merged[f"{schema.EVENT_TIMESTAMP}_label"]).all()
    assert features[schema.EVENT_TIMESTAMP].max().isoformat() == "2005-09-30T00:00:00+00:00"


def test_dbt_resource_skips_the_version_subprocess_and_the_unused_adapter():
    import importlib.metadata

    from dagster_dbt import DbtCliResource
    from packaging.version import Version

    from orchestration.profiles import dbt_resource

    # The hooks overridden must still be dagster-dbt's: an upgrade that renames them fails here.
    assert {"_cli_version", "_initialize_dbt_core_adapter"} <= set(vars(DbtCliResource))
    resource = dbt_resource()
    assert resource._cli_version == Version(importlib.metadata.version("dbt-core"))
    assert resource._initialize_dbt_core_adapter(["build"]) is None
