"""Validating raw partitions with Great Expectations; bad rows go to quarantine with a reason.

Each raw table has an expectation suite. Every row-level expectation carries a reason code in
its ``meta``; Great Expectations reports the failing rows by their ``_row_number``, and those
rows are copied to the table's quarantine with the first reason by priority and the full list.
The partition's verdict (row counts, bad share, passed or not) lands in
``validation.partition_verdicts`` in the same transaction. Downstream readers (dbt staging, the
Dagster gate) only take partitions whose latest verdict passed, so a failed partition stays
blocked in every later run, not only in the run whose check failed.

``raw rows = clean rows + quarantined rows`` holds for every partition by construction: clean
rows are exactly the raw rows that are not in quarantine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pandas as pd

from keel.ingestion import (
    ACCOUNT_ACTIVITY,
    ACCOUNT_HOLDERS,
    DEFAULT_LABELS,
    LANDED_ACTIVITY,
    TAIWAN_CLIENTS,
    VERDICTS_TABLE,
    RawTable,
    ensure_schemas,
)
from keel.schema import CHANNELS, PRODUCTS, REGIONS, SEXES

# When a row breaks several rules, the first of these names its reason code.
REASON_PRIORITY = (
    "unexpected_column",
    "missing_key",
    "wrong_type",
    "missing_value",
    "duplicate",
    "out_of_range",
    "unknown_category",
    "wrong_partition",
)
UNIQUENESS = ("expect_compound_columns_to_be_unique", "expect_column_values_to_be_unique")
INTEGER = r"^-?\d+$"
DECIMAL = r"^-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?$"
ISO_DATE = r"^\d{4}-\d{2}-\d{2}$"
BOOLEAN = r"^(?:true|false|0|1)$"


@dataclass(frozen=True)
class Rule:
    """One expectation on one column, and the reason code of the rows it rejects."""

    reason: str
    kind: str
    column: str | tuple[str, ...]
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    """The expectations of one raw table: typed columns are parsed before the checks."""

    table: RawTable
    rules: tuple[Rule, ...]
    numeric: tuple[str, ...] = ()
    partition_column: str | None = None


def _typed(column: str) -> str:
    return f"{column}__value"


def _required(columns, kind_regex) -> tuple[Rule, ...]:
    rules = []
    for column, regex in zip(columns, kind_regex, strict=True):
        rules.append(Rule("missing_value", "not_null", column))
        if regex:
            rules.append(Rule("wrong_type", "regex", column, {"regex": regex}))
    return tuple(rules)


def _activity_suite(table: RawTable, partitioned: bool) -> Suite:
    numeric = ("n_transactions", "spend_amount", "payment_amount", "balance")
    rules = (
        Rule("unexpected_column", "null", "_extra"),
        Rule("missing_key", "not_null", "account_id"),
        Rule("missing_key", "not_null", "activity_date"),
        Rule("wrong_type", "regex", "account_id", {"regex": INTEGER}),
        Rule("wrong_type", "regex", "activity_date", {"regex": ISO_DATE}),
        *_required(
            (*numeric, "missed_payment", "channel"),
            (INTEGER, DECIMAL, DECIMAL, DECIMAL, BOOLEAN, None),
        ),
        Rule("duplicate", "unique", ("account_id", "activity_date")),
        Rule(
            "out_of_range", "between", _typed("n_transactions"), {"min_value": 0, "max_value": 500}
        ),
        Rule("out_of_range", "between", _typed("spend_amount"), {"min_value": 0, "max_value": 1e6}),
        Rule(
            "out_of_range", "between", _typed("payment_amount"), {"min_value": 0, "max_value": 1e7}
        ),
        Rule("out_of_range", "between", _typed("balance"), {"min_value": -1e5, "max_value": 1e7}),
        Rule("unknown_category", "in_set", "channel", {"value_set": list(CHANNELS)}),
    )
    if partitioned:
        rules += (Rule("wrong_partition", "equals_partition", "activity_date"),)
    return Suite(table, rules, numeric, "activity_date" if partitioned else None)


SUITES: dict[str, Suite] = {
    ACCOUNT_ACTIVITY.name: _activity_suite(ACCOUNT_ACTIVITY, partitioned=True),
    LANDED_ACTIVITY.name: _activity_suite(LANDED_ACTIVITY, partitioned=False),
    DEFAULT_LABELS.name: Suite(
        DEFAULT_LABELS,
        (
            Rule("unexpected_column", "null", "_extra"),
            Rule("missing_key", "not_null", "account_id"),
            Rule("missing_key", "not_null", "observation_date"),
            Rule("wrong_type", "regex", "account_id", {"regex": INTEGER}),
            Rule("wrong_type", "regex", "observation_date", {"regex": ISO_DATE}),
            *_required(("label_date", "defaulted"), (ISO_DATE, None)),
            Rule("out_of_range", "in_set", "defaulted", {"value_set": ["0", "1"]}),
            Rule("duplicate", "unique", ("account_id", "observation_date")),
            Rule("wrong_partition", "equals_partition", "label_date"),
        ),
        partition_column="label_date",
    ),
    ACCOUNT_HOLDERS.name: Suite(
        ACCOUNT_HOLDERS,
        (
            Rule("unexpected_column", "null", "_extra"),
            Rule("missing_key", "not_null", "account_id"),
            Rule("wrong_type", "regex", "account_id", {"regex": INTEGER}),
            *_required(
                ("opened_date", "age", "sex", "region", "product", "credit_limit"),
                (ISO_DATE, INTEGER, None, None, None, DECIMAL),
            ),
            Rule("duplicate", "unique", ("account_id",)),
            Rule("out_of_range", "between", _typed("age"), {"min_value": 18, "max_value": 110}),
            Rule(
                "out_of_range",
                "between",
                _typed("credit_limit"),
                {"min_value": 1, "max_value": 1e7},
            ),
            Rule("unknown_category", "in_set", "sex", {"value_set": list(SEXES)}),
            Rule("unknown_category", "in_set", "region", {"value_set": list(REGIONS)}),
            Rule("unknown_category", "in_set", "product", {"value_set": list(PRODUCTS)}),
        ),
        numeric=("age", "credit_limit"),
    ),
    TAIWAN_CLIENTS.name: Suite(
        TAIWAN_CLIENTS,
        (
            Rule("unexpected_column", "null", "_extra"),
            Rule("missing_key", "not_null", "client_id"),
            *_required(
                TAIWAN_CLIENTS.columns[1:],
                (INTEGER,) * 5 + (INTEGER,) * 6 + (DECIMAL,) * 12 + (INTEGER,),
            ),
            Rule("duplicate", "unique", ("client_id",)),
            Rule("out_of_range", "between", _typed("limit_bal"), {"min_value": 1}),
            Rule("out_of_range", "between", _typed("age"), {"min_value": 18, "max_value": 110}),
            Rule("out_of_range", "in_set", "sex", {"value_set": ["1", "2"]}),
            Rule("out_of_range", "in_set", "default_payment", {"value_set": ["0", "1"]}),
            *(
                Rule(
                    "out_of_range", "between", _typed(f"pay_{i}"), {"min_value": -2, "max_value": 9}
                )
                for i in (0, 2, 3, 4, 5, 6)
            ),
        ),
        numeric=("limit_bal", "age", *(f"pay_{i}" for i in (0, 2, 3, 4, 5, 6))),
    ),
}


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

    @property
    def bad_share(self) -> float:
        return self.quarantined_rows / self.raw_rows if self.raw_rows else 0.0

    @property
    def passed(self) -> bool:
        return self.raw_rows > 0 and self.bad_share <= self.max_bad_share


def _expectation(rule: Rule, partition: str | None):
    import great_expectations.expectations as gxe

    meta = {"reason": rule.reason}
    if rule.kind == "not_null":
        return gxe.ExpectColumnValuesToNotBeNull(column=rule.column, meta=meta)
    if rule.kind == "null":
        return gxe.ExpectColumnValuesToBeNull(column=rule.column, meta=meta)
    if rule.kind == "regex":
        return gxe.ExpectColumnValuesToMatchRegex(column=rule.column, meta=meta, **rule.options)
    if rule.kind == "between":
        return gxe.ExpectColumnValuesToBeBetween(column=rule.column, meta=meta, **rule.options)
    if rule.kind == "in_set":
        return gxe.ExpectColumnValuesToBeInSet(column=rule.column, meta=meta, **rule.options)
    if rule.kind == "equals_partition":
        return gxe.ExpectColumnValuesToBeInSet(column=rule.column, value_set=[partition], meta=meta)
    if rule.kind == "unique" and len(rule.column) == 1:
        return gxe.ExpectColumnValuesToBeUnique(column=rule.column[0], meta=meta)
    if rule.kind == "unique":
        return gxe.ExpectCompoundColumnsToBeUnique(column_list=list(rule.column), meta=meta)
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def expectation_suite(suite: Suite, partition: str | None):
    """The Great Expectations suite of ``suite`` (for one partition, where dates must match)."""
    import great_expectations as gx

    gx_suite = gx.ExpectationSuite(name=f"raw_{suite.table.name}")
    for rule in suite.rules:
        if rule.kind == "equals_partition" and partition is None:
            continue
        gx_suite.add_expectation(_expectation(rule, partition))
    return gx_suite


def _context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def failing_rows(frame: pd.DataFrame, suite: Suite, partition: str | None):
    """Run the suite on a raw frame; returns {row number: [reasons]} and the failed expectations."""
    typed = frame.copy()
    for column in suite.numeric:
        typed[_typed(column)] = pd.to_numeric(typed[column], errors="coerce")
    context = _context()
    batch = (
        context.data_sources.add_pandas("raw")
        .add_dataframe_asset(suite.table.name)
        .add_batch_definition_whole_dataframe("partition")
        .get_batch(batch_parameters={"dataframe": typed})
    )
    result = batch.validate(
        expectation_suite(suite, partition),
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": ["_row_number"],
            "return_unexpected_index_query": False,
        },
    )
    reasons: dict[int, list[str]] = {}
    failed: list[dict] = []
    for outcome in result.results:
        if outcome.success:
            continue
        config = outcome.expectation_config
        reason = config.meta["reason"]
        rows = [
            int(item["_row_number"]) for item in outcome.result.get("unexpected_index_list") or []
        ]
        if config.type in UNIQUENESS:
            key = config.kwargs.get("column_list") or [config.kwargs["column"]]
            rows = _later_copies(typed, list(key), rows)
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


def _later_copies(frame: pd.DataFrame, key: list[str], rows: list[int]) -> list[int]:
    """Of a duplicated key, the first row stays clean; the later copies are quarantined."""
    flagged = frame[frame["_row_number"].isin(rows)].sort_values("_row_number")
    return flagged.loc[flagged.duplicated(subset=key, keep="first"), "_row_number"].tolist()


def validate_partition(
    connection: duckdb.DuckDBPyConnection,
    table: RawTable,
    partition: str,
    max_bad_share: float,
) -> Verdict:
    """Validate one raw partition; writes its quarantine rows and verdict in one transaction."""
    ensure_schemas(connection)
    suite = SUITES[table.name]
    frame = connection.execute(
        f"select * from {table.qualified} where _partition = ?", [partition]
    ).df()
    reasons, failed = (
        failing_rows(frame, suite, partition if suite.partition_column else None)
        if len(frame)
        else ({}, [])
    )
    flagged = pd.DataFrame(
        {
            "_row_number": np.array(list(reasons), dtype=np.int64),
            "reason_code": [_primary(r) for r in reasons.values()],
            "reasons": [
                ",".join(sorted(set(r), key=REASON_PRIORITY.index)) for r in reasons.values()
            ],
        }
    )
    counts = flagged["reason_code"].value_counts().to_dict() if len(flagged) else {}
    verdict = Verdict(
        table=table.name,
        partition=partition,
        raw_rows=len(frame),
        clean_rows=len(frame) - len(flagged),
        quarantined_rows=len(flagged),
        max_bad_share=max_bad_share,
        reasons={k: int(v) for k, v in counts.items()},
        failed_expectations=failed,
    )
    connection.register("flagged_rows", flagged)
    connection.execute("begin transaction")
    try:
        connection.execute(f"delete from {table.quarantine} where _partition = ?", [partition])
        connection.execute(
            f"""insert into {table.quarantine}
                select r.*, f.reason_code, f.reasons, now()
                from {table.qualified} r join flagged_rows f using (_row_number)
                where r._partition = ?""",
            [partition],
        )
        connection.execute(
            f"delete from {VERDICTS_TABLE} where table_name = ? and _partition = ?",
            [table.name, partition],
        )
        connection.execute(
            f"insert into {VERDICTS_TABLE} values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                table.name,
                partition,
                verdict.raw_rows,
                verdict.clean_rows,
                verdict.quarantined_rows,
                verdict.bad_share,
                max_bad_share,
                verdict.passed,
                json.dumps(failed),
                json.dumps(verdict.reasons),
            ],
        )
        connection.execute("commit")
    except Exception:
        connection.execute("rollback")
        raise
    finally:
        connection.unregister("flagged_rows")
    return verdict


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
            f"""select _partition, passed, bad_share, max_bad_share from {VERDICTS_TABLE}
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
            share, limit = verdicts[partition][1:]
            blocked[partition] = f"failed validation: {share:.1%} bad rows > {limit:.1%} allowed"
    return blocked
