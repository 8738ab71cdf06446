"""The dbt project as assets: staging, intermediate and marts on DuckDB, marts landed as Parquet.

Daily models build one partition range per run (``--vars start_date/end_date``) and refuse to
run on a day whose raw data failed validation or was never validated: blocking checks only stop
the run they belong to, so this gate reads the recorded verdicts. dbt data tests arrive as asset
checks through dagster-dbt; dbt unit tests are reported as asset checks by ``dbt_unit_tests``.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, dbt_assets

from assets.partitions import DAILY_PARTITIONS
from keel.datasets.spec import discover
from orchestration.dbt import dbt_project
from orchestration.pools import dbt_pool
from orchestration.resources import KeelDbtCliResource, WarehouseResource

GROUP = "transformation"
DAILY_SELECTION = "tag:daily"
LANDING_SOURCE = "source.keel.landing.landed_activity"
# The warehouse pool on a DuckDB file, a pool of its own on a lake (orchestration.pools).
DBT_POOL = dbt_pool()


# A dataset's own dbt models sit in the dataset's group, next to its raw table and model.
DATASET_GROUPS = {model: spec.name for spec in discover() for model in spec.dbt_models}


class KeelDbtTranslator(DagsterDbtTranslator):
    """dbt models by dataset group; landed files feed every day (a file may hold any day)."""

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        return DATASET_GROUPS.get(dbt_resource_props.get("name"), GROUP)

    def get_partition_mapping(
        self, dbt_resource_props: Mapping[str, Any], dbt_parent_resource_props: Mapping[str, Any]
    ) -> dg.PartitionMapping | None:
        if dbt_parent_resource_props.get("unique_id") == LANDING_SOURCE:
            return dg.AllPartitionMapping()
        return None


TRANSLATOR = KeelDbtTranslator()


@dbt_assets(
    manifest=dbt_project.manifest_path,
    project=dbt_project,
    select=DAILY_SELECTION,
    partitions_def=DAILY_PARTITIONS,
    backfill_policy=dg.BackfillPolicy.single_run(),
    dagster_dbt_translator=TRANSLATOR,
    pool=DBT_POOL,
    name="daily_dbt_models",
)
def daily_dbt_models(
    context: dg.AssetExecutionContext, dbt: KeelDbtCliResource, warehouse: WarehouseResource
):
    """Daily dbt models for a range of days, gated on validation, then landed as Parquet."""
    from keel.ingestion import ACCOUNT_ACTIVITY, DEFAULT_LABELS
    from keel.marts import DAILY_EXPORTS, export_days
    from keel.validation import blocked_partitions

    days = list(context.partition_keys)
    with warehouse.connect() as connection:
        blocked = {
            f"{table.name}[{day}]": why
            for table in (ACCOUNT_ACTIVITY, DEFAULT_LABELS)
            for day, why in blocked_partitions(connection, table, days).items()
        }
    if blocked:
        raise dg.Failure(
            description=(
                f"{len(blocked)} raw partition(s) are blocked, so no features or labels are "
                "built for them: " + "; ".join(f"{k}: {v}" for k, v in sorted(blocked.items()))
            ),
            metadata={"blocked": dg.MetadataValue.json(blocked)},
        )
    variables = {"start_date": days[0], "end_date": days[-1]}
    invocation = dbt.cli_on(warehouse, ["build"], variables=variables, context=context)
    yield from invocation.stream()

    selected = {key.to_user_string() for key in context.selected_asset_keys}
    with warehouse.connect() as connection:
        for export in DAILY_EXPORTS:
            if export.model in selected:
                written = export_days(connection, export, warehouse.marts_dir, days)
                context.log.info(f"{export.model}: {sum(written.values())} rows as Parquet")


@dbt_assets(
    manifest=dbt_project.manifest_path,
    project=dbt_project,
    exclude=DAILY_SELECTION,
    dagster_dbt_translator=TRANSLATOR,
    pool=DBT_POOL,
    name="dbt_models",
)
def dbt_models(
    context: dg.AssetExecutionContext, dbt: KeelDbtCliResource, warehouse: WarehouseResource
):
    """Unpartitioned dbt models (accounts dimension, each dataset's marts), landed as Parquet."""
    from keel.marts import STATIC_EXPORTS, dataset_exports, export_table

    exports = [*STATIC_EXPORTS, *(e for spec in discover() for e in dataset_exports(spec))]

    invocation = dbt.cli_on(warehouse, ["build"], context=context)
    yield from invocation.stream()

    selected = {key.to_user_string() for key in context.selected_asset_keys}
    with warehouse.connect() as connection:
        for export in exports:
            if export.model in selected:
                rows = export_table(connection, export, warehouse.marts_dir)
                context.log.info(f"{export.model}: {rows} rows as Parquet")


def _unit_test_specs() -> list[dg.AssetCheckSpec]:
    manifest = json.loads(Path(dbt_project.manifest_path).read_text())
    return [
        dg.AssetCheckSpec(
            name=f"dbt_unit_{test['name']}",
            asset=dg.AssetKey(test["model"]),
            description=test.get("description") or f"dbt unit test {test['name']}",
        )
        for test in manifest.get("unit_tests", {}).values()
    ]


@dg.multi_asset_check(
    specs=_unit_test_specs(), pool=DBT_POOL, name="dbt_unit_tests", can_subset=True
)
def dbt_unit_tests(
    context: dg.AssetCheckExecutionContext, dbt: KeelDbtCliResource, warehouse: WarehouseResource
):
    """Run the dbt project's unit tests and report each as a check on the model it tests."""
    selected = [
        spec for spec in context.check_specs if spec.key in context.selected_asset_check_keys
    ]
    invocation = dbt.cli_on(warehouse, ["test", "--select", "test_type:unit"], raise_on_error=False)
    invocation.wait()
    if not (invocation.target_path / "run_results.json").exists():
        raise dg.Failure(f"dbt unit tests did not run; see {invocation.target_path}/dbt.log")
    results = {
        result["unique_id"].split(".")[-1]: result
        for result in invocation.get_artifact("run_results.json")["results"]
    }
    for spec in selected:
        result = results.get(spec.name.removeprefix("dbt_unit_"))
        status = result["status"] if result else "not run"
        yield dg.AssetCheckResult(
            asset_key=spec.asset_key,
            check_name=spec.name,
            passed=status == "pass",
            metadata={
                "status": dg.MetadataValue.text(status),
                "message": dg.MetadataValue.text((result or {}).get("message") or ""),
            },
        )


TRANSFORMATION_ASSETS = [daily_dbt_models, dbt_models]
TRANSFORMATION_CHECKS = [dbt_unit_tests]
