"""Loading source files into the warehouse's raw tables, one partition at a time, atomically.

Raw tables keep what the source delivered: every expected column as text (so a wrong type is
kept, not lost), any unexpected column inside ``_extra`` as JSON, and the lineage of each row
(partition, row number in its file, file, load time). Replacing a partition deletes the old rows
and inserts the new ones in one transaction, and also clears that partition's validation
results, so that nothing downstream reads a partition that has not been validated again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb

from keel.datasets.spec import DatasetSpec, discover, loop_dataset
from keel.lake import create_partitioned, in_transaction
from keel.schema import RAW_COLUMNS, RAW_TABLE
from keel.sql import quote_identifier, quote_literal

RAW_SCHEMA = "raw"
QUARANTINE_SCHEMA = "quarantine"
VALIDATION_SCHEMA = "validation"
VERDICTS_TABLE = f"{VALIDATION_SCHEMA}.partition_verdicts"
LINEAGE_COLUMNS = ("_partition", "_row_number", "_source_file", "_loaded_at")
SNAPSHOT = "snapshot"  # the partition key of unpartitioned sources


class IngestionError(ValueError):
    """A source file that cannot be loaded at all (missing, unreadable, unknown format)."""


@dataclass(frozen=True)
class RawTable:
    """A raw table: the columns its source is expected to deliver, and the natural key."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]

    @property
    def qualified(self) -> str:
        return f"{RAW_SCHEMA}.{self.name}"

    @property
    def quarantine(self) -> str:
        return f"{QUARANTINE_SCHEMA}.{self.name}"


# The loop dataset's raw tables, as its dataset.yaml declares them (raw_table, raw_tables):
# the daily one, its copy from landed files, the labels and the entities.
_LOOP = loop_dataset()
RAW_TABLES = tuple(
    RawTable(table.name, tuple(table.columns), table.key) for table in _LOOP.raw_tables.values()
)
_BY_NAME = {table.name: table for table in RAW_TABLES}
ACTIVITY_COLUMNS = RAW_COLUMNS
ACCOUNT_ACTIVITY = _BY_NAME[RAW_TABLE]
LANDED_ACTIVITY = _BY_NAME[_LOOP.raw_table_of("landing").name]
DEFAULT_LABELS = _BY_NAME[_LOOP.raw_table_of("labels").name]
ACCOUNT_HOLDERS = _BY_NAME[_LOOP.raw_table_of("entities").name]


def dataset_table(spec: DatasetSpec) -> RawTable:
    """The raw table of a dataset with a source file: its declared columns, keyed by entity."""
    return RawTable(spec.raw_table, tuple(spec.columns), (spec.entity_key,))


def raw_tables() -> tuple[RawTable, ...]:
    """Every raw table: the built-in ones and one per dataset folder loading files or landings."""
    files = [dataset_table(spec) for spec in discover() if spec.source.kind in ("file", "landing")]
    return (*RAW_TABLES, *files)


def raw_table(name: str) -> RawTable:
    """The raw table called ``name``."""
    for table in raw_tables():
        if table.name == name:
            return table
    raise IngestionError(f"no raw table {name!r}; known: {', '.join(t.name for t in raw_tables())}")


def ensure_schemas(connection: duckdb.DuckDBPyConnection) -> None:
    """Create the raw, quarantine and validation tables if they are missing.

    On a warehouse that several workers share (the team profile's lake), another worker may
    create the same schema or table between our check and our commit: we look again.
    """
    for attempt in range(CREATE_ATTEMPTS):
        try:
            _create_schemas(connection)
            return
        except duckdb.TransactionException as error:
            if "another transaction" not in str(error) or attempt == CREATE_ATTEMPTS - 1:
                raise


CREATE_ATTEMPTS = 5


def _create_schemas(connection: duckdb.DuckDBPyConnection) -> None:
    for schema in (RAW_SCHEMA, QUARANTINE_SCHEMA, VALIDATION_SCHEMA):
        connection.execute(f"create schema if not exists {schema}")
    for table in raw_tables():
        payload = ", ".join(f"{quote_identifier(c)} varchar" for c in table.columns)
        # In the team lake, one partition per file (see keel.lake.create_partitioned).
        create_partitioned(
            connection,
            table.qualified,
            f"""create table if not exists {table.qualified} (
                _partition varchar not null, _row_number bigint not null,
                _source_file varchar, _loaded_at timestamptz not null,
                {payload}, _extra varchar)""",
            "_partition",
        )
        create_partitioned(
            connection,
            table.quarantine,
            f"""create table if not exists {table.quarantine} as
                select *, ''::varchar as reason_code, ''::varchar as reasons,
                       now() as quarantined_at
                from {table.qualified} where false""",
            "_partition",
        )
    connection.execute(
        f"""create table if not exists {VERDICTS_TABLE} (
            table_name varchar not null, _partition varchar not null,
            raw_rows bigint not null, clean_rows bigint not null,
            quarantined_rows bigint not null, bad_share double not null,
            max_bad_share double not null, passed boolean not null,
            failed_expectations varchar, reasons varchar, checked_at timestamptz not null)"""
    )


