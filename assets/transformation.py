"""The dbt project as assets: staging, intermediate and marts on DuckDB, marts landed as Parquet.

Daily models build one partition range per run (``--vars start_date/end_date``) and refuse to
run on a day whose raw data failed validation or was never validated: blocking checks only stop
the run they belong to, so this gate reads the recorded verdicts. dbt data tests arrive as asset
checks through dagster-dbt; dbt unit tests are reported as asset checks by ``dbt_unit_tests``.
"""

import importlib.metadata
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, dbt_assets
from packaging.version import Version

from assets.partitions import DAILY_PARTITIONS
from orchestration.dbt import DBT_EXECUTABLE, dbt_project
from orchestration.resources import WarehouseResource

GROUP = "transformation"
DAILY_SELECTION = "tag:daily"
LANDING_SOURCE = "source.keel.landing.landed_activity"


class KeelDbtTranslator(DagsterDbtTranslator):
    """All dbt models in one group; landed files feed every day (a file may hold any day)."""

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        return GROUP

    def get_partition_mapping(
        self, dbt_resource_props: Mapping[str, Any], dbt_parent_resource_props: Mapping[str, Any]
    ) -> dg.PartitionMapping | None:
        if dbt_parent_resource_props.get("unique_id") == LANDING_SOURCE:
            return dg.AllPartitionMapping()
        return None


TRANSLATOR = KeelDbtTranslator()


@contextmanager
def _dbt_environment(warehouse: WarehouseResource) -> Iterator[None]:
    """Environment of one dbt invocation (dagster-dbt copies os.environ when it starts dbt)."""
    settings = {
        # profiles.yml reads KEEL_WAREHOUSE: dbt and the Python steps write the same database.
        "KEEL_WAREHOUSE": warehouse.database,
        # Run a test only when all the models it reads are selected: building the accounts
        # dimension must not run the labels' relationship test before the labels exist.
        "DBT_INDIRECT_SELECTION": "cautious",
    }
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dbt_assets(
    manifest=dbt_project.manifest_path,
    project=dbt_project,
    select=DAILY_SELECTION,
    partitions_def=DAILY_PARTITIONS,
    backfill_policy=dg.BackfillPolicy.single_run(),
    dagster_dbt_translator=TRANSLATOR,
    pool="warehouse",
    name="daily_dbt_models",
)
def daily_dbt_models(
    context: dg.AssetExecutionContext, dbt: DbtCliResource, warehouse: WarehouseResource
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
    with _dbt_environment(warehouse):
        invocation = dbt.cli(["build", "--vars", json.dumps(variables)], context=context)
    yield from invocation.stream()

    selected = {key.to_user_string() for key in context.selected_asset_keys}
    with warehouse.connect() as connection:
        for export in DAILY_EXPORTS:
            if export.model in selected:
                written = export_days(connection, export, Path(warehouse.marts_dir), days)
                context.log.info(f"{export.model}: {sum(written.values())} rows as Parquet")


@dbt_assets(
    manifest=dbt_project.manifest_path,
    project=dbt_project,
    exclude=DAILY_SELECTION,
    dagster_dbt_translator=TRANSLATOR,
    pool="warehouse",
    name="dbt_models",
)
def dbt_models(
    context: dg.AssetExecutionContext, dbt: DbtCliResource, warehouse: WarehouseResource
):
    """Unpartitioned dbt models (accounts dimension, Taiwan marts), landed as Parquet."""
    from keel.marts import STATIC_EXPORTS, export_table

    with _dbt_environment(warehouse):
        invocation = dbt.cli(["build"], context=context)
    yield from invocation.stream()

    selected = {key.to_user_string() for key in context.selected_asset_keys}
    with warehouse.connect() as connection:
        for export in STATIC_EXPORTS:
            if export.model in selected:
                rows = export_table(connection, export, Path(warehouse.marts_dir))
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
    specs=_unit_test_specs(), pool="warehouse", name="dbt_unit_tests", can_subset=True
)
def dbt_unit_tests(
    context: dg.AssetCheckExecutionContext, dbt: DbtCliResource, warehouse: WarehouseResource
):
    """Run the dbt project's unit tests and report each as a check on the model it tests."""
    selected = [
        spec for spec in context.check_specs if spec.key in context.selected_asset_check_keys
    ]
    with _dbt_environment(warehouse):
        invocation = dbt.cli(["test", "--select", "test_type:unit"], raise_on_error=False)
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


class KeelDbtCliResource(DbtCliResource):
    """dagster-dbt's CLI resource without two start-up costs it pays on every dbt step.

    Before each invocation dagster-dbt runs ``dbt --version`` in a subprocess and loads dbt's
    macros in-process for an adapter that only ``fetch_row_counts`` and
    ``fetch_column_metadata`` use: about 8 seconds a step on two cores. Our dbt executable is
    the one of this environment, so its version is the installed dbt-core's, and no asset
    here fetches row counts or column metadata through the adapter.
    """

    @cached_property
    def _cli_version(self) -> Version:
        return Version(importlib.metadata.version("dbt-core"))

    def _initialize_dbt_core_adapter(self, args: Sequence[str]) -> None:
        return None


def dbt_resource() -> DbtCliResource:
    """The dbt CLI of this environment, on the project in ``dbt_project/``."""
    return KeelDbtCliResource(project_dir=dbt_project, dbt_executable=DBT_EXECUTABLE)


TRANSFORMATION_ASSETS = [daily_dbt_models, dbt_models]
TRANSFORMATION_CHECKS = [dbt_unit_tests]
