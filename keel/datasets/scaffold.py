"""A new dataset folder from a CSV or Parquet file: inferred types and suggestions to confirm.

The file is copied into ``datasets/<name>/data/`` with its checksum; ``dataset.yaml`` gets the
columns and their types, a suggested entity key (unique, never null, named like an id), a
suggested time column (the first date or timestamp), and guesses for the label, the protected
attributes and the features; ``dbt/`` gets a staging model and the two marts Feast and
training read; ``README.md`` lists every choice the engineer must confirm. The folder loads as
written: ``load_spec`` checks it before the scaffold returns.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from keel.datasets.spec import NAME, SpecError, load_spec
from keel.registry_lineage import file_sha256
from keel.settings import datasets_dir

# DuckDB's inferred types, as a spec names them.
_TYPES = (
    ("BOOL", "boolean"),
    ("TIMESTAMP", "timestamp"),
    ("DATE", "date"),
    ("INT", "integer"),
    ("DOUBLE", "number"),
    ("FLOAT", "number"),
    ("DECIMAL", "number"),
    ("REAL", "number"),
)
LABEL_HINTS = ("label", "target", "default", "churn", "fraud", "outcome", "bad", "y")
PROTECTED_HINTS = ("sex", "gender", "age", "race", "ethnic", "marital", "marriage", "religion")
ID_HINT = re.compile(r"(^|_)(id|key|number|no)$")
TIME_HINT = re.compile(r"date|time|_at$|_on$|day|month")
MAX_CATEGORIES = 20
DEFAULT_OUTCOME_DAYS = 365


@dataclass(frozen=True)
class Column:
    """One column of the file: its name there, its snake_case name, type and a few facts."""

    source: str
    name: str
    kind: str
    distinct: int
    nulls: int
    values: tuple[str, ...]  # the distinct values, when there are few


def snake_case(text: str) -> str:
    """``Default Payment`` -> ``default_payment``; a leading digit gets a ``c_`` prefix."""
    name = re.sub(r"[^0-9a-zA-Z]+", "_", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text))
    name = name.strip("_").lower() or "column"
    return f"c_{name}" if name[0].isdigit() else name


def profile(path: Path) -> tuple[list[Column], int]:
    """The file's columns with inferred types, distinct and null counts; and its row count."""
    import duckdb

    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise SpecError(f"{path}: use a .csv or .parquet file, not {suffix or 'no suffix'}")
    try:
        return _profile(path, "read_parquet" if suffix == ".parquet" else "read_csv_auto")
    except duckdb.Error as error:
        raise SpecError(f"{path}: cannot be read as {suffix[1:].upper()}: {error}") from error


def _profile(path: Path, reader: str) -> tuple[list[Column], int]:
    import duckdb

    with duckdb.connect() as connection:
        relation = connection.sql(f"select * from {reader}(?)", params=[str(path)])
        rows = connection.execute(f"select count(*) from {reader}(?)", [str(path)]).fetchone()[0]
        columns = []
        for source, dtype in zip(relation.columns, relation.dtypes, strict=True):
            quoted = '"' + source.replace('"', '""') + '"'
            distinct, nulls = connection.execute(
                f"select count(distinct {quoted}), count(*) - count({quoted}) from {reader}(?)",
                [str(path)],
            ).fetchone()
            values: tuple[str, ...] = ()
            if distinct <= MAX_CATEGORIES:
                found = connection.execute(
                    f"select distinct cast({quoted} as varchar) from {reader}(?) "
                    f"where {quoted} is not null order by 1",
                    [str(path)],
                ).fetchall()
                values = tuple(v for (v,) in found)
            kind = next((k for prefix, k in _TYPES if prefix in str(dtype).upper()), "text")
            columns.append(Column(source, snake_case(source), kind, distinct, nulls, values))
    if not rows:
        raise SpecError(f"{path}: the file has no rows")
    return columns, int(rows)


@dataclass(frozen=True)
class Choices:
    """What the scaffold suggests; each is a line of the README for the engineer to confirm."""

    key: Column
    time: Column | None
    label: Column | None
    protected: tuple[Column, ...]
    numeric: tuple[Column, ...]
    categorical: tuple[Column, ...]


def _binary(column: Column) -> bool:
    return column.kind in ("integer", "boolean", "text") and set(column.values) in (
        {"0", "1"},
        {"false", "true"},
    )


