"""Raw data in: generator extracts, landed files and dataset files, checked by Great Expectations.

Each raw asset loads its partitions as delivered (keel.ingestion); its blocking check runs the
Great Expectations suite on every partition just loaded, quarantines the bad rows and records
the verdict (keel.validation). Downstream assets of the same run wait for the check; later
runs read the recorded verdict.
"""

from datetime import date
from pathlib import Path

import dagster as dg

from assets.partitions import DAILY_PARTITIONS
from keel.datasets.spec import DatasetSpec, discover, loop_dataset
from orchestration.pools import WAREHOUSE_POOL
from orchestration.resources import SourcesResource, WarehouseResource

GROUP = "ingestion"
LANDING_PARTITIONS = dg.DynamicPartitionsDefinition(name="landing_files")
LANDING_SUFFIXES = (".csv", ".parquet", ".jsonl")
SNAPSHOT = "snapshot"


# The generator's daily extracts: a backfill loads its whole range in one run, one transaction
# per group of files; raw loads share the `warehouse` pool (orchestration.pools).
DAILY_EXTRACT = {
    "group_name": GROUP,
    "kinds": {"python", "duckdb"},
    "partitions_def": DAILY_PARTITIONS,
    "backfill_policy": dg.BackfillPolicy.single_run(),
    "pool": WAREHOUSE_POOL,
    "code_version": "1",
}


def _loaded(tables: dict[str, int], source: str) -> dg.MaterializeResult:
    return dg.MaterializeResult(
        metadata={
            "rows": dg.MetadataValue.int(sum(tables.values())),
            "partitions": dg.MetadataValue.int(len(tables)),
            "source": dg.MetadataValue.text(source),
        }
    )


@dg.asset(
    group_name=GROUP,
    kinds={"python", "duckdb"},
    pool=WAREHOUSE_POOL,
    code_version="1",
)
def raw_account_holders(sources: SourcesResource, warehouse: WarehouseResource):
    """Snapshot of account holders (protected attributes included) from the core system."""
    from keel.generator import generate_account_holders
    from keel.ingestion import ACCOUNT_HOLDERS, load_partition

    extract = generate_account_holders(sources.generator_config(), Path(sources.generated_dir))
    with warehouse.connect() as connection:
        rows = load_partition(connection, ACCOUNT_HOLDERS, SNAPSHOT, extract)
    return _loaded({SNAPSHOT: rows}, str(extract))


def _load_generated_days(
    context: dg.AssetExecutionContext,
    sources: SourcesResource,
    warehouse: WarehouseResource,
    extract: str,
) -> dict[str, int]:
    from keel.generator import generate_day
    from keel.ingestion import ACCOUNT_ACTIVITY, DEFAULT_LABELS, load_partitions

    table = {"activity": ACCOUNT_ACTIVITY, "labels": DEFAULT_LABELS}[extract]
    config = sources.generator_config()
    extracts = {}
    for key in context.partition_keys:
        day = generate_day(
            config, date.fromisoformat(key), Path(sources.generated_dir), sources.landing_dir
        )
        extracts[key] = getattr(day, extract)
    with warehouse.connect() as connection:
        rows = load_partitions(connection, table, extracts)
    context.log.info(f"{table.qualified}: {sum(rows.values())} rows in {len(rows)} partitions")
    return rows


@dg.asset(**DAILY_EXTRACT)
def raw_account_activity(
    context: dg.AssetExecutionContext, sources: SourcesResource, warehouse: WarehouseResource
):
    """One row per account per day from the core system's daily extract, as delivered."""
    rows = _load_generated_days(context, sources, warehouse, "activity")
    return _loaded(rows, sources.generated_dir)


@dg.asset(**DAILY_EXTRACT)
def raw_default_labels(
    context: dg.AssetExecutionContext, sources: SourcesResource, warehouse: WarehouseResource
):
    """Default outcomes that arrived on each day (they describe accounts observed earlier)."""
    rows = _load_generated_days(context, sources, warehouse, "labels")
    return _loaded(rows, sources.generated_dir)


@dg.asset(
    group_name=GROUP,
    kinds={"python", "duckdb"},
    partitions_def=LANDING_PARTITIONS,
    pool=WAREHOUSE_POOL,
    code_version="1",
)
def raw_landed_activity(
    context: dg.AssetExecutionContext, sources: SourcesResource, warehouse: WarehouseResource
):
    """Activity records from files dropped into the landing folder (CSV, Parquet, JSON lines)."""
    from keel.ingestion import LANDED_ACTIVITY, landing_file, load_partition
    from keel.storage import duckdb_object_store, is_local

    rows = {}
    with warehouse.connect() as connection:
        if not is_local(sources.landing_dir):
            # The landing folder is on an object store: DuckDB reads the file where it lies.
            duckdb_object_store(connection)
        for key in context.partition_keys:
            source = landing_file(sources.landing_dir, key)
            rows[key] = load_partition(connection, LANDED_ACTIVITY, key, source)
    return _loaded(rows, sources.landing_dir)


