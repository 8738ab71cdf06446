"""The team profile's warehouse: a DuckLake, catalog in this machine's Postgres, Parquet files.

Each test gets its own catalog database (``keel_c_lake_<random>``, dropped afterwards) and its
own data path, so tests and workers never share a lake by accident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import date
from pathlib import Path

import dagster as dg
import duckdb
import psycopg2
import pytest

from assets.ingestion import INGESTION_CHECKS, raw_account_activity
from keel import schema
from keel.generator import generate_day
from keel.ingestion import ACCOUNT_ACTIVITY, DEFAULT_LABELS, load_partition, load_partitions
from keel.lake import LakeError, ensure_catalog_database, extension_file, in_transaction
from keel.settings import KeelPaths
from orchestration.resources import SourcesResource, WarehouseResource
from tests.lake_support import big_activity_csv, kill_a_load_once_it_writes

POSTGRES = "postgresql://postgres@127.0.0.1:5432"
DAYS = ("2026-01-05", "2026-01-06")
REPO = Path(__file__).resolve().parent.parent


def _admin():
    link = psycopg2.connect(f"{POSTGRES}/test", connect_timeout=5)
    link.autocommit = True
    return link


def _database_exists(name: str) -> bool:
    with _admin() as link, link.cursor() as cursor:
        cursor.execute("select 1 from pg_database where datname = %s", [name])
        return cursor.fetchone() is not None


@pytest.fixture
def catalog():
    """A Postgres connection string naming a database that does not exist yet."""
    name = f"keel_c_lake_{uuid.uuid4().hex[:10]}"
    yield f"{POSTGRES}/{name}"
    link = _admin()
    try:
        with link.cursor() as cursor:
            cursor.execute(f'drop database if exists "{name}" with (force)')
    finally:
        link.close()


@pytest.fixture(scope="module")
def extension_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("duckdb-extensions")


@pytest.fixture
def lake(catalog, tmp_path, extension_dir) -> WarehouseResource:
    return WarehouseResource(
        catalog=catalog,
        data_path=str(tmp_path / "shared" / "lake"),
        extension_dir=str(extension_dir),
        marts_dir=str(tmp_path / "shared" / "marts"),
    )


def _sources(home: KeelPaths) -> SourcesResource:
    return SourcesResource(
        generated_dir=str(home.generated),
        landing_dir=str(home.landing),
        accounts=300,
        late_share=0.02,
    )


def _partition_digest(warehouse: WarehouseResource, day: str):
    with warehouse.connect(read_only=True) as connection:
        return connection.execute(
            """select count(*), count(distinct (account_id, activity_date)),
                      sum(hash(account_id, spend_amount, _row_number))
               from raw.account_activity where _partition = ?""",
            [day],
        ).fetchone()


def test_the_team_profile_writes_and_reads_the_lake(keel_home, catalog, monkeypatch, tmp_path):
    """The team warehouse creates its catalog database, writes Parquet under the data path
    and a second connection (another worker) reads the same rows through the catalog."""
    from orchestration.profiles import resources_for

    monkeypatch.setenv("KEEL_LAKE_CATALOG", catalog)
    monkeypatch.delenv("KEEL_LAKE_DATA_PATH", raising=False)
    warehouse = resources_for("team")["warehouse"]
    assert not _database_exists(catalog.rsplit("/", 1)[1])
    source = tmp_path / "day.csv"
    # Past DuckLake's inlining limit (10 rows), which keeps smaller writes in the catalog.
    source.write_text(
        "account_id,activity_date,spend_amount\n"
        + "".join(f"{i},2026-01-05,{i}.5\n" for i in range(50))
    )

    with warehouse.connect() as connection:
        assert connection.execute("select current_database()").fetchone() == ("lake",)
        assert load_partition(connection, ACCOUNT_ACTIVITY, "2026-01-05", source) == 50
    assert _database_exists(catalog.rsplit("/", 1)[1])
    with warehouse.connect(read_only=True) as other:
        rows = other.execute(
            "select account_id, spend_amount from raw.account_activity order by _row_number"
        ).fetchall()
        files = other.execute(
            "select data_file from ducklake_list_files('lake', 'account_activity', schema => 'raw')"
        ).fetchall()
    assert rows == [(str(i), f"{i}.5") for i in range(50)]
    # The rows live in Parquet under the shared data folder, not in a DuckDB file.
    lake_folder = keel_home.home / "lake"
    assert files and all(Path(f).is_relative_to(lake_folder) and Path(f).exists() for (f,) in files)
    assert not list(keel_home.home.glob("*.duckdb"))
    with warehouse.connect(read_only=True) as reader, pytest.raises(duckdb.Error):
        reader.execute("delete from raw.account_activity")


def test_a_reloaded_partition_replaces_the_old_rows(lake, tmp_path):
    """Loading a day again (the raw-table writer the ingestion asset uses) keeps one copy."""
    extract = tmp_path / "activity.csv"
    extract.write_text(
        "account_id,activity_date,spend_amount,channel\n"
        + "".join(f"{i},{DAYS[0]},{i % 7}.5,pos\n" for i in range(300))
    )
    digests = []
    for _ in range(2):
        with lake.connect() as connection:
            load_partitions(connection, ACCOUNT_ACTIVITY, {DAYS[0]: extract})
        digests.append(_partition_digest(lake, DAYS[0]))
    assert digests[0][:2] == (300, 300)
    assert digests[1] == digests[0]


def test_a_failure_mid_write_leaves_the_old_partition_whole(lake, tmp_path):
    """A file that breaks after the old rows were deleted rolls the whole partition back."""
    good = tmp_path / "good.csv"
    good.write_text("account_id,activity_date\n" + "".join(f"{i},2026-01-05\n" for i in range(50)))
    # DuckDB samples the head of a CSV to read its layout; the broken line comes much later,
    # so the delete of the old rows and part of the insert have run when it fails.
    broken = tmp_path / "broken.csv"
    lines = "".join(f"{i},2026-01-05\n" for i in range(25_000))
    broken.write_text(f"account_id,activity_date\n{lines}1,2,3,4,5,6\n")
    with lake.connect() as connection:
        load_partition(connection, ACCOUNT_ACTIVITY, DAYS[0], good)
    before = _partition_digest(lake, DAYS[0])

    with lake.connect() as connection, pytest.raises(duckdb.Error):
        load_partition(connection, ACCOUNT_ACTIVITY, DAYS[0], broken)

    assert _partition_digest(lake, DAYS[0]) == before
    assert before[0] == 50
    with lake.connect(read_only=True) as connection:
        sources = connection.execute(
            "select distinct _source_file from raw.account_activity"
        ).fetchall()
    assert sources == [(str(good),)]


def _replace_day(connection, day: str, rows: int) -> None:
    """Replace ``day`` of the activity table with ``rows`` rows, uncommitted (as a load does)."""
    connection.execute("delete from raw.account_activity where _partition = ?", [day])
    connection.execute(
        """insert into raw.account_activity (_partition, _row_number, _loaded_at, account_id)
           select ?, i, now(), i::varchar from range(?) t(i)""",
        [day, rows],
    )


def test_a_replacement_refused_as_a_conflict_runs_again(lake, tmp_path):
    """Another worker replaces its day while ours is uncommitted: DuckLake refuses our commit
    (both deleted from one table), and in_transaction writes our day again on the new snapshot."""
    sources = {}
    for day, count in ((DAYS[0], 40), (DAYS[1], 30)):
        sources[day] = tmp_path / f"{day}.csv"
        sources[day].write_text(
            "account_id,activity_date\n" + "".join(f"{i},{day}\n" for i in range(count))
        )
    with lake.connect() as connection:
        for day, source in sources.items():
            load_partition(connection, ACCOUNT_ACTIVITY, day, source)
    attempts = []

    def replace_ours() -> None:
        attempts.append(1)
        _replace_day(connection, DAYS[0], rows=25)
        if len(attempts) == 1:
            with lake.connect() as other:
                load_partition(other, ACCOUNT_ACTIVITY, DAYS[1], sources[DAYS[1]])

    with lake.connect() as connection:
        in_transaction(connection, replace_ours)
    assert len(attempts) == 2
    assert _partition_digest(lake, DAYS[0])[:2] == (25, 25)
    assert _partition_digest(lake, DAYS[1])[:2] == (30, 30)


def test_a_commit_to_another_table_meanwhile_neither_refuses_nor_repeats_ours(lake, tmp_path):
    """Another worker loads a day of the labels while our activity day is uncommitted (raw
    loads of different tables run side by side on the team profile): both commit, ours once."""
    activity = tmp_path / "activity.csv"
    activity.write_text(
        "account_id,activity_date\n" + "".join(f"{i},{DAYS[0]}\n" for i in range(40))
    )
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "account_id,observation_date\n" + "".join(f"{i},{DAYS[0]}\n" for i in range(15))
    )
    with lake.connect() as connection:
        load_partition(connection, ACCOUNT_ACTIVITY, DAYS[0], activity)
    attempts = []

    def replace_ours() -> None:
        attempts.append(1)
        _replace_day(connection, DAYS[0], rows=25)
        with lake.connect() as other:
            load_partition(other, DEFAULT_LABELS, DAYS[0], labels)

    with lake.connect() as connection:
        in_transaction(connection, replace_ours)
    assert len(attempts) == 1
    assert _partition_digest(lake, DAYS[0])[:2] == (25, 25)
    with lake.connect(read_only=True) as connection:
        landed = connection.execute(
            "select count(*) from raw.default_labels where _partition = ?", [DAYS[0]]
        ).fetchone()
    assert landed == (15,)


WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    import dagster as dg

    from assets.ingestion import INGESTION_CHECKS, raw_account_activity
    from orchestration.resources import SourcesResource, WarehouseResource

    settings = json.loads(sys.argv[1])
    resources = {
        "warehouse": WarehouseResource(**settings["warehouse"]),
        "sources": SourcesResource(**settings["sources"]),
    }
    print("ready", flush=True)
    for go in map(Path, settings["rounds"]):
        while not go.exists():
            time.sleep(0.01)
        started = time.time()
        result = dg.materialize(
            [raw_account_activity, INGESTION_CHECKS[1]],
            resources=resources,
            partition_key=settings["day"],
        )
        report = {"success": result.success, "start": started, "end": time.time()}
        print("REPORT", json.dumps(report), flush=True)
    """
)


