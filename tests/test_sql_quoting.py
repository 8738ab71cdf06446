"""Hostile names from files, configuration and partition keys never change the SQL that runs."""

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from keel.ingestion import (
    ACTIVITY_COLUMNS,
    LANDED_ACTIVITY,
    IngestionError,
    landing_file,
    load_partition,
)
from keel.marts import MartExport, export_days, export_table
from keel.sql import UnsafeSqlText, quote_identifier, quote_literal

HOSTILE_COLUMNS = (
    'note"; drop table raw.landed_activity; --',
    "it's",
    "semi;colon",
    'a""b',
)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_hostile_column_names_load_into_extra_and_run_no_sql(tmp_path: Path, suffix: str):
    columns = {name: [f"v{i}", "w"] for i, name in enumerate((*ACTIVITY_COLUMNS, *HOSTILE_COLUMNS))}
    source = tmp_path / f"landed{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.table(columns), source)
    else:
        pacsv.write_csv(pa.table(columns), source)
    with duckdb.connect(str(tmp_path / "warehouse.duckdb")) as connection:
        assert load_partition(connection, LANDED_ACTIVITY, "f", source) == 2
        assert load_partition(connection, LANDED_ACTIVITY, "f", source) == 2  # table still there
        extra = connection.execute(
            "select _extra from raw.landed_activity order by _row_number"
        ).fetchall()
    first = json.loads(extra[0][0])
    assert first == {
        name: f"v{len(ACTIVITY_COLUMNS) + i}" for i, name in enumerate(HOSTILE_COLUMNS)
    }


def test_configured_paths_with_quotes_and_semicolons_export(tmp_path: Path):
    marts = tmp_path / "it's; drop table daily_mart; --"
    export = MartExport("daily mart", "day's", ("account_id", "value"), partition_column="day")
    with duckdb.connect() as connection:
        connection.execute(
            """create table "daily mart" as select range as account_id, range * 2 as value,
               date '2026-01-01' + (range % 2)::int as day from range(10)"""
        )
        written = export_days(connection, export, marts, ["2026-01-01", "2026-01-02"])
        whole = export_table(connection, MartExport("daily mart", "all's", ("value",)), marts)
        assert connection.execute('select count(*) from "daily mart"').fetchone() == (10,)
    assert written == {"2026-01-01": 5, "2026-01-02": 5} and whole == 10
    assert sorted(p.name for p in (marts / "day's").iterdir()) == [
        "2026-01-01.parquet",
        "2026-01-02.parquet",
    ]


@pytest.mark.parametrize(
    "key",
    ["../secret.csv", "..", "sub/landed.csv", "..\\\\secret.csv", ".landed.csv.tmp", "", "a\0b"],
)
def test_a_landing_key_that_leaves_the_folder_is_refused(tmp_path: Path, key: str):
    landing = tmp_path / "landing"
    landing.mkdir()
    (tmp_path / "secret.csv").write_text("account_id\n1\n")
    with pytest.raises(IngestionError, match="refused"):
        landing_file(landing, key)


def test_a_landing_link_out_of_the_folder_is_refused(tmp_path: Path):
    landing = tmp_path / "landing"
    landing.mkdir()
    (tmp_path / "secret.csv").write_text("account_id\n1\n")
    (landing / "innocent.csv").symlink_to(tmp_path / "secret.csv")
    (landing / "2026-03-01.csv").write_text("account_id\n1\n")
    with pytest.raises(IngestionError, match="leads outside"):
        landing_file(landing, "innocent.csv")
    assert landing_file(landing, "2026-03-01.csv") == (landing / "2026-03-01.csv").resolve()


def test_quoting_doubles_the_quote_and_refuses_nul():
    assert quote_identifier('a"b') == '"a""b"'
    assert quote_literal(Path("/x/it's")) == "'/x/it''s'"
    with duckdb.connect() as connection:
        name = 'x"; select 1; --'
        row = connection.execute(f"select 1 as {quote_identifier(name)}, {quote_literal(name)}")
        assert [d[0] for d in row.description] == [name, row.description[1][0]]
        assert row.fetchone()[1] == name
    with pytest.raises(UnsafeSqlText):
        quote_identifier("a\0b")
