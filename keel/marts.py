"""Landing the dbt marts as Parquet for Feast and other readers, one file per day, atomically."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import duckdb

from keel import schema
from keel.datasets.spec import DatasetSpec
from keel.sql import quote_identifier, quote_literal
from keel.storage import is_local, local_path, location, publish, scratch_folder


@dataclass(frozen=True)
class MartExport:
    """A dbt model and the Parquet layout it lands in under the marts folder."""

    model: str
    target: str
    columns: tuple[str, ...]
    partition_column: str | None = None


FEATURES_EXPORT = MartExport(
    schema.FEATURES_MODEL,
    schema.FEATURES_MART,
    (schema.ENTITY_KEY, schema.EVENT_TIMESTAMP, schema.CREATED_TIMESTAMP, *schema.DAILY_FEATURES),
    partition_column=schema.FEATURES_DAY,
)
LABELS_EXPORT = MartExport(
    schema.LABELS_MODEL,
    schema.LABELS_MART,
    (
        schema.ENTITY_KEY,
        schema.EVENT_TIMESTAMP,
        schema.LABEL_TIMESTAMP,
        schema.LABEL,
        *schema.PROTECTED_ATTRIBUTES,
    ),
    partition_column=schema.LABELS_DAY,
)
ACCOUNTS_EXPORT = MartExport(schema.ENTITIES_MODEL, schema.ACCOUNTS_MART, schema.ENTITY_COLUMNS)
DAILY_EXPORTS = (FEATURES_EXPORT, LABELS_EXPORT)
STATIC_EXPORTS = (ACCOUNTS_EXPORT,)


def dataset_exports(spec: DatasetSpec) -> tuple[MartExport, MartExport]:
    """A dataset's features and labels marts, each landed whole as one Parquet file."""
    features = MartExport(
        spec.features_model,
        spec.features_mart,
        (spec.entity_key, spec.event_time, schema.CREATED_TIMESTAMP, *spec.features),
    )
    return features, MartExport(spec.labels_model, spec.labels_mart, spec.label_columns)


def _columns(export: MartExport) -> str:
    return ", ".join(quote_identifier(c) for c in export.columns)


# Days written by one COPY: each day keeps an open Parquet writer that buffers a row group, so
# a 100-day backfill in one COPY held about 2 GB; 30 days hold a third of that.
DAYS_PER_COPY = 30


def export_days(
    connection: duckdb.DuckDBPyConnection, export: MartExport, marts: str | Path, days: list[str]
) -> dict[str, int]:
    """Write ``<marts>/<target>/<day>.parquet`` for each day; returns rows per day written.

    ``marts`` is a folder or an object-store URL (keel.storage). A few scans write the days
    into a scratch folder of this writer's own; each file then replaces its predecessor whole
    (a rename, or one upload), and a day left without rows loses its stale file.
    """
    folder = location(marts, export.target)
    if is_local(folder):
        local_path(folder).mkdir(parents=True, exist_ok=True)
    ordered = sorted(days)
    day_column = quote_identifier(export.partition_column)
    with scratch_folder(location(marts)) as scratch:
        connection.execute("set timezone = 'UTC'")
        for first in range(0, len(ordered), DAYS_PER_COPY):
            chunk = ordered[first : first + DAYS_PER_COPY]
            connection.execute(
                f"""copy (
                        select {_columns(export)}, strftime({day_column}, '%Y-%m-%d') as __day
                        from {quote_identifier(export.model)}
                        -- The range lets DuckDB skip row groups outside the days by min/max.
                        where {day_column} between ? and ?
                            and strftime({day_column}, '%Y-%m-%d') in (select unnest(?::varchar[]))
                    ) to {quote_literal(scratch)} (format parquet, partition_by (__day), append)""",
                [chunk[0], chunk[-1], chunk],
            )
        written = {}
        for day in ordered:
            produced = sorted((scratch / f"__day={day}").glob("*.parquet"))
            target = folder / f"{day}.parquet"
            if not produced:
                _remove(target)
                continue
            if len(produced) > 1:
                # DuckDB starts a new file when it has too many open: merge them into one.
                merged = scratch / f"{day}.parquet"
                listed = ", ".join(quote_literal(path) for path in produced)
                connection.execute(
                    f"copy (select * from read_parquet([{listed}], "
                    f"hive_partitioning = false)) to {quote_literal(merged)} (format parquet)"
                )
                produced = [merged]
            written[day] = _row_count(connection, produced[0])
            publish(produced[0], target)
        return written


def export_table(
    connection: duckdb.DuckDBPyConnection, export: MartExport, marts: str | Path
) -> int:
    """Write a whole model to ``<marts>/<target>`` (a single Parquet file), atomically."""
    target = location(marts, export.target)
    connection.execute("set timezone = 'UTC'")
    with scratch_folder(location(marts)) as scratch:
        temporary = scratch / target.name
        connection.execute(
            f"copy (select {_columns(export)} from {quote_identifier(export.model)}) "
            f"to {quote_literal(temporary)} (format parquet)"
        )
        rows = _row_count(connection, temporary)
        publish(temporary, target)
    return rows


def _remove(target) -> None:
    with contextlib.suppress(FileNotFoundError):
        target.unlink()


def _row_count(connection: duckdb.DuckDBPyConnection, path: Path) -> int:
    return int(
        connection.execute(f"select count(*) from read_parquet({quote_literal(path)})").fetchone()[
            0
        ]
    )