def _source_relation(connection: duckdb.DuckDBPyConnection, path: Path) -> tuple[str, list[str]]:
    """A SQL expression reading ``path`` with every column as text, and its column names."""
    if not path.exists():
        raise IngestionError(f"source file {path} does not exist")
    quoted = str(path).replace("'", "''")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        sql = f"read_parquet('{quoted}', file_row_number = true)"
        order = "file_row_number"
    elif suffix == ".csv":
        sql = f"read_csv('{quoted}', all_varchar = true, header = true)"
        order = None
    elif suffix in (".jsonl", ".ndjson", ".json"):
        sql = _json_lines_as_text(connection, path, quoted)
        order = None
    else:
        raise IngestionError(f"{path.name}: unsupported format {suffix!r} (csv, parquet, jsonl)")
    try:
        columns = [row[0] for row in connection.execute(f"describe select * from {sql}").fetchall()]
    except duckdb.Error as error:
        raise IngestionError(f"{path.name} cannot be read: {error}") from error
    columns = [c for c in columns if c != "file_row_number"]
    numbered = (
        f"(select *, file_row_number as __row from {sql})"
        if order
        else f"(select *, row_number() over () - 1 as __row from {sql})"
    )
    return numbered, columns


def _json_lines_as_text(connection: duckdb.DuckDBPyConnection, path: Path, quoted: str) -> str:
    """JSON lines with every value read as its scalar text: ``106`` and ``"106"`` both give 106.

    DuckDB infers one type per key; a key with numbers in some lines and strings in others
    becomes JSON, whose text keeps the quotes. Read as JSON, ``->> '$'`` gives a string without
    its quotes, a number or boolean as written, an object as its JSON, and null as null.
    """
    lines = f"read_json('{quoted}', format = 'newline_delimited'"
    try:
        # Every line is sampled, so a key that first appears late is still a column.
        described = connection.execute(f"describe select * from {lines}, sample_size = -1)")
        keys = [row[0] for row in described.fetchall()]
    except duckdb.Error as error:
        raise IngestionError(f"{path.name} cannot be read: {error}") from error
    identifiers = [quote_identifier(key) for key in keys]
    as_json = ", ".join(f"{quote_literal(key)}: 'JSON'" for key in keys)
    values = ", ".join(f"{name} ->> '$' as {name}" for name in identifiers)
    return f"(select {values} from {lines}, columns = {{{as_json}}}))"


def _as_text(column: str) -> str:
    return f"cast({quote_identifier(column)} as varchar)"


def load_partition(
    connection: duckdb.DuckDBPyConnection,
    table: RawTable,
    partition: str,
    source: Path,
    rename: dict[str, str] | None = None,
    derived: dict[str, str] | None = None,
) -> int:
    """Replace ``partition`` of ``table`` with the rows of ``source``; returns the row count.

    Args:
        connection: an open warehouse connection.
        table: the raw table to load.
        partition: the partition key (a day, a file name, or ``snapshot``).
        source: a CSV, Parquet or JSON-lines file.
        rename: source column names mapped to the table's names (a file's own spelling).
        derived: table columns computed from the row number ``__row`` (SQL expressions).
    """
    ensure_schemas(connection)
    relation, source_columns = _source_relation(connection, source)
    rename = rename or {}
    derived = derived or {}
    by_target = {rename.get(c, c): c for c in source_columns}
    payload = [
        f"({derived[c]})::varchar as {quote_identifier(c)}"
        if c in derived
        else f"{_as_text(by_target[c])} as {quote_identifier(c)}"
        if c in by_target
        else f"null::varchar as {quote_identifier(c)}"
        for c in table.columns
    ]
    # Unexpected columns keep their names as the file spelled them, quotes and all.
    extra = [c for c in source_columns if rename.get(c, c) not in table.columns]
    packed = ", ".join(f"{quote_identifier(c)} := {_as_text(c)}" for c in extra)
    extra_sql = f"to_json(struct_pack({packed}))::varchar" if extra else "null::varchar"

    def replace() -> int:
        _delete_partition(connection, table, partition)
        connection.execute(
            f"""insert into {table.qualified}
                select ? as _partition, __row as _row_number, ? as _source_file,
                       now() as _loaded_at, {", ".join(payload)}, {extra_sql} as _extra
                from {relation} order by __row""",
            [partition, str(source)],
        )
        return connection.execute(
            f"select count(*) from {table.qualified} where _partition = ?", [partition]
        ).fetchone()[0]

    return int(in_transaction(connection, replace))


