"""The storage layer on a local folder and on s3:// (moto's S3 server on this machine).

Writes are whole or nothing on both: a writer killed mid-upload leaves the previous object,
two writers of one file never share a scratch name, and the marts, a training set and its
pointer written to s3:// are read back by the same code that reads them locally.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import date
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from keel import schema
from keel.marts import ACCOUNTS_EXPORT, FEATURES_EXPORT, export_days, export_table
from keel.storage import (
    StorageError,
    list_files,
    location,
    publish,
    store_of,
    write_pointer,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DAYS = ["2026-01-01", "2026-01-02", "2026-01-03"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3-compatible server (moto's) on a free local port, as s3fs's own tests run one."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch) -> str:
    """A fresh bucket; the AWS variables point s3fs, pyarrow and DuckDB at the local server."""
    import boto3
    import s3fs

    for name, value in {
        "AWS_ACCESS_KEY_ID": "keel-d-test",
        "AWS_SECRET_ACCESS_KEY": "keel-d-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"keel-d-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def _object_names(url: str) -> list[str]:
    """Every object under ``url``, hidden or not, relative to it."""
    folder = location(url)
    prefix = folder.path.rstrip("/") + "/"
    return sorted(path.removeprefix(prefix) for path in folder.fs.find(folder.path))


def _features_table(connection: duckdb.DuckDBPyConnection, days: list[str], value: float) -> None:
    """A ``fct_account_features_daily`` table of 5 accounts per day, every feature ``value``."""
    numeric = [c for c in FEATURES_EXPORT.columns[3:] if c not in schema.DAILY_CATEGORICAL_FEATURES]
    features = ", ".join(
        [f"{value}::double as {column}" for column in numeric]
        + [f"'x' as {column}" for column in schema.DAILY_CATEGORICAL_FEATURES]
    )
    connection.execute(
        f"""create or replace table {FEATURES_EXPORT.model} as
            select account as account_id, day::date as feature_date,
                (day::date + interval 1 day)::timestamp as event_timestamp,
                (day::date + interval 26 hour)::timestamp as created_timestamp, {features}
            from unnest(?::varchar[]) as d(day), range(5) as a(account)""",
        [days],
    )


def test_marts_land_on_s3_whole_and_the_readers_read_them_back(bucket):
    from keel.inference import entity_rows
    from keel.windows import newest_timestamp

    marts = f"{bucket}/keel/marts"
    connection = duckdb.connect()
    _features_table(connection, DAYS, 1.5)
    written = export_days(connection, FEATURES_EXPORT, marts, DAYS)
    assert written == dict.fromkeys(DAYS, 5)
    # Only the day files: no scratch object ever reaches the bucket.
    assert _object_names(marts) == [f"{FEATURES_EXPORT.target}/{day}.parquet" for day in DAYS]
    rows = entity_rows(marts, date(2026, 1, 2))
    assert rows[schema.ENTITY_KEY].tolist() == [0, 1, 2, 3, 4]
    folder = f"{marts}/{FEATURES_EXPORT.target}"
    assert newest_timestamp(folder, schema.EVENT_TIMESTAMP) == pd.Timestamp("2026-01-04", tz="UTC")

    # A rerun where a day lost its rows removes that day's stale file.
    _features_table(connection, ["2026-01-01", "2026-01-03"], 2.5)
    assert export_days(connection, FEATURES_EXPORT, marts, DAYS) == dict.fromkeys(
        ["2026-01-01", "2026-01-03"], 5
    )
    assert [p.name for p in list_files(folder, ".parquet")] == [
        "2026-01-01.parquet",
        "2026-01-03.parquet",
    ]
    with location(folder, "2026-01-03.parquet").open("rb") as handle:
        assert pd.read_parquet(handle)["balance"].tolist() == [2.5] * 5

    connection.execute(
        "create table dim_accounts as select range as account_id, date '2020-01-01' as "
        "opened_date, 40 as age, '35-44' as age_band, 'F' as sex, 'north' as region, "
        "'card' as product, 1000.0 as credit_limit from range(7)"
    )
    assert export_table(connection, ACCOUNTS_EXPORT, marts) == 7
    assert f"{ACCOUNTS_EXPORT.target}" in _object_names(marts)


def test_predictions_and_pointers_through_the_artefact_store_on_s3(bucket):
    from assets.inference import read_predictions
    from keel.inference import write_predictions
    from orchestration.resources import ArtefactStore

    artefacts = ArtefactStore(root=f"{bucket}/keel/artefacts")
    frame = pd.DataFrame({schema.ENTITY_KEY: [3, 1, 2], "score": [0.1, 0.9, 0.5]})
    write_predictions(frame, artefacts.path("predictions", "2026-01-02.parquet"))
    pd.testing.assert_frame_equal(read_predictions(artefacts, "2026-01-02"), frame)

    with pytest.raises(StorageError, match="nothing was written"):
        artefacts.read_pointer("training_sets", "svc")
    artefacts.write("v1 bytes", "training_sets", "svc", "v1.parquet")
    artefacts.write_pointer({"path": "v1.parquet", "rows": 3}, "training_sets", "svc")
    assert artefacts.read_pointer("training_sets", "svc") == {"path": "v1.parquet", "rows": 3}
    assert _object_names(f"{bucket}/keel/artefacts") == [
        "predictions/2026-01-02.parquet",
        "training_sets/svc/latest.json",
        "training_sets/svc/v1.parquet",
    ]


UPLOADER = """
import sys
from pathlib import Path

