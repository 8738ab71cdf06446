"""Validating raw partitions with Great Expectations; bad rows go to quarantine with a reason.

Each raw table has an expectation suite, built from the rules and column types its dataset's
``dataset.yaml`` declares (``keel.datasets.rules``). Every row-level expectation carries a
reason code in its ``meta``; Great Expectations reports the failing rows by their
``_row_number``, and those rows are copied to the table's quarantine with the first reason by
priority (``REASON_PRIORITY``) and the full list.
The partition's verdict (row counts, bad share, passed or not) lands in
``validation.partition_verdicts`` in the same transaction. Downstream readers (dbt staging, the
Dagster gate) only take partitions whose latest verdict passed, so a failed partition stays
blocked in every later run, not only in the run whose check failed.

``raw rows = clean rows + quarantined rows`` holds for every partition by construction: clean
rows are exactly the raw rows that are not in quarantine.
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pandas as pd

from keel.datasets.rules import COLUMN_TYPES, REASON_PRIORITY
from keel.datasets.rules import Rule as SpecRule
from keel.datasets.spec import DatasetSpec, discover, loop_dataset
from keel.ingestion import VERDICTS_TABLE, RawTable, dataset_table, ensure_schemas
from keel.lake import in_transaction

UNIQUENESS = ("expect_compound_columns_to_be_unique", "expect_column_values_to_be_unique")
# The reason code of a partition that has no rows at all where rows are expected.
EMPTY_FILE = "empty_file"
EMPTY_FILE_MESSAGE = "the source file holds no rows"
# Great Expectations runs in pandas: a batch of about a million rows keeps its per-expectation
# overhead small without holding a whole backfill in memory.
BATCH_ROWS = 1_000_000
# Batches validated at once, each in its own thread and its own ephemeral GE context: pandas
# and NumPy release the GIL for much of the work (10 million rows: 29 s on one thread, 22 s
# on two).
VALIDATION_THREADS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class Rule:
    """One expectation on one column, and the reason code of the rows it rejects."""

    reason: str
    kind: str
    column: str | tuple[str, ...]
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    """The expectations of one raw table.

    Raw columns are text. Before validation the warehouse parses each typed column with
    ``try_cast``: ``<column>__value`` holds the value and ``<column>__parses`` says whether the
    text was a valid value of its type, so that a wrong type is caught by an expectation on
    that flag and range checks run on real numbers.
    """

    table: RawTable
    rules: tuple[Rule, ...]
    types: dict[str, str] = field(default_factory=dict)
    partition_column: str | None = None
    # Labels arrive 30 days late: the first month has none, and that is not an error.
    allow_empty: bool = False

    def all_rules(self) -> tuple[Rule, ...]:
        parses = tuple(Rule("wrong_type", "parses", column) for column in self.types)
        in_partition = (
            (Rule("wrong_partition", "in_partition", self.partition_column),)
            if self.partition_column
            else ()
        )
        return self.rules + parses + in_partition


def _value(column: str) -> str:
    return f"{column}__value"


def _validated(column: str, suite: Suite) -> str:
    """Typed columns are validated through their parsed value.

    An unparsable text is null once parsed, so it fails ``not_null`` too, but it is reported as
    a wrong type, which comes first in ``REASON_PRIORITY``.
    """
    return _value(column) if column in suite.types else column


def _suite(
    table: RawTable,
    columns: dict[str, str],
    rules: tuple[SpecRule, ...],
    partition_column: str | None = None,
    allow_empty: bool = False,
) -> Suite:
    """A suite from declared rules: extra columns first, then the rules in declared order."""
    converted = [Rule("unexpected_column", "null", "_extra")]
    for rule in rules:
        if rule.check == "between":
            bounds = (("min_value", rule.min), ("max_value", rule.max))
            options = {k: v for k, v in bounds if v is not None}
        elif rule.check == "in_set":
            options = {"value_set": list(rule.values)}
        else:
            options = {}
        converted.append(Rule(rule.reason, rule.check, rule.column, options))
    # Set membership compares the raw text, so whole-number codes stay as written (1, not 1.0).
    in_sets = {rule.column for rule in rules if rule.check == "in_set"}
    types = {
        column: COLUMN_TYPES[kind]
        for column, kind in columns.items()
        if kind != "text" and column not in in_sets
    }
    return Suite(table, tuple(converted), types, partition_column, allow_empty)


def dataset_suite(spec: DatasetSpec) -> Suite:
    """The suite of a dataset's raw table, from the rules and column types of its spec."""
    return _suite(dataset_table(spec), spec.columns, spec.rules)


