"""Lake maintenance on a real lake: catalog in this machine's Postgres, Parquet in a folder.

Each test gets its own catalog database (``maint_lake_<random>``, dropped afterwards).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import duckdb
import psycopg2
import pytest
from click.testing import CliRunner

from keel.ingestion import ACCOUNT_ACTIVITY, load_partition
from keel.lake_maintenance import maintain, parse_age
from orchestration.pools import WAREHOUSE_POOL
from orchestration.resources import WarehouseResource
from tests.lake_support import big_activity_csv, kill_a_load_once_it_writes

POSTGRES = "postgresql://postgres@127.0.0.1:5432"
DAY = "2026-01-05"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def lake(tmp_path, tmp_path_factory) -> WarehouseResource:
    name = f"maint_lake_{uuid.uuid4().hex[:10]}"
    yield WarehouseResource(
        catalog=f"{POSTGRES}/{name}",
        data_path=str(tmp_path / "lake"),
        extension_dir=str(tmp_path_factory.getbasetemp() / "duckdb-extensions"),
        marts_dir=str(tmp_path / "marts"),
    )
    link = psycopg2.connect(f"{POSTGRES}/test", connect_timeout=5)
    try:
        link.autocommit = True
        with link.cursor() as cursor:
            cursor.execute(f'drop database if exists "{name}" with (force)')
    finally:
        link.close()


def _extract(folder: Path, day: str, rows: int, salt: int = 0) -> Path:
    source = folder / f"{day}-{salt}.csv"
    source.write_text(
        "account_id,activity_date,spend_amount\n"
        + "".join(f"{i},{day},{(i * 7 + salt) % 101}.5\n" for i in range(rows))
    )
    return source


def _reload(lake: WarehouseResource, folder: Path, times: int) -> None:
    """A day loaded, then replaced ``times`` times, as reruns of its daily load do."""
    with lake.connect() as connection:
        for salt in range(times + 1):
            load_partition(connection, ACCOUNT_ACTIVITY, DAY, _extract(folder, DAY, 200, salt))


def _stored(lake: WarehouseResource) -> dict[Path, int]:
    return {path: path.stat().st_size for path in Path(lake.data_path).rglob("*.parquet")}


def _contents(lake: WarehouseResource, table: str = "raw.account_activity") -> list[tuple]:
    with lake.connect(read_only=True) as connection:
        return connection.execute(f"select * from {table} order by all").fetchall()


def _snapshots(lake: WarehouseResource) -> int:
    with lake.connect(read_only=True) as connection:
        return connection.execute("select count(*) from ducklake_snapshots('lake')").fetchone()[0]


def test_maintenance_keeps_the_rows_and_leaves_fewer_files_and_one_snapshot(lake, tmp_path):
    """A reloaded day and small appends: the same rows after, the old files deleted, the small
    files merged, every snapshot but the latest expired, and the bytes reported as freed."""
    _reload(lake, tmp_path, times=2)
    with lake.connect() as connection:
        connection.execute("create table events (id integer, kind varchar)")
        for batch in range(4):
            # Past DuckLake's inlining limit, so each append is a Parquet file of its own.
            connection.execute(
                "insert into events select i, ? from range(?, ? + 50) t(i)",
                [f"batch-{batch}", batch * 50, batch * 50],
            )
    activity, events = _contents(lake), _contents(lake, "events")
    stored, snapshots = _stored(lake), _snapshots(lake)
    assert len(activity) == 200 and len(events) == 200
    # Three versions of the day and four appends.
    assert len(stored) == 7 and snapshots > 7

    with lake.connect() as connection:
        summary = maintain(connection, older_than="0", grace="0")

    after = _stored(lake)
    assert _contents(lake) == activity and _contents(lake, "events") == events
    assert _snapshots(lake) == 1
    assert summary.snapshots_expired >= snapshots - 1
    # The day's latest file and the four appends merged into one.
    assert len(after) == 2
    assert (summary.live_files_before, summary.live_files_after) == (5, 2)
    assert (summary.files_compacted, summary.files_written) == (4, 1)
    gone = set(stored) - set(after)
    assert summary.files_deleted == len(gone) == 6
    assert summary.bytes_deleted == sum(stored[path] for path in gone) > 0
    assert summary.orphans_deleted == 0


def test_a_dry_run_deletes_nothing_and_files_wait_out_their_grace(lake, tmp_path):
    """Expired snapshots' files are only scheduled while younger than the grace; a dry run
    then lists them and an orphan without touching anything; a real run deletes the same."""
    _reload(lake, tmp_path, times=1)
    with lake.connect() as connection:
        first = maintain(connection, older_than="0", grace="1d")
    assert first.snapshots_expired > 0
    assert first.files_deleted == first.orphans_deleted == 0
    stored = _stored(lake)
    assert len(stored) == 2
    orphan = Path(lake.data_path) / "raw" / "account_activity" / "left-behind.parquet"
    duckdb.sql(f"copy (select 1 as a) to '{orphan}' (format parquet)")

    with lake.connect() as connection:
        dry = maintain(connection, older_than="0", grace="0", dry_run=True)
    assert _stored(lake) == {**stored, orphan: orphan.stat().st_size}
    assert _snapshots(lake) == 1
    assert (dry.files_deleted, dry.orphans_deleted) == (1, 1)
    assert dry.bytes_deleted > orphan.stat().st_size
    assert dry.rows_flushed == dry.files_compacted == 0

    with lake.connect() as connection:
        real = maintain(connection, older_than="0", grace="0")
    assert (real.files_deleted, real.orphans_deleted, real.bytes_deleted) == (
        dry.files_deleted,
        dry.orphans_deleted,
        dry.bytes_deleted,
    )
    assert len(_stored(lake)) == 1 and not orphan.exists()


@pytest.mark.slow
def test_the_file_a_killed_load_leaves_is_deleted_as_an_orphan(lake, tmp_path):
    """kill -9 while a load writes its Parquet: no snapshot lists the file; maintenance
    deletes it once it is past the grace, and the day reads as it did."""
    _reload(lake, tmp_path, times=0)
    before = _contents(lake)
    existing = set(_stored(lake))
    big = big_activity_csv(tmp_path / "big.csv", DAY)
    left = kill_a_load_once_it_writes(lake, DAY, big, lambda: set(_stored(lake)))
    assert left

    with lake.connect() as connection:
        young = maintain(connection, grace="1h")
        assert young.orphans_deleted == 0  # a load might still be writing it
        summary = maintain(connection, grace="0")
    assert summary.orphans_deleted == len(left)
    assert set(_stored(lake)) == existing
    assert _contents(lake) == before


def test_ages_are_a_number_and_a_unit():
    assert parse_age("7d").days == 7 and parse_age("12h").total_seconds() == 43_200
    assert parse_age("0").total_seconds() == 0
    with pytest.raises(ValueError, match="7d"):
        parse_age("a week")


def test_the_command_refuses_the_local_profile_which_has_no_lake(keel_home):
    from keel.cli import cli

    result = CliRunner().invoke(cli, ["lake", "maintain", "--dry-run"])
    assert result.exit_code == 1
    assert "not a lake" in result.output
    assert not list(keel_home.home.rglob("*.duckdb"))


def test_the_command_maintains_the_team_profiles_lake(lake, tmp_path, keel_home, monkeypatch):
    _reload(lake, tmp_path, times=1)
    monkeypatch.setenv("KEEL_PROFILE", "team")
    monkeypatch.setenv("KEEL_LAKE_CATALOG", lake.catalog)
    monkeypatch.setenv("KEEL_LAKE_DATA_PATH", lake.data_path)
    from keel.cli import cli

    stored = _stored(lake)
    dry = CliRunner().invoke(cli, ["lake", "maintain", "--older-than", "0", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "expire snapshots" in dry.output and _stored(lake) == stored
    result = CliRunner().invoke(
        cli, ["lake", "maintain", "--older-than", "0", "--grace", "0", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["files_deleted"] == 1 and len(_stored(lake)) == 1
    bad = CliRunner().invoke(cli, ["lake", "maintain", "--older-than", "a week"])
    assert bad.exit_code == 2 and "--older-than" in bad.output


def test_the_weekly_job_is_defined_where_the_warehouse_is_a_lake(keel_home):
    """In the warehouse pool, on Sundays; the local profile's graph has neither (see
    test_definitions), the team's gets both."""
    from orchestration.lake_maintenance import lake_definitions
    from orchestration.profiles import resources_for

    for profile in ("team", "production"):
        jobs, schedules = lake_definitions(resources_for(profile)["warehouse"])
        assert [job.name for job in jobs] == ["lake_maintenance"]
        assert [node.definition.pool for node in jobs[0].nodes] == [WAREHOUSE_POOL]
        assert [(s.name, s.cron_schedule) for s in schedules] == [
            ("lake_maintenance_schedule", "0 5 * * 0")
        ]
    assert lake_definitions(resources_for("local")["warehouse"]) == ([], [])
    probe = (
        "from orchestration.definitions import defs\n"
        "print(defs.resolve_job_def('lake_maintenance').name,"
        " sorted(s.name for s in defs.schedules if s.name.startswith('lake')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env={**os.environ, "KEEL_PROFILE": "team", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["lake_maintenance", "['lake_maintenance_schedule']"]


def test_the_job_runs_maintenance_and_reports_its_numbers(lake, tmp_path):
    """Inlined rows flushed to a file, a file half deleted rewritten, the summary as metadata."""
    from orchestration.lake_maintenance import lake_maintenance

    _reload(lake, tmp_path, times=1)
    with lake.connect() as connection:
        # Within DuckLake's inlining limit: the rows stay in the catalog until flushed.
        connection.execute("create table events as select range as id from range(3)")
        connection.execute("create table halved as select range as id from range(100)")
        connection.execute("delete from halved where id % 2 = 0")
    # Two versions of the day, the halved table's file and its delete file.
    assert len(_stored(lake)) == 4
    config = {"ops": {"maintain_lake": {"config": {"older_than": "0", "grace": "0"}}}}
    result = lake_maintenance.execute_in_process(run_config=config, resources={"warehouse": lake})
    assert result.success
    [metadata] = [
        event.step_output_data.metadata
        for event in result.all_node_events
        if event.is_successful_output
    ]
    numbers = {name: value.value for name, value in metadata.items()}
    assert numbers["rows_flushed"] == 3
    assert (numbers["files_compacted"], numbers["files_written"]) == (1, 1)
    assert numbers["files_deleted"] == 3 and numbers["snapshots_expired"] > 0
    assert (numbers["live_files_before"], numbers["live_files_after"]) == (3, 3)
    assert len(_stored(lake)) == 3
    assert _contents(lake, "events") == [(0,), (1,), (2,)]
    assert _contents(lake, "halved") == [(i,) for i in range(1, 100, 2)]