import keel.storage as storage
from upath import UPath

# Small parts, so that the upload is a multipart one that takes a while.
storage.UPLOAD_PART_BYTES = 5 * 2**20
# One part at a time, as a slow link would send them.
storage.publish(Path(sys.argv[1]), UPath(sys.argv[2], max_concurrency=1))
"""


def test_an_upload_killed_half_way_leaves_the_previous_object(bucket, tmp_path):
    import boto3

    target = location(bucket, "keel", "marts", "big.parquet")
    write_pointer(location(bucket, "keel", "marts"), {"version": 1})
    target.write_bytes(b"the previous, whole content")
    scratch = tmp_path / "big.parquet"
    scratch.write_bytes(os.urandom(1 << 20) * 40)
    child = subprocess.Popen(
        [sys.executable, "-c", UPLOADER, str(scratch), str(target)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    client, name = boto3.client("s3"), bucket.removeprefix("s3://")
    parts = 0
    deadline = time.monotonic() + 60
    try:
        # Kill the writer once the store holds some, not all, of the new content.
        while parts == 0 and time.monotonic() < deadline and child.poll() is None:
            for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
                listed = client.list_parts(
                    Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                parts = len(listed.get("Parts", []))
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert 0 < parts < 8, f"the upload was not caught half-way ({parts} parts)"
    target.fs.invalidate_cache()
    assert target.read_bytes() == b"the previous, whole content"
    assert _object_names(f"{bucket}/keel/marts") == ["big.parquet", "latest.json"]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_writers_of_one_mart_never_share_a_scratch_name(kind, bucket, tmp_path):
    marts = str(tmp_path / "marts") if kind == "local" else f"{bucket}/keel/marts"
    values = {"a": 1.5, "b": 2.5}
    connections = {}
    for name, value in values.items():
        connections[name] = duckdb.connect()
        _features_table(connections[name], DAYS, value)
    errors: list[BaseException] = []

    def write(name: str) -> None:
        try:
            for _ in range(4):
                export_days(connections[name], FEATURES_EXPORT, marts, DAYS)
                export_table(connections[name], _whole(FEATURES_EXPORT), marts)
        except BaseException as error:
            errors.append(error)

    writers = [threading.Thread(target=write, args=(name,)) for name in values]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert errors == []
    # Every file is one writer's whole content, and nothing else is left behind.
    for day in DAYS:
        with location(marts, FEATURES_EXPORT.target, f"{day}.parquet").open("rb") as handle:
            balances = set(pd.read_parquet(handle)["balance"])
        assert balances in ({1.5}, {2.5})
    with location(marts, "whole.parquet").open("rb") as handle:
        whole = pd.read_parquet(handle)
    assert len(whole) == 15 and set(whole["balance"]) in ({1.5}, {2.5})
    expected = ["whole.parquet", *(f"{FEATURES_EXPORT.target}/{day}.parquet" for day in DAYS)]
    if kind == "local":
        leftover = sorted(str(p.relative_to(marts)) for p in Path(marts).rglob("*") if p.is_file())
        assert leftover == sorted(expected)
    else:
        assert _object_names(marts) == sorted(expected)


def _whole(export):
    from keel.marts import MartExport

    return MartExport(export.model, "whole.parquet", export.columns)


def test_locations_and_stores():
    assert (
        store_of("s3://bucket/keel/marts")
        == store_of(location("s3://bucket", "x"))
        == "s3://bucket"
    )
    assert store_of("/srv/keel") == store_of(location("/srv/keel")) == "local"
    with pytest.raises(StorageError, match="empty storage location"):
        location("  ")


def test_publish_moves_a_local_file_into_place(tmp_path):
    scratch = tmp_path / ".scratch" / "x.parquet"
    scratch.parent.mkdir()
    scratch.write_bytes(b"new")
    target = tmp_path / "x.parquet"
    target.write_bytes(b"old")
    publish(scratch, location(target))
    assert target.read_bytes() == b"new" and not scratch.exists()


# -- A real materialisation: Feast over marts on s3, the training set and its pointer on s3 --


@pytest.fixture
def feast_registry_db():
    """A Postgres database of this test's own for Feast's SQL registry, dropped after."""
    from tests.test_features import postgres_url

    url = postgres_url()
    import psycopg2

    name = f"keel_d_feast_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(url.replace("postgresql+psycopg://", "postgresql://"))
    admin.autocommit = True
    admin.cursor().execute(f"create database {name}")
    try:
        yield url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin.cursor().execute(f"drop database if exists {name} with (force)")
        admin.close()


@pytest.mark.slow
def test_training_set_from_marts_on_s3_with_the_production_feature_store(
    bucket, keel_home, monkeypatch, feast_registry_db
):
    import dagster as dg

    from assets.features import feast_registry, training_set
    from bench.pit_join import FIRST_DAY, write_synthetic_marts
    from keel.settings import FEATURE_REPO_DIR
    from orchestration.resources import ArtefactStore, FeatureStoreResource
    from tests.test_features import REDIS_HOST, REDIS_PORT, redis_client

    redis_client()
    local_marts = keel_home.home / "staging-marts"
    write_synthetic_marts(local_marts, accounts=40, days=4, label_rows=120)
    marts = f"{bucket}/keel/marts"
    location(marts).fs.put(str(local_marts) + "/", location(marts).path, recursive=True)
    monkeypatch.setenv("KEEL_PROFILE", "production")
    monkeypatch.setenv("KEEL_MARTS_DIR", marts)
    resources = {
        "feature_store": FeatureStoreResource(
            repo_path=str(FEATURE_REPO_DIR),
            config_file="feature_store.production.yaml",
            marts=marts,
            variables={
                "KEEL_FEAST_REGISTRY_URL": feast_registry_db,
                # Nothing here writes the online store; its own Redis database all the same.
                "KEEL_FEAST_REDIS": f"{REDIS_HOST}:{REDIS_PORT},db=13",
            },
        ),
        "artefacts": ArtefactStore(root=f"{bucket}/keel/artefacts"),
    }
    result = dg.materialize([feast_registry, training_set], resources=resources)
    assert result.success
    built = result.asset_materializations_for_node("training_set")[0].metadata
    version = built["dataset_version"].value
    assert (
        built["path"].value
        == f"{bucket}/keel/artefacts/training_sets/{schema.FEATURE_SERVICE}/{version}.parquet"
    )
    assert built["rows"].value == 120

    pointer = resources["artefacts"].read_pointer("training_sets", schema.FEATURE_SERVICE)
    assert pointer["path"] == built["path"].value and pointer["dataset_version"] == version
    stored = location(pointer["path"]).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == version
    from keel.training.data import load_training_set

    frame = load_training_set(pointer["path"])
    assert len(frame) == 120
    assert frame["spend_30d"].notna().any()
    assert json.loads(location(pointer["path"]).with_name("latest.json").read_text()) == pointer

    # Feast's own reader (materialisation into Redis) reads the same marts on s3.
    import redis

    from assets.features import online_features
    from tests.test_features import source_rows, stamp

    online = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=13)
    try:
        day = dg.materialize(
            [online_features], resources=resources, partition_key=FIRST_DAY.isoformat()
        )
        assert (
            day.asset_materializations_for_node("online_features")[0].metadata["rows"].value == 40
        )
        store = resources["feature_store"].store()
        ids = [30, 170, 290]
        served = store.get_online_features(
            features=store.get_feature_service(schema.FEATURE_SERVICE),
            entity_rows=[{schema.ENTITY_KEY: i} for i in ids],
        ).to_dict()
        rows = source_rows(local_marts)
        first = rows[rows[schema.EVENT_TIMESTAMP] == stamp(0)].set_index(schema.ENTITY_KEY)
        assert served["spend_30d"] == first.loc[ids, "spend_30d"].tolist()
        assert online.dbsize() > 0
    finally:
        for key in online.scan_iter(match=b"*keel", count=1000):
            online.delete(key)


# -- Ingestion reads the landing folder where it lies -----------------------------------------


def test_landing_files_on_s3_are_sensed_and_loaded(bucket, tmp_path):
    import dagster as dg
    import pyarrow as pa

    from assets.ingestion import LANDING_PARTITIONS, raw_landed_activity
    from keel.generator import write_landing_file
    from orchestration.resources import SourcesResource, WarehouseResource
    from orchestration.sensors import landing_files

    landing = f"{bucket}/keel/landing"
    rows = pa.table(
        {
            "account_id": [7, 8, 9],
            "activity_date": ["2026-01-02"] * 3,
            "n_transactions": [2, 0, 1],
            "spend_amount": [12.5, 0.0, 3.0],
            "payment_amount": [0.0, 0.0, 1.0],
            "balance": [300.25, 10.0, 0.0],
            "missed_payment": [False, False, True],
            "channel": ["pos", "online", "pos"],
        }
    )
    written = write_landing_file(rows, landing, "partner_2026-01-02", "csv")
    assert str(written) == f"{landing}/partner_2026-01-02.csv"
    sensed = landing_files(landing)
    assert list(sensed) == ["partner_2026-01-02.csv"]
    name = "partner_2026-01-02.csv"

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(LANDING_PARTITIONS.name, [name])
    warehouse = WarehouseResource(
        database=str(tmp_path / "warehouse.duckdb"), marts_dir=str(tmp_path / "marts")
    )
    result = dg.materialize(
        [raw_landed_activity],
        resources={
            "sources": SourcesResource(
                generated_dir=str(tmp_path / "generated"), landing_dir=landing
            ),
            "warehouse": warehouse,
        },
        partition_key=name,
        instance=instance,
    )
    assert result.success
    with warehouse.connect(read_only=True) as connection:
        loaded = connection.execute(
            "select account_id, spend_amount, _source_file from raw.landed_activity "
            "where _partition = ? order by _row_number",
            [name],
        ).fetchall()
    assert loaded == [
        ("7", "12.5", str(written)),
        ("8", "0", str(written)),
        ("9", "3", str(written)),
    ]
    # A rewritten file gets a new signature, so the sensor asks for it again.
    write_landing_file(rows.slice(0, 2), landing, "partner_2026-01-02", "csv")
    assert landing_files(landing)[name] != sensed[name]


# -- The production warehouse: one lake whose data, landing files and marts are on s3 -----------


@pytest.fixture
def lake_catalog():
    """A Postgres connection string for a lake catalog of this test's own, dropped after."""
    import psycopg2

    name = f"keel_d_lake_{uuid.uuid4().hex[:10]}"
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    admin = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=5)
    admin.autocommit = True
    try:
        admin.cursor().execute(f'drop database if exists "{name}" with (force)')
    finally:
        admin.close()