def suite_for(table: RawTable) -> Suite:
    """The suite of a raw table, as its dataset declares it (``raw_tables`` or ``rules``)."""
    declared = loop_dataset().raw_tables.get(table.name)
    if declared is not None:
        return _suite(
            table,
            declared.columns,
            declared.rules,
            declared.partition_column,
            declared.allow_empty,
        )
    for spec in discover():
        if spec.raw_table == table.name:
            return dataset_suite(spec)
    raise ValidationError(f"no expectation suite for raw table {table.name!r}")


class ValidationError(RuntimeError):
    """An expectation that could not be evaluated (as opposed to one that failed)."""


@dataclass(frozen=True)
class Verdict:
    """What validation decided about one partition."""

    table: str
    partition: str
    raw_rows: int
    clean_rows: int
    quarantined_rows: int
    max_bad_share: float
    reasons: dict[str, int]
    failed_expectations: list[dict]
    allow_empty: bool = False

    @property
    def bad_share(self) -> float:
        return self.quarantined_rows / self.raw_rows if self.raw_rows else 0.0

    @property
    def partition_reason(self) -> str | None:
        """The reason code when the whole partition fails rather than its rows, else None."""
        return EMPTY_FILE if self.raw_rows == 0 and not self.allow_empty else None

    @property
    def passed(self) -> bool:
        return self.partition_reason is None and self.bad_share <= self.max_bad_share

    def summary(self) -> str:
        """Reason codes with their row counts, or the reason the whole partition failed."""
        if self.partition_reason == EMPTY_FILE:
            return f"{EMPTY_FILE}: {EMPTY_FILE_MESSAGE}"
        return ", ".join(f"{code}: {rows}" for code, rows in sorted(self.reasons.items())) or "-"


def _expectation(rule: Rule, suite: Suite):
    import great_expectations.expectations as gxe

    meta = {"reason": rule.reason}
    if rule.kind == "not_null":
        return gxe.ExpectColumnValuesToNotBeNull(column=_validated(rule.column, suite), meta=meta)
    if rule.kind == "null":
        return gxe.ExpectColumnValuesToBeNull(column=rule.column, meta=meta)
    if rule.kind == "between":
        return gxe.ExpectColumnValuesToBeBetween(
            column=_value(rule.column), meta=meta, **rule.options
        )
    if rule.kind == "in_set":
        return gxe.ExpectColumnValuesToBeInSet(column=rule.column, meta=meta, **rule.options)
    if rule.kind == "parses":
        return gxe.ExpectColumnValuesToBeInSet(
            column=f"{rule.column}__parses", value_set=[True], meta=meta
        )
    if rule.kind == "in_partition":
        return gxe.ExpectColumnValuesToBeInSet(column="_in_partition", value_set=[True], meta=meta)
    key = [_validated(c, suite) for c in rule.column]
    if rule.kind == "unique" and len(key) == 1:
        return gxe.ExpectColumnValuesToBeUnique(column=key[0], meta=meta)
    if rule.kind == "unique":
        return gxe.ExpectCompoundColumnsToBeUnique(column_list=key, meta=meta)
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def expectation_suite(suite: Suite):
    """The Great Expectations suite of a raw table."""
    import great_expectations as gx

    gx_suite = gx.ExpectationSuite(name=f"raw_{suite.table.name}")
    for rule in suite.all_rules():
        gx_suite.add_expectation(_expectation(rule, suite))
    return gx_suite


def prepared_batch_sql(suite: Suite) -> str:
    """Select a batch of raw partitions with every typed column parsed (see ``Suite``)."""
    parsed = []
    for column, sql_type in suite.types.items():
        value = f'try_cast("{column}" as {sql_type})'
        # Range checks compare doubles: Great Expectations vectorises those, not int32.
        shown = f"{value}::double" if sql_type == "integer" else value
        parsed.append(f'{shown} as "{column}__value"')
        parsed.append(f'("{column}" is null or {value} is not null) as "{column}__parses"')
    if suite.partition_column:
        parsed.append(f'coalesce("{suite.partition_column}" = _partition, false) as _in_partition')
    # Text columns that were parsed are left out: their values and flags say it all, and
    # Great Expectations hashes every column of a batch, which is slow for text.
    text = [f'"{c}"' for c in suite.table.columns if c not in suite.types]
    return f"""select _partition, _row_number, {", ".join([*text, "_extra", *parsed])}
               from {suite.table.qualified}
               where _partition in (select unnest(?::varchar[]))"""