def load_partitions(
    connection: duckdb.DuckDBPyConnection, table: RawTable, sources: dict[str, Path]
) -> dict[str, int]:
    """Replace several partitions at once, one source file each; returns rows per partition.

    Parquet files with the same columns load in one statement and one transaction (a 90-day
    backfill is one scan, not ninety); any other file loads on its own with ``load_partition``.
    """
    import pyarrow.parquet as pq

    groups: dict[tuple[str, ...], dict[str, Path]] = {}
    rows: dict[str, int] = {}
    for partition, source in sources.items():
        if source.suffix.lower() != ".parquet" or not source.exists():
            rows[partition] = load_partition(connection, table, partition, source)
            continue
        try:
            columns = tuple(pq.read_schema(source).names)
        except Exception as error:
            raise IngestionError(f"{source.name} cannot be read: {error}") from error
        groups.setdefault(columns, {})[partition] = source
    for columns, files in groups.items():
        if len(files) == 1 or not set(table.columns) >= set(columns):
            for partition, source in files.items():
                rows[partition] = load_partition(connection, table, partition, source)
        else:
            rows.update(_load_parquet_group(connection, table, columns, files))
    return rows


def _load_parquet_group(connection, table: RawTable, columns, files: dict[str, Path]):
    ensure_schemas(connection)
    names = {str(path): partition for partition, path in files.items()}
    listed = ", ".join(quote_literal(name) for name in names)
    payload = [
        f"{_as_text(c)} as {quote_identifier(c)}"
        if c in columns
        else f"null::varchar as {quote_identifier(c)}"
        for c in table.columns
    ]
    connection.execute("create or replace temp table __files (name varchar, part varchar)")
    connection.executemany("insert into __files values (?, ?)", list(names.items()))

    def replace() -> dict:
        for partition in files:
            _delete_partition(connection, table, partition)
        connection.execute(
            f"""insert into {table.qualified}
                select f.part as _partition, s.file_row_number as _row_number,
                       s.filename as _source_file, now() as _loaded_at,
                       {", ".join(payload)}, null::varchar as _extra
                from read_parquet([{listed}], file_row_number = true, filename = true) s
                join __files f on f.name = s.filename"""
        )
        return dict(
            connection.execute(
                f"""select _partition, count(*) from {table.qualified}
                    where _partition in (select part from __files) group by 1"""
            ).fetchall()
        )

    try:
        counts = in_transaction(connection, replace)
    finally:
        connection.execute("drop table if exists __files")
    return {partition: int(counts.get(partition, 0)) for partition in files}


def _delete_partition(
    connection: duckdb.DuckDBPyConnection, table: RawTable, partition: str
) -> None:
    connection.execute(f"delete from {table.qualified} where _partition = ?", [partition])
    connection.execute(f"delete from {table.quarantine} where _partition = ?", [partition])
    connection.execute(
        f"delete from {VERDICTS_TABLE} where table_name = ? and _partition = ?",
        [table.name, partition],
    )


def landing_file(landing_dir: str | Path, partition: str) -> Path:
    """The file a landing partition key names, refused unless it is a plain name in the folder.

    Anyone who can add a dynamic partition chooses the key, so ``../`` or a link must not
    reach a file outside the landing folder, nor a hidden writer's scratch file. The folder
    may be on an object store (``s3://...``, a ``UPath`` is returned), which has no links.
    """
    from keel.storage import is_local, location

    remote = not is_local(landing_dir)
    folder = location(landing_dir) if remote else Path(landing_dir).resolve()
    name = str(partition)
    if (
        name in ("", ".", "..")
        or name.startswith(".")
        or any(separator in name for separator in ("/", "\\", "\0"))
    ):
        raise IngestionError(
            f"landing partition {partition!r} is not a file name inside {folder}: refused"
        )
    if remote:
        return folder / name
    path = folder / name
    if path.resolve().parent != folder:
        raise IngestionError(f"landing file {path} leads outside {folder} (a link): refused")
    return path


def partition_row_count(
    connection: duckdb.DuckDBPyConnection, table: RawTable, partition: str
) -> int:
    """Rows of one raw partition."""
    return int(
        connection.execute(
            f"select count(*) from {table.qualified} where _partition = ?", [partition]
        ).fetchone()[0]
    )


def load_dataset_file(connection: duckdb.DuckDBPyConnection, spec: DatasetSpec) -> int:
    """Load a dataset's source file (checksum verified) as the snapshot of its raw table."""
    source = spec.source
    return load_partition(
        connection,
        dataset_table(spec),
        SNAPSHOT,
        spec.source_file(),
        rename=source.rename,
        # Files without an id column number their rows from 1 (__row counts from 0).
        derived={source.row_number_as: "__row + 1"} if source.row_number_as else None,
    )
