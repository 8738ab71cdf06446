"""Raw columns, row rules and raw tables of a dataset.yaml, read and checked.

A dataset with a source file has one raw table: its ``columns`` and ``rules``. A generated
dataset may deliver several tables (``raw_tables``): each names its columns and types (the
dataset's ``columns`` when it names none), its natural key, the column that must hold the
partition's day, and its rules. Rows that break a rule are quarantined under the rule's
reason; when a row breaks several, the first reason in ``REASON_PRIORITY`` names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keel.datasets.reader import NAME, Reader, fail

# Raw columns are text; these are the types they are parsed to (and validated as). A text
# that does not parse is a wrong type: ``integer32`` refuses whole numbers past 32 bits.
COLUMN_TYPES = {
    "integer": "bigint",
    "integer32": "integer",
    "number": "double",
    "text": "varchar",
    "date": "date",
    "timestamp": "timestamptz",
    "boolean": "boolean",
}
RULE_CHECKS = ("not_null", "between", "in_set", "unique")
# The reason codes a row can be quarantined under, first the one that names a row breaking
# several rules. ``unexpected_column``, ``wrong_type`` and ``wrong_partition`` come from the
# raw table itself (an extra column, a text that does not parse, a row of another day).
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
# What a generated dataset's extra tables hold, besides the daily table its ``raw_table``
# names: the labels, the entities (a snapshot), the daily table's files from the landing folder.
RAW_ROLES = ("labels", "entities", "landing")


@dataclass(frozen=True)
class Rule:
    """One row-level rule: rows that break it are quarantined under ``reason``.

    In dataset.yaml a ``unique`` rule over several columns is one compound key (a tuple here);
    any other check over several columns is read as one rule per column.
    """

    column: str | tuple[str, ...]
    check: str
    reason: str
    min: float | None = None
    max: float | None = None
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class RawTableSpec:
    """One raw table a generated dataset delivers, and the rules its rows must keep."""

    name: str
    columns: dict[str, str]
    key: tuple[str, ...]
    rules: tuple[Rule, ...]
    role: str | None = None
    # Each row must hold its partition's day in this column (a daily extract's rows).
    partition_column: str | None = None
    # A partition without rows passes (labels that arrive late have none at first).
    allow_empty: bool = False


def parse_columns(data: Any, where: str) -> dict[str, str]:
    """Column names and their types (one of ``COLUMN_TYPES``), in delivery order."""
    if not isinstance(data, dict) or not data:
        raise fail(where, "expected a mapping of column names to types")
    columns: dict[str, str] = {}
    for column, kind in data.items():
        if not isinstance(column, str) or not NAME.match(column):
            raise fail(where, f"{column!r} must be a lower_snake_case name")
        if kind not in COLUMN_TYPES:
            raise fail(f"{where}.{column}", f"{kind!r} is not one of {', '.join(COLUMN_TYPES)}")
        columns[column] = kind
    return columns


def parse_rules(
    items: Any, where: str, columns: dict[str, str], vocabularies: dict[str, tuple[str, ...]]
) -> tuple[Rule, ...]:
    """The rules under ``where``; an ``in_set`` rule without values takes the vocabulary."""
    if not isinstance(items, list):
        raise fail(where, "expected a list of rules")
    rules = []
    for i, item in enumerate(items):
        reader = Reader(item, f"{where}[{i}]")
        raw_column = reader.get("column", (str, list))
        targets = [raw_column] if isinstance(raw_column, str) else raw_column
        if not targets:
            raise fail(reader._at("column"), "names no column")
        for target in targets:
            if target not in columns:
                raise fail(reader._at("column"), f"{target!r} is not a declared column")
        check = reader.choice("check", RULE_CHECKS)
        given = tuple(str(v) for v in reader.get("values", list, []))
        reason = reader.choice("reason", REASON_PRIORITY)
        low, high = reader.get("min", (int, float), None), reader.get("max", (int, float), None)
        if check == "between" and low is None and high is None:
            raise fail(where + f"[{i}]", "a between rule needs min or max")
        # One compound key, or the same check on each column.
        for column in [tuple(targets)] if check == "unique" else targets:
            values = given or (vocabularies.get(column, ()) if check == "in_set" else ())
            if check == "in_set" and not values:
                raise fail(reader._at("values"), f"{column!r} has no vocabulary: give the values")
            rules.append(Rule(column, check, reason, low, high, values))
        reader.done()
    return tuple(rules)


def parse_raw_tables(
    data: dict[str, Any],
    where: str,
    columns: dict[str, str],
    vocabularies: dict[str, tuple[str, ...]],
) -> dict[str, RawTableSpec]:
    """The ``raw_tables`` mapping: table name to its columns, key, partition column and rules."""
    tables: dict[str, RawTableSpec] = {}
    for name, body in data.items():
        at = f"{where}.{name}"
        if not isinstance(name, str) or not NAME.match(name):
            raise fail(where, f"{name!r} must be a lower_snake_case name")
        reader = Reader(body, at)
        mine = (
            parse_columns(reader.get("columns", dict), f"{at}.columns")
            if reader.data.get("columns") is not None
            else dict(columns)
        )
        reader.used.add("columns")
        key = reader.names("key")
        partition_column = reader.name("partition_column", None)
        for column in (*key, partition_column):
            if column is not None and column not in mine:
                raise fail(at, f"{column!r} (key or partition column) is not one of its columns")
        if not key:
            raise fail(f"{at}.key", "needs at least one column")
        tables[name] = RawTableSpec(
            name=name,
            columns=mine,
            key=key,
            rules=parse_rules(reader.get("rules", list), f"{at}.rules", mine, vocabularies),
            role=reader.choice("role", RAW_ROLES, None),
            partition_column=partition_column,
            allow_empty=reader.get("allow_empty", bool, False),
        )
        reader.done()
    roles = [table.role for table in tables.values() if table.role]
    twice = sorted({role for role in roles if roles.count(role) > 1})
    if twice:
        raise fail(where, f"role {', '.join(twice)} is given to more than one table")
    return tables