def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def failing_rows(frame: pd.DataFrame, suite: Suite):
    """Run the suite on a prepared batch.

    Returns:
        ``{(partition, row number): [reasons]}`` and the failed expectations with their counts.
    """
    if frame.empty:
        return {}, []
    batch = (
        _context()
        .data_sources.add_pandas("raw")
        .add_dataframe_asset(suite.table.name)
        .add_batch_definition_whole_dataframe("batch")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    result = batch.validate(
        expectation_suite(suite),
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": ["_partition", "_row_number"],
            "return_unexpected_index_query": False,
        },
    )
    reasons: dict[tuple[str, int], list[str]] = {}
    failed: list[dict] = []
    for outcome in result.results:
        if outcome.success:
            continue
        config = outcome.expectation_config
        if outcome.exception_info.get("raised_exception"):
            raise ValidationError(
                f"expectation {config.type} on {config.kwargs} could not run: "
                f"{outcome.exception_info.get('exception_message')}"
            )
        reason = config.meta["reason"]
        rows = [
            (str(item["_partition"]), int(item["_row_number"]))
            for item in outcome.result.get("unexpected_index_list") or []
        ]
        if config.type in UNIQUENESS:
            key = config.kwargs.get("column_list") or [config.kwargs["column"]]
            rows = _later_copies(frame, list(key), rows)
        failed.append(
            {
                "expectation": config.type,
                "column": config.kwargs.get("column") or config.kwargs.get("column_list"),
                "reason": reason,
                "unexpected_count": int(outcome.result.get("unexpected_count") or 0),
            }
        )
        for row in rows:
            reasons.setdefault(row, []).append(reason)
    return reasons, failed


def _later_copies(
    frame: pd.DataFrame, key: list[str], rows: list[tuple[str, int]]
) -> list[tuple[str, int]]:
    """Of a duplicated key, the first row stays clean; the later copies are quarantined."""
    flagged = pd.DataFrame(rows, columns=["_partition", "_row_number"]).merge(
        frame[["_partition", "_row_number", *key]], on=["_partition", "_row_number"]
    )
    flagged = flagged.sort_values(["_partition", "_row_number"])
    later = flagged[flagged.duplicated(subset=key, keep="first")]
    return list(zip(later["_partition"], later["_row_number"].astype(int), strict=True))


def validate_partitions(
    connection: duckdb.DuckDBPyConnection,
    table: RawTable,
    partitions: list[str],
    max_bad_share: float,
) -> list[Verdict]:
    """Validate raw partitions; each batch writes its quarantine rows and verdicts atomically."""
    ensure_schemas(connection)
    suite = suite_for(table)
    sizes = dict(
        connection.execute(
            f"""select _partition, count(*) from {table.qualified}
                where _partition in (select unnest(?::varchar[])) group by 1""",
            [partitions],
        ).fetchall()
    )
    verdicts: list[Verdict] = []
    # The connection stays on this thread: it reads each batch and records each verdict in
    # partition order, while up to VALIDATION_THREADS batches are in Great Expectations.
    with ThreadPoolExecutor(VALIDATION_THREADS, thread_name_prefix="validation") as pool:
        running: deque = deque()
        for batch in _batches(partitions, sizes):
            frame = _to_pandas(connection.sql(prepared_batch_sql(suite), params=[batch]))
            running.append((batch, pool.submit(failing_rows, frame, suite)))
            if len(running) >= VALIDATION_THREADS:
                verdicts += _record_batch(
                    connection, suite, sizes, max_bad_share, *running.popleft()
                )
        while running:
            verdicts += _record_batch(connection, suite, sizes, max_bad_share, *running.popleft())
    return verdicts


def _record_batch(connection, suite, sizes, max_bad_share, batch, validation) -> list[Verdict]:
    reasons, failed = validation.result()
    return _record(connection, suite, batch, sizes, reasons, failed, max_bad_share)


def _to_pandas(relation) -> pd.DataFrame:
    """A batch as pandas: numbers and dates in NumPy, text as categories.

    Great Expectations compares NumPy columns vectorised but Arrow-backed numbers one value at
    a time, and it hashes every column of a batch: categories hash their few distinct values
    once, which makes a batch about 1.5x faster than Arrow strings.
    """
    return relation.to_arrow_table().to_pandas(strings_to_categorical=True, date_as_object=False)


def validate_partition(
    connection: duckdb.DuckDBPyConnection, table: RawTable, partition: str, max_bad_share: float
) -> Verdict:
    """Validate one raw partition (see ``validate_partitions``)."""
    return validate_partitions(connection, table, [partition], max_bad_share)[0]