@pytest.mark.slow
def test_the_lake_keeps_its_data_on_s3_beside_the_landing_files_and_marts(
    bucket, lake_catalog, tmp_path
):
    import dagster as dg
    import pyarrow as pa

    from assets.ingestion import LANDING_PARTITIONS, raw_landed_activity
    from keel.generator import write_landing_file
    from orchestration.resources import SourcesResource, WarehouseResource

    root = f"{bucket}/keel"
    warehouse = WarehouseResource(
        catalog=lake_catalog,
        data_path=f"{root}/lake/",
        extension_dir=str(tmp_path / "extensions"),
        marts_dir=f"{root}/marts",
    )
    # Past DuckLake's inlining limit (10 rows), so the rows land as Parquet on the store.
    count = 25
    rows = pa.table(
        {
            "account_id": list(range(count)),
            "activity_date": ["2026-01-02"] * count,
            "spend_amount": [float(i) for i in range(count)],
            "channel": ["pos"] * count,
        }
    )
    name = write_landing_file(rows, f"{root}/landing", "partner", "parquet").name
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(LANDING_PARTITIONS.name, [name])
    sources = SourcesResource(
        generated_dir=str(tmp_path / "generated"), landing_dir=f"{root}/landing"
    )
    result = dg.materialize(
        [raw_landed_activity],
        resources={"sources": sources, "warehouse": warehouse},
        partition_key=name,
        instance=instance,
    )
    assert result.success
    assert any(
        path.startswith("lake/") and path.endswith(".parquet") for path in _object_names(root)
    )

    with warehouse.connect() as connection:
        assert connection.execute(
            "select count(*), sum(spend_amount::double) from raw.landed_activity"
        ).fetchone() == (count, float(sum(range(count))))
        connection.execute(
            "create table dim_accounts as select account_id::bigint as account_id, "
            "date '2020-01-01' as opened_date, 40 as age, '35-44' as age_band, 'F' as sex, "
            "'north' as region, 'card' as product, 1000.0 as credit_limit "
            "from raw.landed_activity"
        )
        assert export_table(connection, ACCOUNTS_EXPORT, warehouse.marts_dir) == count
    with location(warehouse.marts_dir, ACCOUNTS_EXPORT.target).open("rb") as handle:
        assert sorted(pd.read_parquet(handle)["account_id"]) == list(range(count))


def test_a_missing_bucket_is_an_error_not_a_new_bucket(bucket):
    import boto3

    from keel.files import atomic_write

    missing = f"keel-d-missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(FileNotFoundError):
        atomic_write(location(f"s3://{missing}/keel/report.json"), "{}")
    names = [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
    assert missing not in names