def dataset_raw_asset(spec: DatasetSpec) -> dg.AssetsDefinition:
    """The raw table of a dataset with a source file of its own, loaded whole as one snapshot."""

    @dg.asset(
        key=dg.AssetKey([spec.name, "raw"]),
        group_name=spec.name,
        kinds={"python", "duckdb"},
        pool=WAREHOUSE_POOL,
        code_version="1",
        description=f"{spec.description} As delivered, checksum verified.",
    )
    def _raw(warehouse: WarehouseResource):
        from keel.datasets.spec import SpecError
        from keel.ingestion import load_dataset_file

        try:
            with warehouse.connect() as connection:
                rows = load_dataset_file(connection, spec)
        except SpecError as error:
            raise dg.Failure(str(error)) from error
        return _loaded({SNAPSHOT: rows}, str(spec.source_file()))

    return _raw


def _checked_partitions(context: dg.AssetCheckExecutionContext) -> list[str]:
    run = context.op_execution_context
    if run.has_partition_key or run.has_partition_key_range:
        return list(run.partition_keys)
    return [SNAPSHOT]


def _verdict_table(verdicts) -> str:
    from keel.reporting import markdown_table

    return markdown_table(
        ["partition", "raw", "clean", "quarantined", "bad share", "passed", "reasons"],
        [
            [
                v.partition,
                v.raw_rows,
                v.clean_rows,
                v.quarantined_rows,
                f"{v.bad_share:.2%}",
                "yes" if v.passed else "**no**",
                v.summary(),
            ]
            for v in verdicts
        ],
    )


def validation_check(asset: dg.AssetsDefinition, table_name: str) -> dg.AssetChecksDefinition:
    """A blocking Great Expectations check for every partition of ``asset`` a run loads."""

    @dg.asset_check(
        asset=asset,
        name="great_expectations",
        blocking=True,
        pool=WAREHOUSE_POOL,
        description=(
            f"Great Expectations suite raw_{table_name}: bad rows go to quarantine.{table_name}; "
            "fails when a partition's bad share exceeds the configured limit."
        ),
    )
    def _check(
        context: dg.AssetCheckExecutionContext,
        sources: SourcesResource,
        warehouse: WarehouseResource,
    ) -> dg.AssetCheckResult:
        from keel.ingestion import raw_table
        from keel.validation import validate_partitions

        table = raw_table(table_name)
        with warehouse.connect() as connection:
            verdicts = validate_partitions(
                connection, table, _checked_partitions(context), sources.max_bad_share
            )
        failed = [v.partition for v in verdicts if not v.passed]
        why = {v.partition: v.partition_reason for v in verdicts if v.partition_reason}
        reasons: dict[str, int] = {}
        for v in verdicts:
            for reason, count in v.reasons.items():
                reasons[reason] = reasons.get(reason, 0) + count
        return dg.AssetCheckResult(
            passed=not failed,
            description=(
                "blocked partitions: "
                + ", ".join(f"{p} ({why[p]})" if p in why else p for p in failed)
                if failed
                else "every partition passed"
            ),
            metadata={
                "raw_rows": dg.MetadataValue.int(sum(v.raw_rows for v in verdicts)),
                "clean_rows": dg.MetadataValue.int(sum(v.clean_rows for v in verdicts)),
                "quarantined_rows": dg.MetadataValue.int(sum(v.quarantined_rows for v in verdicts)),
                "max_bad_share": dg.MetadataValue.float(max(v.bad_share for v in verdicts)),
                "allowed_bad_share": dg.MetadataValue.float(sources.max_bad_share),
                "quarantine_reasons": dg.MetadataValue.json(reasons),
                "partition_reasons": dg.MetadataValue.json(why),
                "failed_partitions": dg.MetadataValue.json(failed),
                "partitions": dg.MetadataValue.md(_verdict_table(verdicts)),
            },
        )

    return _check


# The loop dataset's raw assets: loaded per day, loaded whole, loaded per landed file.
DAILY_RAW_ASSETS = [raw_account_activity, raw_default_labels]
REFERENCE_RAW_ASSETS = [raw_account_holders]
LANDING_ASSET = raw_landed_activity
INGESTION_ASSETS = [*REFERENCE_RAW_ASSETS, *DAILY_RAW_ASSETS, LANDING_ASSET]
# Each checked against the rules its dataset.yaml declares for its table.
_LOOP = loop_dataset()
INGESTION_CHECKS = [
    validation_check(raw_account_holders, _LOOP.raw_table_of("entities").name),
    validation_check(raw_account_activity, _LOOP.raw_table),
    validation_check(raw_default_labels, _LOOP.raw_table_of("labels").name),
    validation_check(raw_landed_activity, _LOOP.raw_table_of("landing").name),
]
FILE_DATASETS = [spec for spec in discover() if spec.source.kind == "file"]
DATASET_RAW_ASSETS = {spec.name: dataset_raw_asset(spec) for spec in FILE_DATASETS}
INGESTION_ASSETS += list(DATASET_RAW_ASSETS.values())
INGESTION_CHECKS += [
    validation_check(DATASET_RAW_ASSETS[spec.name], spec.raw_table) for spec in FILE_DATASETS
]