def suggest(columns: list[Column], rows: int) -> Choices:
    """The entity key, time column, label, protected attributes and features to propose."""
    keys = [
        c for c in columns if c.distinct == rows and not c.nulls and c.kind in ("integer", "text")
    ]
    if not keys:
        raise SpecError(
            "no column is unique and never null, so none can be the entity key; add an id column"
        )
    key = next((c for c in keys if ID_HINT.search(c.name)), keys[0])
    times = [c for c in columns if c.kind in ("date", "timestamp")]
    time = next((c for c in times if TIME_HINT.search(c.name)), times[0] if times else None)
    binaries = [c for c in columns if _binary(c) and c is not key]
    label = next(
        (c for c in binaries if any(h in c.name.split("_") for h in LABEL_HINTS)),
        binaries[-1] if binaries else None,
    )
    taken = {key.name, time.name if time else "", label.name if label else ""}
    protected = tuple(
        c for c in columns if c.name not in taken and any(h in c.name for h in PROTECTED_HINTS)
    )
    taken |= {c.name for c in protected}
    rest = [c for c in columns if c.name not in taken]
    numeric = tuple(c for c in rest if c.kind in ("integer", "number", "boolean"))
    categorical = tuple(c for c in rest if c.kind == "text" and c.values)
    return Choices(key, time, label, protected, numeric, categorical)


_SQL_TYPES = {
    "integer": "bigint",
    "number": "double",
    "date": "date",
    "timestamp": "timestamptz",
    "boolean": "boolean",
    "text": "varchar",
}


def _yaml_list(values) -> str:
    return "[" + ", ".join(values) + "]"


def _vocabulary(column: Column) -> str:
    return _yaml_list(repr(v) for v in column.values)


def _spec_text(name: str, file_name: str, sha: str, columns, choices: Choices, rows: int, rate):
    """dataset.yaml as text: comments say which lines are guesses."""
    c = choices
    renamed = [col for col in columns if col.source != col.name]
    lines = [
        f"# Scaffolded from {file_name} ({rows} rows): confirm every line marked CONFIRM.",
        f"name: {name}",
        f"description: {name} ({file_name}), one row per {c.key.name}.",
        "source:",
        "  kind: file",
        f"  path: data/{file_name}",
        f"  sha256: {sha}",
    ]
    if renamed:
        lines.append("  rename:")
        lines += [f"    {col.source!r}: {col.name}" for col in renamed]
    lines += ["columns:"] + [f"  {col.name}: {col.kind}" for col in columns]
    lines += [
        "entity:  # CONFIRM: unique and never null in this file",
        f"  name: {c.key.name.removesuffix('_id') or c.key.name}",
        f"  key: {c.key.name}",
        "partitions: none",
        "# schedule: '0 3 * * *'  # run the dataset's job daily when the file is replaced",
        "label:  # CONFIRM: the column, and how long after the observation its outcome is known",
        f"  column: {c.label.name}",
        "  timing: retrospective",
        "  observed_at: observation_date",
        f"  outcome_window_days: {DEFAULT_OUTCOME_DAYS}",
        f"protected_attributes: {_yaml_list(p.name for p in c.protected)}  # CONFIRM",
        "features:  # CONFIRM: nothing here may be known only after the outcome",
        f"  numeric: {_yaml_list(col.name for col in c.numeric)}",
    ]
    if c.categorical:
        lines.append("  categorical:")
        lines += [f"    {col.name}: {_vocabulary(col)}" for col in c.categorical]
    lines += [
        f"  ttl_days: {DEFAULT_OUTCOME_DAYS + 1}",
        "leakage: []  # CONFIRM: columns that must never become features",
        "rules:",
        f"  - {{column: {c.key.name}, check: not_null, reason: missing_key}}",
        f"  - {{column: {c.key.name}, check: unique, reason: duplicate}}",
    ]
    lines += [
        f"  - {{column: {col.name}, check: not_null, reason: missing_value}}"
        for col in columns
        if col is not c.key and not col.nulls
    ]
    lines.append(
        f"  - {{column: {c.label.name}, check: in_set, values: {_vocabulary(c.label)}, "
        "reason: out_of_range}"
    )
    lines += [
        f"  - {{column: {col.name}, check: in_set, values: {_vocabulary(col)}, "
        "reason: unknown_category}"
        for col in c.categorical
    ]
    low, high = max(0.0, round(rate / 2, 3)), min(1.0, round(rate * 1.5 + 0.02, 3))
    lines += [
        "dataset_checks:  # CONFIRM: the label rate this source may show",
        "  period: snapshot",
        f"  min_rows: {max(1, rows // 2)}",
        f"  label_rate: [{low}, {high}]",
        "marts:",
        f"  features: fct_{name}_features",
        f"  labels: fct_{name}_labels",
    ]
    return "\n".join(lines) + "\n"