def _round(workers, go: Path) -> list[dict]:
    go.touch()
    reports = []
    for worker in workers:
        line = ""
        while not line.startswith("REPORT "):
            line = worker.stdout.readline()
            assert line, f"worker {worker.pid} ended (exit {worker.wait(timeout=30)})"
        reports.append(json.loads(line.removeprefix("REPORT ")))
    assert all(report["success"] for report in reports), reports
    # The two loads ran side by side, not one after the other.
    first, second = reports
    assert first["start"] < second["end"] and second["start"] < first["end"], reports
    return reports


def _check_days(lake: WarehouseResource, expected: dict[str, int]) -> None:
    for day, rows in expected.items():
        assert _partition_digest(lake, day)[:2] == (rows, rows)
    with lake.connect(read_only=True) as connection:
        verdicts = connection.execute(
            """select _partition, count(*) from validation.partition_verdicts
               where table_name = 'account_activity' group by 1 order by 1"""
        ).fetchall()
        other = connection.execute(
            "select count(*) from raw.account_activity where _partition not in (?, ?)", DAYS
        ).fetchone()
    assert verdicts == [(day, 1) for day in DAYS]
    assert other == (0,)


@pytest.mark.slow
def test_two_worker_processes_load_different_days_of_one_table_at_once(lake, keel_home, tmp_path):
    """Two processes materialise two days of raw_account_activity at the same moment: first
    into a new lake (both create its catalog and tables), then again after one backfill
    wrote both days in one transaction. Both days land whole, once each, every time."""
    sources = _sources(keel_home)
    config = sources.generator_config()
    extracts, expected = {}, {}
    for day in DAYS:
        extracts[day] = generate_day(
            config, date.fromisoformat(day), Path(sources.generated_dir), keel_home.landing
        ).activity
        with duckdb.connect() as connection:
            expected[day] = connection.execute(
                "select count(*) from read_parquet(?)", [str(extracts[day])]
            ).fetchone()[0]
    assert min(expected.values()) > 250
    rounds = [str(tmp_path / "go-new-lake"), str(tmp_path / "go-after-backfill")]
    workers = []
    for day in DAYS:
        settings = {
            "warehouse": lake.model_dump(),
            "sources": {
                "generated_dir": sources.generated_dir,
                "landing_dir": sources.landing_dir,
            },
            "day": day,
            "rounds": rounds,
        }
        workers.append(
            subprocess.Popen(
                [sys.executable, "-c", WORKER, json.dumps(settings)],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for worker in workers:
            assert worker.stdout.readline().strip() == "ready"
        _round(workers, Path(rounds[0]))
        _check_days(lake, expected)

        # A single-run backfill writes both days in one statement, so into shared files;
        # the workers then replace their days at once again.
        with lake.connect() as connection:
            assert load_partitions(connection, ACCOUNT_ACTIVITY, extracts) == expected
        _round(workers, Path(rounds[1]))
        _check_days(lake, expected)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(timeout=30)

    # The asset run again for one day replaces that day: the same rows, once.
    before = _partition_digest(lake, DAYS[0])
    resources = {"warehouse": lake, "sources": sources}
    selection = [raw_account_activity, INGESTION_CHECKS[1]]
    assert dg.materialize(selection, resources=resources, partition_key=DAYS[0]).success
    assert _partition_digest(lake, DAYS[0]) == before


def test_an_unreachable_catalog_says_how_to_start_postgres(tmp_path, extension_dir):
    with pytest.raises(LakeError, match="cannot be reached") as error:
        ensure_catalog_database("postgresql://postgres@127.0.0.1:1/keel_c_lake_nowhere")
    assert "apt-get install postgresql" in str(error.value)
    assert "KEEL_LAKE_CATALOG" in str(error.value)
    warehouse = WarehouseResource(
        catalog="dbname=keel_c_lake_nowhere host=127.0.0.1 port=1 user=postgres",
        data_path=str(tmp_path / "lake"),
        extension_dir=str(extension_dir),
        marts_dir=str(tmp_path / "marts"),
    )
    with pytest.raises(LakeError, match=r"127\.0\.0\.1:1\b"), warehouse.connect():
        pass


def test_a_missing_extension_package_is_named_with_its_pin():
    assert extension_file("ducklake").is_file()
    with pytest.raises(
        LakeError, match=f"pip install duckdb-extension-nosuch=={duckdb.__version__}"
    ):
        extension_file("nosuch")


def test_a_second_machine_with_another_data_path_is_refused(lake, tmp_path):
    with lake.connect() as connection:
        connection.execute("create table t as select 1 as a")
    elsewhere = lake.model_copy(update={"data_path": str(tmp_path / "elsewhere")})
    with pytest.raises(LakeError, match="KEEL_LAKE_DATA_PATH"), elsewhere.connect():
        pass


def test_the_warehouse_takes_a_file_or_a_lake_not_both(tmp_path):
    both = WarehouseResource(
        database=str(tmp_path / "w.duckdb"),
        catalog=f"{POSTGRES}/keel_c_lake_unused",
        data_path=str(tmp_path / "lake"),
        marts_dir=str(tmp_path / "marts"),
    )
    with pytest.raises(ValueError, match="exactly one"), both.connect():
        pass
    assert not (tmp_path / "w.duckdb").exists()


def _pipeline(resources) -> dg.Definitions:
    from assets.ingestion import INGESTION_ASSETS, raw_account_holders, raw_default_labels
    from assets.transformation import TRANSFORMATION_ASSETS, TRANSFORMATION_CHECKS

    daily = dg.AssetSelection.assets(raw_account_activity, raw_default_labels) | (
        dg.AssetSelection.tag("dagster/kind/dbt", "").downstream()
        & dg.AssetSelection.assets(
            "stg_generator__account_activity",
            "stg_landing__account_activity",
            "int_account_activity_unioned",
            "stg_generator__default_labels",
            "fct_account_features_daily",
            "fct_default_labels",
        )
    )
    return dg.Definitions(
        assets=[*INGESTION_ASSETS, *TRANSFORMATION_ASSETS],
        asset_checks=[*INGESTION_CHECKS, *TRANSFORMATION_CHECKS],
        jobs=[
            # The accounts dimension only: a dataset folder's unpartitioned marts play no part.
            dg.define_asset_job(
                "static",
                selection=dg.AssetSelection.assets(
                    raw_account_holders, "stg_generator__account_holders", "dim_accounts"
                ),
            ),
            dg.define_asset_job("daily", selection=daily),
        ],
        resources=resources,
    )


def _build(resources, first: str, last: str) -> None:
    defs = _pipeline(resources)
    instance = dg.DagsterInstance.ephemeral()
    assert defs.resolve_job_def("static").execute_in_process(instance=instance).success
    tags = {
        "dagster/asset_partition_range_start": first,
        "dagster/asset_partition_range_end": last,
    }
    assert defs.resolve_job_def("daily").execute_in_process(tags=tags, instance=instance).success


FEATURES_SQL = """select * exclude (created_timestamp) from fct_account_features_daily
                  order by account_id, feature_date"""


@pytest.mark.slow
def test_the_same_dbt_models_build_the_same_features_on_the_lake(lake, keel_home, tmp_path):
    """Ingestion, validation, dbt and the Parquet marts on the lake give the local profile's
    features for the same world, day for day."""
    sources = _sources(keel_home)
    local = WarehouseResource(
        database=str(tmp_path / "local" / "warehouse.duckdb"),
        marts_dir=str(tmp_path / "local" / "marts"),
    )
    from orchestration.profiles import dbt_resource

    (tmp_path / "local").mkdir()
    for warehouse in (local, lake):
        _build({"warehouse": warehouse, "sources": sources, "dbt": dbt_resource()}, *DAYS)

    with local.connect(read_only=True) as connection:
        expected = connection.execute(FEATURES_SQL).fetchall()
    with lake.connect(read_only=True) as connection:
        built = connection.execute(FEATURES_SQL).fetchall()
        tables = connection.execute(
            "select table_catalog, table_schema from information_schema.tables "
            "where table_name = 'fct_account_features_daily'"
        ).fetchall()
    assert len(expected) > 500
    assert built == expected
    assert tables == [("lake", "main")]
    for day in DAYS:
        landed = Path(lake.marts_dir) / schema.FEATURES_MART / f"{day}.parquet"
        with duckdb.connect() as connection:
            rows = connection.execute("select count(*) from read_parquet(?)", [str(landed)])
            assert rows.fetchone()[0] == sum(1 for row in expected if str(row[1]) == day)


@pytest.fixture
def s3_store(monkeypatch):
    """A local S3-compatible server (moto's server mode) with an empty bucket."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }.items():
            monkeypatch.setenv(name, value)
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket="keel-c-lake")
        yield client
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_the_lake_keeps_its_parquet_on_an_object_store(s3_store, catalog, extension_dir, tmp_path):
    warehouse = WarehouseResource(
        catalog=catalog,
        data_path="s3://keel-c-lake/lake",
        extension_dir=str(extension_dir),
        marts_dir=str(tmp_path / "marts"),
    )
    source = tmp_path / "day.csv"
    source.write_text(
        "account_id,activity_date\n" + "".join(f"{i},2026-01-05\n" for i in range(50))
    )
    with warehouse.connect() as connection:
        assert load_partition(connection, ACCOUNT_ACTIVITY, DAYS[0], source) == 50
    keys = [item["Key"] for item in s3_store.list_objects_v2(Bucket="keel-c-lake")["Contents"]]
    assert any(k.startswith("lake/raw/account_activity/") and k.endswith(".parquet") for k in keys)
    assert not list(tmp_path.rglob("*.parquet"))
    assert _partition_digest(warehouse, DAYS[0])[:2] == (50, 50)


@pytest.mark.slow
def test_a_worker_killed_while_it_writes_leaves_the_old_partition(lake, tmp_path):
    """kill -9 while the new rows are being written as Parquet: the catalog never lists
    them, and the day reads as it was before."""
    good = tmp_path / "good.csv"
    good.write_text("account_id,activity_date\n" + "".join(f"{i},2026-01-05\n" for i in range(60)))
    with lake.connect() as connection:
        load_partition(connection, ACCOUNT_ACTIVITY, DAYS[0], good)
    before = _partition_digest(lake, DAYS[0])
    table_folder = Path(lake.data_path) / "raw" / "account_activity"
    big = big_activity_csv(tmp_path / "big.csv", DAYS[0])
    written = kill_a_load_once_it_writes(
        lake, DAYS[0], big, lambda: set(table_folder.rglob("*.parquet"))
    )
    assert written

    assert _partition_digest(lake, DAYS[0]) == before
    with lake.connect(read_only=True) as connection:
        listed = {
            Path(f)
            for (f,) in connection.execute(
                "select data_file from ducklake_list_files('lake', 'account_activity', "
                "schema => 'raw')"
            ).fetchall()
        }
    assert not listed & written