def _batches(partitions: list[str], sizes: dict[str, int]) -> list[list[str]]:
    batches: list[list[str]] = [[]]
    rows = 0
    for partition in partitions:
        if batches[-1] and rows + sizes.get(partition, 0) > BATCH_ROWS:
            batches.append([])
            rows = 0
        batches[-1].append(partition)
        rows += sizes.get(partition, 0)
    return batches


def _record(connection, suite, batch, sizes, reasons, failed, max_bad_share) -> list[Verdict]:
    table = suite.table
    flagged = pd.DataFrame(
        {
            "_partition": [key[0] for key in reasons],
            "_row_number": np.array([key[1] for key in reasons], dtype=np.int64),
            "reason_code": [_primary(r) for r in reasons.values()],
            "reasons": [
                ",".join(sorted(set(r), key=REASON_PRIORITY.index)) for r in reasons.values()
            ],
        }
    )
    verdicts = []
    for partition in batch:
        mine = flagged[flagged["_partition"] == partition]
        raw_rows = int(sizes.get(partition, 0))
        verdicts.append(
            Verdict(
                table=table.name,
                partition=partition,
                raw_rows=raw_rows,
                clean_rows=raw_rows - len(mine),
                quarantined_rows=len(mine),
                max_bad_share=max_bad_share,
                reasons={k: int(v) for k, v in mine["reason_code"].value_counts().items()},
                failed_expectations=failed,
                allow_empty=suite.allow_empty,
            )
        )
    connection.register("flagged_rows", flagged)

    def record() -> None:
        connection.execute(
            f"delete from {table.quarantine} where _partition in (select unnest(?::varchar[]))",
            [batch],
        )
        connection.execute(
            f"""insert into {table.quarantine}
                select r.*, f.reason_code, f.reasons, now()
                from {table.qualified} r join flagged_rows f using (_partition, _row_number)"""
        )
        connection.execute(
            f"""delete from {VERDICTS_TABLE}
                where table_name = ? and _partition in (select unnest(?::varchar[]))""",
            [table.name, batch],
        )
        connection.executemany(
            f"insert into {VERDICTS_TABLE} values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                [
                    v.table,
                    v.partition,
                    v.raw_rows,
                    v.clean_rows,
                    v.quarantined_rows,
                    v.bad_share,
                    max_bad_share,
                    v.passed,
                    json.dumps(failed + _partition_failures(v)),
                    json.dumps(v.reasons),
                ]
                for v in verdicts
            ],
        )

    try:
        in_transaction(connection, record)  # whole or not at all; again after a lake conflict
    finally:
        connection.unregister("flagged_rows")
    return verdicts


def _partition_failures(verdict: Verdict) -> list[dict]:
    if verdict.partition_reason != EMPTY_FILE:
        return []
    return [
        {
            "expectation": "expect_table_row_count_to_be_between",
            "column": None,
            "reason": EMPTY_FILE,
            "message": EMPTY_FILE_MESSAGE,
            "unexpected_count": 0,
        }
    ]


def _primary(reasons: list[str]) -> str:
    return min(reasons, key=REASON_PRIORITY.index)


def blocked_partitions(
    connection: duckdb.DuckDBPyConnection, table: RawTable, partitions: list[str]
) -> dict[str, str]:
    """The partitions that must not flow downstream, each with why (failed or not validated)."""
    has_verdicts = connection.execute(
        """select count(*) from information_schema.tables
           where table_schema = 'validation' and table_name = 'partition_verdicts'"""
    ).fetchone()[0]
    rows = (
        []
        if not has_verdicts
        else connection.execute(
            f"""select _partition, passed, bad_share, max_bad_share, raw_rows
            from {VERDICTS_TABLE}
            where table_name = ? and _partition in (select unnest(?::varchar[]))""",
            [table.name, partitions],
        ).fetchall()
    )
    verdicts = {row[0]: row[1:] for row in rows}
    blocked = {}
    for partition in partitions:
        if partition not in verdicts:
            blocked[partition] = "not validated (load and validate it first)"
        elif not verdicts[partition][0]:
            share, limit, raw_rows = verdicts[partition][1:]
            blocked[partition] = (
                f"failed validation: {EMPTY_FILE} ({EMPTY_FILE_MESSAGE})"
                if raw_rows == 0
                else f"failed validation: {share:.1%} bad rows > {limit:.1%} allowed"
            )
    return blocked
