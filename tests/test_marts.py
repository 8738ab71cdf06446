from datetime import date, timedelta

import duckdb

from keel.marts import MartExport, export_days


def _mart(connection: duckdb.DuckDBPyConnection, days: int, accounts: int) -> list[str]:
    connection.execute(
        """create table daily_mart as
           select a.range as account_id, (date '2026-01-01' + d.range::int) as feature_date,
                  a.range * 1.5 as value
           from range(?) a cross join range(?) d""",
        [accounts, days],
    )
    return [(date(2026, 1, 1) + timedelta(days=i)).isoformat() for i in range(days)]


EXPORT = MartExport("daily_mart", "daily", ("account_id", "value"), partition_column="feature_date")


def test_each_day_lands_in_one_file_with_all_its_rows(tmp_path, monkeypatch):
    import keel.marts

    monkeypatch.setattr(keel.marts, "DAYS_PER_COPY", 2)  # several COPYs into one scratch folder
    with duckdb.connect() as connection:
        days = _mart(connection, days=5, accounts=5_000)
        # Past this many open files DuckDB starts new files for a day: they must be merged.
        connection.execute("set partitioned_write_max_open_files = 2")
        connection.execute("set partitioned_write_flush_threshold = 50")
        written = export_days(connection, EXPORT, tmp_path, days)
        landed = connection.execute(
            f"select count(*), count(distinct account_id) from read_parquet('{tmp_path}/daily/*')"
        ).fetchone()
    assert written == {day: 5_000 for day in days}
    assert sorted(p.name for p in (tmp_path / "daily").iterdir()) == [f"{d}.parquet" for d in days]
    assert landed == (25_000, 5_000)
    assert not list(tmp_path.glob(".scratch-*"))


def test_a_day_without_rows_loses_its_stale_file(tmp_path):
    with duckdb.connect() as connection:
        days = _mart(connection, days=2, accounts=10)
        stale = tmp_path / "daily" / "2026-01-05.parquet"
        stale.parent.mkdir(parents=True)
        stale.write_bytes(b"old")
        written = export_days(connection, EXPORT, tmp_path, [*days, "2026-01-05"])
    assert written == {days[0]: 10, days[1]: 10}
    assert not stale.exists()