def _dbt_files(name: str, raw_table: str, columns, choices: Choices) -> dict[str, str]:
    c = choices
    typed = ",\n        ".join(
        f"cast({col.name} as {_SQL_TYPES[col.kind]}) as {col.name}" for col in columns
    )
    features = ",\n    ".join(
        [f"cast({col.name} as double) as {col.name}" for col in c.numeric]
        + [f"cast({col.name} as varchar) as {col.name}" for col in c.categorical]
    )
    protected = "".join(
        f",\n    {{{{ age_band('{p.name}') }}}} as {p.name}"
        if "age" in p.name and p.kind in ("integer", "number")
        else f",\n    cast({p.name} as varchar) as {p.name}"
        for p in c.protected
    )
    time = f"cast({c.time.name} as timestamptz)"
    return {
        f"stg_{name}.sql": (
            f"-- {name} as delivered, typed; validated rows only.\n"
            f"with\n\nsource as (\n    {{{{ clean_rows(source('{name}', '{raw_table}'), "
            f"'{raw_table}') }}}}\n),\n\nfinal as (\n    select\n        {typed}\n"
            "    from source\n)\n\nselect * from final\n"
        ),
        f"fct_{name}_features.sql": (
            f"-- One row per {c.key.name}, stamped at its observation.\n"
            f"select\n    {c.key.name},\n    {time} as event_timestamp,\n"
            f"    cast(now() as timestamptz) as created_timestamp,\n    {features}\n"
            f"from {{{{ ref('stg_{name}') }}}}\n"
        ),
        f"fct_{name}_labels.sql": (
            f"-- One outcome per {c.key.name}, known when its outcome window closes.\n"
            f"select\n    {c.key.name},\n"
            f"    {time} + interval {DEFAULT_OUTCOME_DAYS} day as event_timestamp,\n"
            f"    {time} as observation_date,\n"
            f"    cast(cast({c.label.name} as boolean) as bigint) as {c.label.name}{protected}\n"
            f"from {{{{ ref('stg_{name}') }}}}\n"
        ),
        f"_{name}.yml": (
            "version: 2\n\nsources:\n"
            f"  - name: {name}\n    schema: raw\n    tables:\n      - name: {raw_table}\n"
            f'        meta: {{dagster: {{asset_key: ["{name}", "raw"]}}}}\n\nmodels:\n'
            f"  - name: fct_{name}_features\n    config: {{materialized: table}}\n"
            f"    columns:\n      - name: {c.key.name}\n        data_tests: [unique, not_null]\n"
            f"  - name: fct_{name}_labels\n    config: {{materialized: table}}\n"
            f"    columns:\n      - name: {c.key.name}\n        data_tests: [unique, not_null]\n"
        ),
    }


def _readme(name: str, file_name: str, choices: Choices) -> str:
    c = choices
    listed = ", ".join(col.name for col in (*c.numeric, *c.categorical)) or "none"
    return "\n".join(
        [
            f"# {name}",
            "",
            f"Scaffolded by `keel dataset new` from `{file_name}`. Confirm each choice below in",
            "`dataset.yaml` before the first pull request:",
            "",
            f"- Entity key: `{c.key.name}` (unique and never null in the file).",
            f"- Time column: `{c.time.name}`, the observation date of each row.",
            f"- Label: `{c.label.name}`, a binary outcome; its outcome window is "
            f"{DEFAULT_OUTCOME_DAYS} days after the observation (`label.outcome_window_days`).",
            "- Protected attributes (reported by the fairness gate, never features): "
            + (", ".join(f"`{p.name}`" for p in c.protected) or "none found; add them"),
            f"- Features: {listed}.",
            "- Leakage: none declared; list every column known only after the outcome.",
            "- Licence and origin of the data: add them here.",
            "",
        ]
    )


def scaffold(name: str, source: Path, root: Path | None = None) -> Path:
    """Create ``<root>/<name>/`` (root: ``datasets_dir()``) from ``source``; returns the folder."""
    if not NAME.match(name):
        raise SpecError(f"dataset name {name!r} must be lower_snake_case")
    source = Path(source)
    if not source.is_file():
        raise SpecError(f"{source}: no such file")
    folder = Path(root or datasets_dir()) / name
    if folder.exists():
        raise SpecError(f"{folder} already exists; pick another name or remove it")
    columns, rows = profile(source)
    choices = suggest(columns, rows)
    if choices.time is None:
        raise SpecError(f"{source}: no date or timestamp column; add each row's observation date")
    if choices.label is None:
        raise SpecError(f"{source}: no binary (0/1 or true/false) column to be the label")
    import duckdb

    reader = "read_parquet" if source.suffix.lower() == ".parquet" else "read_csv_auto"
    quoted = '"' + choices.label.source.replace('"', '""') + '"'
    with duckdb.connect() as connection:
        rate = connection.execute(
            f"select avg(cast(cast({quoted} as boolean) as double)) from {reader}(?)",
            [str(source)],
        ).fetchone()[0]
    try:
        (folder / "data").mkdir(parents=True)
        (folder / "dbt").mkdir()
        copied = folder / "data" / source.name
        shutil.copyfile(source, copied)
        spec = _spec_text(name, source.name, file_sha256(copied), columns, choices, rows, rate)
        (folder / "dataset.yaml").write_text(spec)
        for file_name, text in _dbt_files(name, name, columns, choices).items():
            (folder / "dbt" / file_name).write_text(text)
        (folder / "README.md").write_text(_readme(name, source.name, choices))
        load_spec(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder
