"""Feature store stage: Feast repo, point-in-time training sets, online store, fast paths."""

from __future__ import annotations

import math
import os
import subprocess
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.pit_join import FIRST_DAY, write_synthetic_marts
from keel import features, schema
from keel.datasets.spec import DATASETS_DIR, load_spec
from keel.settings import FEATURE_REPO_DIR, SettingsError

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
SKIP_REDIS = (
    f"Redis is not reachable on {REDIS_HOST}:{REDIS_PORT}; start it to run this test "
    "(Debian: apt-get install redis-server && redis-server --daemonize yes)."
)
SKIP_POSTGRES = (
    "PostgreSQL is not reachable on 127.0.0.1:5432 (database test, user postgres or root); "
    "start it to run this test (Debian: apt-get install postgresql && service postgresql start)."
)
TAIWAN = load_spec(DATASETS_DIR / "taiwan_credit")
SERVICE = schema.FEATURE_SERVICE
DAILY_TTL = timedelta(days=2)


def stamp(day: int) -> datetime:
    """The event time of synthetic activity day ``day`` (0 = FIRST_DAY): the day's end."""
    return datetime.combine(FIRST_DAY + timedelta(days=day + 1), datetime.min.time(), UTC)


def redis_client():
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip(SKIP_REDIS)
    return client


def postgres_url() -> str:
    import psycopg2

    for user in ("postgres", "root"):
        try:
            psycopg2.connect(host="127.0.0.1", port=5432, dbname="test", user=user).close()
        except psycopg2.OperationalError:
            continue
        return f"postgresql+psycopg://{user}@127.0.0.1:5432/test"
    pytest.skip(SKIP_POSTGRES)


def open_test_store(backend: str = "sqlite", project: str | None = None, offline: str = ""):
    """The local profile's store under a unique project, on SQLite or the real Redis."""
    overrides: dict = {"project": project or f"t{uuid.uuid4().hex[:10]}"}
    if backend == "redis":
        redis_client()
        overrides["online_store"] = {
            "type": "keel.mirrors.feast_online_stores.KeelRedisOnlineStore",
            "connection_string": f"{REDIS_HOST}:{REDIS_PORT}",
        }
    if offline:
        overrides["offline_store"] = {"type": offline}
    return features.open_store(overrides=overrides)


@pytest.fixture
def cleanup():
    """Delete what tests put into the shared Redis server, whatever happens."""
    projects: list[str] = []
    yield projects.append
    if projects:
        client = redis_client()
        for project in projects:
            for key in client.scan_iter(match=b"*" + project.encode(), count=1000):
                client.delete(key)


@pytest.fixture
def marts(keel_home):
    write_synthetic_marts(keel_home.marts, accounts=120, days=6, label_rows=400)
    return keel_home.marts


def applied_store(backend="sqlite", cleanup=None, **kwargs):
    store = open_test_store(backend, **kwargs)
    if cleanup is not None:
        cleanup(store.project)
    features.apply_repo(store)
    return store


def source_rows(marts: Path) -> pd.DataFrame:
    return pq.read_table(marts / schema.FEATURES_MART).to_pandas()


def expected_point_in_time(
    entity: pd.DataFrame, rows: pd.DataFrame, key: str, names: list[str], ttl: timedelta
) -> pd.DataFrame:
    """The training rows by brute force: newest row at or before, within TTL, newest created."""
    entity = entity.reset_index(names="row")
    pairs = entity[["row", key, schema.EVENT_TIMESTAMP]].merge(
        rows, on=key, suffixes=("", "_feature")
    )
    feature_ts = pairs[f"{schema.EVENT_TIMESTAMP}_feature"]
    pairs = pairs[
        (feature_ts <= pairs[schema.EVENT_TIMESTAMP])
        & (feature_ts + ttl >= pairs[schema.EVENT_TIMESTAMP])
    ]
    sort = ["row", f"{schema.EVENT_TIMESTAMP}_feature"]
    if schema.CREATED_TIMESTAMP in pairs:
        sort.append(schema.CREATED_TIMESTAMP)
    # A missing created time ranks below every real one (Feast: DESC NULLS LAST).
    newest = pairs.sort_values(sort, na_position="first")
    newest = newest.drop_duplicates("row", keep="last").set_index("row")
    return newest.reindex(entity["row"])[names].reset_index(drop=True)


def assert_same_values(actual: pd.DataFrame, expected: pd.DataFrame, names) -> None:
    for name in names:
        left, right = actual[name].tolist(), expected[name].tolist()
        for a, b in zip(left, right, strict=True):
            a_missing = a is None or (isinstance(a, float) and math.isnan(a))
            b_missing = b is None or (isinstance(b, float) and math.isnan(b))
            assert a_missing == b_missing and (a_missing or a == b), (name, a, b)


# -- The repo, as Feast's CLI and Keel's code see it ------------------------------------------


FEAST_CLI = """
from feast.cli.cli import cli

for command in (["plan"], ["apply"], ["plan"], ["feature-services", "list"]):
    print(f"$ feast {' '.join(command)}", flush=True)
    cli.main(command, prog_name="feast", standalone_mode=False)
"""


def test_feast_cli_plans_and_applies_the_repo_from_its_folder(keel_home, marts, venv_bin):
    # Feast's own CLI entry point, run from the repo folder; one process pays the import once.
    env = {**os.environ, "KEEL_HOME": str(keel_home.home), "KEEL_PROFILE": "local"}
    result = subprocess.run(
        [str(venv_bin / "python"), "-c", FEAST_CLI],
        cwd=FEATURE_REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    plan, _, listing = result.stdout.partition("$ feast feature-services list")
    assert "account_daily_fv" in plan and "default_risk_v1" in listing
    assert (keel_home.feast / "registry.db").is_file()
    assert (keel_home.feast / "online_store.db").is_file()


def test_apply_registers_every_object_and_a_second_apply_changes_nothing(keel_home):
    store = open_test_store()
    first = features.apply_repo(store)
    # Each dataset folder adds its own objects: the lists grow, these stay.
    assert {schema.FEATURE_SERVICE, TAIWAN.feature_service} <= set(
        first.applied["feature_services"]
    )
    assert "account_ratios_odfv" in first.applied["on_demand_feature_views"]
    assert {schema.ENTITY, TAIWAN.entity} <= set(first.applied["entities"])
    assert "Created feature view account_daily_fv" in first.diff
    service = store.get_feature_service(schema.FEATURE_SERVICE)
    served = [f.name for p in service.feature_view_projections for f in p.features]
    assert served == [*schema.DAILY_FEATURES, *schema.ON_DEMAND_FEATURES]
    assert store.get_feature_view("account_daily_fv").ttl == DAILY_TTL
    second = features.apply_repo(features.open_store(overrides={"project": store.project}))
    assert "Created" not in second.diff and "Updated" not in second.diff


def test_store_config_fills_keel_home_and_names_missing_variables(keel_home, monkeypatch):
    config = features.store_config("feature_store.yaml")
    assert config.registry.path == f"{keel_home.feast}/registry.db"
    assert config.online_store.path == f"{keel_home.feast}/online_store.db"
    for name in ("KEEL_FEAST_REGISTRY_URL", "KEEL_FEAST_REDIS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(features.FeatureStoreError, match="KEEL_FEAST_REGISTRY_URL"):
        features.store_config("feature_store.production.yaml")


def test_production_profile_reads_redis_sql_registry_and_the_shared_marts(keel_home, monkeypatch):
    monkeypatch.setenv("KEEL_FEAST_REGISTRY_URL", "postgresql://keel:secret@db:5432/feast")
    monkeypatch.setenv("KEEL_FEAST_REDIS", "redis:6379,password=secret")
    config = features.store_config("feature_store.production.yaml")
    assert config.registry.registry_type == "sql"
    assert config.registry.path.startswith("postgresql+psycopg://keel:secret@db")
    assert config.online_store.type == "keel.mirrors.feast_online_stores.KeelRedisOnlineStore"
    assert config.online_store.connection_string == "redis:6379,password=secret"
    assert config.offline_store.type == "keel.mirrors.feast_offline_duckdb.KeelDuckDBOfflineStore"
    monkeypatch.setenv("KEEL_PROFILE", "production")
    monkeypatch.setenv("KEEL_MARTS_DIR", "s3://bucket/keel/marts/")
    sources = features.repo_contents("keel").data_sources
    paths = {s.path for s in sources if hasattr(s, "path")}
    assert {
        f"s3://bucket/keel/marts/{schema.FEATURES_MART}",
        f"s3://bucket/keel/marts/{TAIWAN.features_mart}",
    } <= paths
    monkeypatch.delenv("KEEL_MARTS_DIR")
    with pytest.raises(SettingsError, match="KEEL_MARTS_DIR"):
        features.repo_contents("keel")


def test_sql_registry_on_postgres_with_redis_serves_the_same_features(keel_home, marts, cleanup):
    """The production registry and online store, for real, over marts in the data folder."""
    redis_client()
    project = f"t{uuid.uuid4().hex[:10]}"
    cleanup(project)
    store = features.open_store(
        "feature_store.production.yaml",
        variables={
            "KEEL_FEAST_REGISTRY_URL": postgres_url(),
            "KEEL_FEAST_REDIS": f"{REDIS_HOST}:{REDIS_PORT}",
        },
        overrides={"project": project},
    )
    try:
        features.apply_repo(store)
        features.materialize_day(store, FIRST_DAY)
        ids = [10, 20, 30]
        online = store.get_online_features(
            features=store.get_feature_service(SERVICE),
            entity_rows=[{schema.ENTITY_KEY: i} for i in ids],
        ).to_dict()
        rows = source_rows(marts)
        first = rows[rows[schema.EVENT_TIMESTAMP] == stamp(0)].set_index(schema.ENTITY_KEY)
        assert online["spend_30d"] == first.loc[ids, "spend_30d"].tolist()
    finally:
        store.registry.delete_project(project, commit=True)


# -- Point-in-time training sets --------------------------------------------------------------


def test_account_ratios_floor_their_divisors():
    ratios = account_ratios_of(
        payments_30d=[50.0, 5.0], spend_30d=[100.0, 0.0], spend_7d=[30.0, 2.0]
    )
    assert ratios["payment_to_spend_30d"].tolist() == [0.5, 5.0]
    assert ratios["spend_trend_7d_vs_30d"].tolist() == [30.0 / (100.0 * 7 / 30), 2.0]
    assert ratios["balance_to_limit"].tolist() == [0.25, 0.25]


def account_ratios_of(**columns):
    base = {"balance": [250.0, 0.25], "credit_limit": [1000.0, 0.0]}
    return features.account_ratios({**base, **columns})


def test_training_set_is_point_in_time_correct_on_generated_data(keel_home, marts):
    store = applied_store()
    labels = features.read_mart(marts / schema.LABELS_MART, "labels")
    # Entity rows in between feature stamps and long after them exercise the as-of and TTL rules.
    later = labels.to_pandas().head(60)
    later[schema.EVENT_TIMESTAMP] += pd.to_timedelta(np.arange(60) % 4 * 17, unit="h")
    entity = pd.concat([labels.to_pandas(), later], ignore_index=True)
    result = features.build_training_set(
        store, pa.Table.from_pandas(entity, preserve_index=False), keel_home.artefacts
    )
    table = pq.read_table(result.path).to_pandas()
    assert result.rows == len(entity) == len(table)
    rows = source_rows(marts)
    # Every non-null value must come from a source row stamped at or before the label time.
    stamped = table.merge(
        rows[[schema.ENTITY_KEY, schema.EVENT_TIMESTAMP, "spend_90d", "tenure_days"]],
        on=[schema.ENTITY_KEY, "spend_90d", "tenure_days"],
        how="left",
        suffixes=("", "_source"),
    )
    present = stamped["spend_90d"].notna()
    assert present.sum() > len(entity) * 0.8
    assert stamped.loc[present, f"{schema.EVENT_TIMESTAMP}_source"].notna().all()
    assert (
        stamped.loc[present, f"{schema.EVENT_TIMESTAMP}_source"]
        <= stamped.loc[present, schema.EVENT_TIMESTAMP]
    ).all()
    expected = expected_point_in_time(
        table, rows, schema.ENTITY_KEY, list(schema.DAILY_FEATURES), DAILY_TTL
    )
    assert_same_values(table, expected, schema.DAILY_FEATURES)
    ratios = features.account_ratios(expected)
    assert_same_values(table, pd.DataFrame(ratios), schema.ON_DEMAND_FEATURES)
    assert table[[*schema.PROTECTED_ATTRIBUTES, schema.LABEL]].notna().all().all()


def write_taiwan_marts(marts: Path, clients: int) -> pd.DataFrame:
    """The real Taiwan data, unpivoted to the mart contract: one row per client per month end."""
    raw = pd.read_csv(TAIWAN.source_file(), nrows=clients)
    months = pd.to_datetime(["2005-04-30", "2005-05-31", "2005-06-30", "2005-07-31",
                             "2005-08-31", "2005-09-30"], utc=True)  # fmt: skip
    status = raw[["PAY_6", "PAY_5", "PAY_4", "PAY_3", "PAY_2", "PAY_0"]].to_numpy(float)
    bills = raw[[f"BILL_AMT{i}" for i in range(6, 0, -1)]].to_numpy(float)
    paid = raw[[f"PAY_AMT{i}" for i in range(6, 0, -1)]].to_numpy(float)
    frames = []
    for month, end in enumerate(months):
        recent = slice(max(0, month - 2), month + 1)
        frames.append(
            pd.DataFrame(
                {
                    TAIWAN.entity_key: np.arange(1, clients + 1, dtype=np.int64),
                    schema.EVENT_TIMESTAMP: end,
                    schema.CREATED_TIMESTAMP: end + pd.Timedelta(days=1),
                    "limit_bal": raw["LIMIT_BAL"].astype(float),
                    "repayment_status": status[:, month],
                    "bill_amount": bills[:, month],
                    "paid_amount": paid[:, month],
                    "utilisation": bills[:, month] / raw["LIMIT_BAL"],
                    "max_delay_3m": status[:, recent].max(axis=1).clip(min=0),
                    "avg_bill_3m": bills[:, recent].mean(axis=1),
                    "avg_paid_3m": paid[:, recent].mean(axis=1),
                    "months_delayed_6m": (status[:, : month + 1] > 0).sum(axis=1).astype(float),
                }
            )
        )
    monthly = pd.concat(frames, ignore_index=True)
    (marts / TAIWAN.name).mkdir(parents=True, exist_ok=True)
    monthly.to_parquet(marts / TAIWAN.features_mart, index=False)
    labels = pd.DataFrame(
        {
            TAIWAN.entity_key: np.arange(1, clients + 1, dtype=np.int64),
            schema.EVENT_TIMESTAMP: pd.Timestamp("2005-10-31", tz="UTC"),
            schema.LABEL: raw["default payment"].astype("int64"),
            "sex": raw["SEX"].map({1: "M", 2: "F"}),
            "age_band": pd.cut(
                raw["AGE"], [0, 25, 35, 50, 65, 200], labels=schema.AGE_BANDS
            ).astype(str),
        }
    )
    labels.to_parquet(marts / TAIWAN.labels_mart, index=False)
    return monthly


def test_training_set_is_point_in_time_correct_on_taiwan_data(keel_home):
    monthly = write_taiwan_marts(keel_home.marts, clients=3_000)
    store = applied_store()
    labels = pq.read_table(keel_home.marts / TAIWAN.labels_mart).to_pandas()
    # Half the rows asked as of mid-July: they must see June's snapshot, never July's or later.
    mid_july = labels.sample(frac=0.5, random_state=1).index
    labels.loc[mid_july, schema.EVENT_TIMESTAMP] = pd.Timestamp("2005-07-15", tz="UTC")
    result = features.build_training_set(
        store,
        pa.Table.from_pandas(labels, preserve_index=False),
        keel_home.artefacts,
        TAIWAN.feature_service,
        TAIWAN.entity_key,
    )
    table = pq.read_table(result.path).to_pandas()
    assert result.rows == len(labels) and result.features == list(TAIWAN.features)
    expected = expected_point_in_time(
        table, monthly, TAIWAN.entity_key, list(TAIWAN.features), timedelta(days=35)
    )
    assert_same_values(table, expected, TAIWAN.features)
    july = table[table[schema.EVENT_TIMESTAMP] == pd.Timestamp("2005-07-15", tz="UTC")]
    june = monthly[monthly[schema.EVENT_TIMESTAMP] == pd.Timestamp("2005-06-30", tz="UTC")]
    merged = july.merge(june, on=TAIWAN.entity_key, suffixes=("", "_june"))
    assert len(merged) == len(july) > 1_000
    assert (merged["bill_amount"] == merged["bill_amount_june"]).all()


def test_training_set_version_is_the_sha256_of_its_parquet(keel_home, marts):
    import hashlib

    store = applied_store()
    labels = features.read_mart(marts / schema.LABELS_MART, "labels")
    first = features.build_training_set(store, labels, keel_home.artefacts / "a")
    again = features.build_training_set(store, labels, keel_home.artefacts / "b")
    assert first.dataset_version == again.dataset_version
    assert hashlib.sha256(first.path.read_bytes()).hexdigest() == first.dataset_version
    assert first.path.name == f"{first.dataset_version}.parquet"
    flipped = labels.set_column(
        labels.column_names.index(schema.LABEL),
        schema.LABEL,
        pa.array(1 - labels[schema.LABEL].to_numpy()),
    )
    changed = features.build_training_set(store, flipped, keel_home.artefacts / "a")
    assert changed.dataset_version != first.dataset_version
    latest = (keel_home.artefacts / "a" / "latest.json").read_text()
    assert changed.dataset_version in latest
    assert 0 < first.label_rate < 1 and first.start < first.end


def test_training_set_rejects_labels_without_their_columns(keel_home, marts):
    store = applied_store()
    labels = features.read_mart(marts / schema.LABELS_MART, "labels").drop_columns([schema.LABEL])
    with pytest.raises(features.FeatureStoreError, match="defaulted"):
        features.build_training_set(store, labels, keel_home.artefacts)
    with pytest.raises(features.FeatureStoreError, match="does not exist"):
        features.read_mart(marts / "no_such_mart", "labels")


# -- The ASOF offline store against Feast's own DuckDB store ----------------------------------


def write_edge_case_mart(marts: Path) -> None:
    """Ties on event time, missing created times, TTL edges, unknown and duplicate entities."""
    day = lambda d, h=0: stamp(d) + timedelta(hours=h)  # noqa: E731
    rows = [  # account, event time, created time, spend_7d, product
        (1, day(0), day(0, 2), 1.0, "classic"),
        (1, day(1), day(1, 2), 2.0, "classic"),
        (1, day(1), day(1, 5), 3.0, "gold"),  # same event time, created later: wins
        (1, day(4), day(4, 2), 4.0, "gold"),
        (2, day(1), None, 5.0, "classic"),  # no created time: loses the tie
        (2, day(1), day(1, 1), 6.0, "platinum"),
        (3, day(0), day(0, 1), 7.0, "classic"),  # ages past the TTL
        (4, day(0), day(0, 1), 8.0, "gold"),  # exactly at the TTL edge for day(2)
    ]
    columns = list(zip(*rows, strict=True))
    table = {
        schema.ENTITY_KEY: pa.array(columns[0], pa.int64()),
        schema.EVENT_TIMESTAMP: pa.array(columns[1], pa.timestamp("us", tz="UTC")),
        schema.CREATED_TIMESTAMP: pa.array(columns[2], pa.timestamp("us", tz="UTC")),
    }
    for scale, name in enumerate(schema.DAILY_NUMERIC_FEATURES, start=1):
        table[name] = pa.array([value * scale for value in columns[3]])
    table["product"] = pa.array(columns[4])
    table["main_channel_30d"] = pa.array(["online"] * len(rows))
    (marts / schema.FEATURES_MART).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), marts / schema.FEATURES_MART / "edge-cases.parquet")


def edge_case_entities() -> pd.DataFrame:
    day = lambda d, h=0: stamp(d) + timedelta(hours=h)  # noqa: E731
    rows = [
        (1, day(0, -1)),  # before any row
        (1, day(0)),  # exactly at a row
        (1, day(1, 3)),  # mid-day after a tie
        (1, day(1, 3)),  # the same entity row twice
        (1, day(3)),  # within TTL of day(1)
        (1, day(3, 1)),  # one hour past TTL of day(1)
        (2, day(2)),
        (3, day(2, 1)),  # TTL passed
        (4, day(2)),  # TTL edge: included
        (99, day(2)),  # unknown account
    ]
    return pd.DataFrame(
        {
            schema.ENTITY_KEY: [r[0] for r in rows],
            schema.EVENT_TIMESTAMP: pd.to_datetime([r[1] for r in rows], utc=True),
            "request_id": np.arange(len(rows)),
        }
    )


def canonical(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame[schema.EVENT_TIMESTAMP] = pd.to_datetime(frame[schema.EVENT_TIMESTAMP], utc=True)
    frame[schema.EVENT_TIMESTAMP] = frame[schema.EVENT_TIMESTAMP].astype("datetime64[us, UTC]")
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].astype("string")
    return frame.sort_values([*frame.columns[:3]]).reset_index(drop=True)


def apply_without_ttl(store) -> None:
    """The repo's objects with TTLs off: Feast's DuckDB store cannot compile a TTL here."""
    contents = features.repo_contents(store.project)
    for view in contents.feature_views:
        view.ttl = timedelta(0)
    store.apply(
        [
            *contents.data_sources,
            *contents.entities,
            *contents.feature_views,
            *contents.on_demand_feature_views,
            *contents.feature_services,
        ]
    )


@pytest.mark.parametrize(
    ("full_feature_names", "created_filter"), [(False, False), (True, False), (False, True)]
)
def test_asof_store_returns_the_same_rows_as_feasts_duckdb_store(
    keel_home, marts, full_feature_names, created_filter
):
    write_edge_case_mart(keel_home.marts)
    fast = open_test_store()
    apply_without_ttl(fast)
    feast_own = open_test_store(project=fast.project, offline="duckdb")
    service = fast.get_feature_service(SERVICE)
    labels = features.read_mart(marts / schema.LABELS_MART, "labels").to_pandas()
    for entity in (edge_case_entities(), labels):
        ours, theirs = (
            store.get_historical_features(
                entity_df=entity.copy(),
                features=service,
                full_feature_names=full_feature_names,
                filter_by_created_timestamp=created_filter,
            ).to_df()
            for store in (fast, feast_own)
        )
        assert list(ours.columns) == list(theirs.columns)
        pd.testing.assert_frame_equal(canonical(ours), canonical(theirs))


def test_asof_store_keeps_feasts_ttl_and_tie_break_rules(keel_home):
    write_edge_case_mart(keel_home.marts)
    store = applied_store()
    service = store.get_feature_service(SERVICE)
    entity = edge_case_entities()
    job = store.get_historical_features(entity_df=entity.copy(), features=service)
    assert "ASOF LEFT JOIN" in job.to_sql()
    table = job.to_df()
    assert table["request_id"].tolist() == entity["request_id"].tolist()
    spend = [None if math.isnan(v) else v for v in table["spend_7d"]]
    assert spend == [None, 1.0, 3.0, 3.0, 3.0, None, 6.0, None, 8.0, None]
    rows = pq.read_table(keel_home.marts / schema.FEATURES_MART).to_pandas()
    expected = expected_point_in_time(
        table, rows, schema.ENTITY_KEY, list(schema.DAILY_FEATURES), DAILY_TTL
    )
    assert_same_values(table, expected, schema.DAILY_FEATURES)
    ratios = pd.DataFrame(features.account_ratios(expected))
    assert_same_values(table, ratios, schema.ON_DEMAND_FEATURES)
    naive = entity.assign(event_timestamp=entity[schema.EVENT_TIMESTAMP].dt.tz_localize(None))
    same = store.get_historical_features(entity_df=naive, features=service).to_df()
    pd.testing.assert_frame_equal(canonical(same), canonical(table))  # naive times are UTC
    known = store.get_historical_features(
        entity_df=entity.copy(), features=service, filter_by_created_timestamp=True
    ).to_df()
    # Created at 02:00 and 05:00, only the first was known at 03:00; no created time, never known.
    spend = [None if math.isnan(v) else v for v in known["spend_7d"]]
    assert spend == [None, None, 2.0, 2.0, 3.0, None, 6.0, None, 8.0, None]


# -- Online store: same values as offline, idempotent, never rolled back ----------------------


def materialize_all(store, days: int) -> None:
    for day in range(days):
        features.materialize_day(store, FIRST_DAY + timedelta(days=day))


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_online_values_equal_historical_values_for_1000_entities(keel_home, cleanup, backend):
    from keel.mirrors.feast_online_reader import OnlineFeatureReader

    write_synthetic_marts(keel_home.marts, accounts=1_000, days=3, label_rows=10, seed=3)
    store = applied_store(backend, cleanup)
    materialize_all(store, 3)
    service = store.get_feature_service(SERVICE)
    ids = source_rows(keel_home.marts)[schema.ENTITY_KEY].unique().tolist()
    assert len(ids) == 1_000
    online = store.get_online_features(
        features=service, entity_rows=[{schema.ENTITY_KEY: i} for i in ids]
    ).to_dict()
    entity = pd.DataFrame({schema.ENTITY_KEY: ids, schema.EVENT_TIMESTAMP: stamp(2)})
    offline = store.get_historical_features(entity_df=entity, features=service).to_df()
    offline = offline.set_index(schema.ENTITY_KEY).loc[ids]
    for name in (*schema.DAILY_FEATURES, *schema.ON_DEMAND_FEATURES):
        assert online[name] == offline[name].tolist(), name
    reader = OnlineFeatureReader(store, SERVICE)
    asked = [*ids[:100], 123_456_789, ids[0]]  # an unknown account and a repeat
    assert (
        reader.get(asked)
        == store.get_online_features(
            features=service, entity_rows=[{schema.ENTITY_KEY: i} for i in asked]
        ).to_dict()
    )
    assert reader.get(ids[:1]) == {name: values[:1] for name, values in online.items()}
    # Without its Python twin the on-demand view runs its registered pandas function.
    assert OnlineFeatureReader(store, SERVICE, transforms={}).get(asked) == reader.get(asked)
    if backend == "sqlite":
        # Entities without a JSON row (written by Feast's own store, or values JSON cannot
        # hold) come from Feast's rows.
        import sqlite3

        table = f'"{store.project}_account_daily_fv__entities"'
        first = f"SELECT entity_key FROM {table} ORDER BY entity_key LIMIT"
        with sqlite3.connect(store.config.online_store.path) as connection:
            connection.execute(f"DELETE FROM {table} WHERE entity_key IN ({first} 250)")
            connection.execute(
                f"UPDATE {table} SET features = NULL WHERE entity_key IN ({first} 500)"
            )
        expected = store.get_online_features(
            features=service, entity_rows=[{schema.ENTITY_KEY: i} for i in asked]
        ).to_dict()
        assert OnlineFeatureReader(store, SERVICE).get(asked) == expected


def dump_online(store) -> dict:
    """Everything the store holds for its project, with the project name taken out."""
    config = store.config
    if config.online_store.type.endswith("RedisOnlineStore"):
        client, suffix = redis_client(), config.project.encode()
        return {
            key[: -len(suffix)]: client.hgetall(key)
            for key in client.scan_iter(match=b"*" + suffix, count=1000)
        }
    import sqlite3

    table = f"{config.project}_account_daily_fv"
    with sqlite3.connect(config.online_store.path) as connection:
        return {
            "rows": connection.execute(
                "SELECT entity_key, feature_name, value, value_text, event_ts, created_ts, "
                f'event_us, created_us FROM "{table}" ORDER BY entity_key, feature_name'
            ).fetchall(),
            "entities": connection.execute(
                f'SELECT * FROM "{table}__entities" ORDER BY entity_key'
            ).fetchall(),
        }


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_materializing_twice_out_of_order_or_after_a_crash_matches_one_clean_run(
    keel_home, marts, cleanup, backend
):
    clean = applied_store(backend, cleanup)
    materialize_all(clean, 6)
    messy = applied_store(backend, cleanup)
    online = messy._get_provider().online_store
    write = online.online_write_batch

    def crash_halfway(config, table, data, progress):
        write(config, table, data[: len(data) // 2], progress)
        raise RuntimeError("simulated crash while writing the online store")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(online, "online_write_batch", crash_halfway)
        with pytest.raises(RuntimeError, match="simulated crash"):
            features.materialize_day(messy, FIRST_DAY + timedelta(days=5))
    for day in (5, 2, 0, 1, 5, 3, 4, 4):  # the crashed day again, older days after newer ones
        features.materialize_day(messy, FIRST_DAY + timedelta(days=day))
    assert dump_online(messy) == dump_online(clean)
    assert dump_online(clean)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_late_batch_never_overwrites_newer_values_but_a_corrected_rerun_does(
    keel_home, marts, cleanup, backend
):
    store = applied_store(backend, cleanup)
    materialize_all(store, 6)
    service = store.get_feature_service(SERVICE)
    ids = [10, 20, 30]

    def online_spend():
        rows = [{schema.ENTITY_KEY: i} for i in ids]
        return store.get_online_features(features=service, entity_rows=rows).to_dict()["spend_7d"]

    newest = online_spend()
    daily = marts / schema.FEATURES_MART
    # A late re-run of day 2: older event times, later created times, different values.
    late = pq.read_table(daily / "2026-01-03.parquet").to_pandas()
    late[schema.CREATED_TIMESTAMP] = late[schema.CREATED_TIMESTAMP] + pd.Timedelta(days=30)
    late["spend_7d"] = -1.0
    pq.write_table(pa.Table.from_pandas(late, preserve_index=False), daily / "2026-01-03.parquet")
    features.materialize_day(store, date(2026, 1, 3))
    assert online_spend() == newest
    # A corrected re-run of the newest day (same event time, later created) replaces it, as
    # offline retrieval does.
    fixed = pq.read_table(daily / "2026-01-06.parquet").to_pandas()
    fixed[schema.CREATED_TIMESTAMP] = fixed[schema.CREATED_TIMESTAMP] + pd.Timedelta(hours=5)
    fixed["spend_7d"] = fixed["spend_7d"] + 1000
    pq.write_table(pa.Table.from_pandas(fixed, preserve_index=False), daily / "2026-01-06.parquet")
    features.materialize_day(store, date(2026, 1, 6))
    assert online_spend() == [value + 1000 for value in newest]
    entity = pd.DataFrame({schema.ENTITY_KEY: ids, schema.EVENT_TIMESTAMP: stamp(5)})
    offline = store.get_historical_features(entity_df=entity, features=service).to_df()
    assert offline["spend_7d"].tolist() == online_spend()


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_pushed_rows_follow_the_same_newest_wins_rule(keel_home, marts, cleanup, backend):
    import asyncio

    store = applied_store(backend, cleanup)
    features.materialize_day(store, date(2026, 1, 3))
    service = store.get_feature_service(SERVICE)
    rows = source_rows(marts)
    row = rows[(rows[schema.EVENT_TIMESTAMP] == stamp(2)) & (rows[schema.ENTITY_KEY] == 10)]

    def push(event: timedelta, spend: float, created: timedelta, asynchronous=False) -> list:
        frame = row.assign(spend_7d=spend)
        frame[schema.EVENT_TIMESTAMP] += event
        frame[schema.CREATED_TIMESTAMP] += created
        if asynchronous:
            asyncio.run(store.write_to_online_store_async("account_daily_fv", frame))
        else:
            store.write_to_online_store("account_daily_fv", frame)
        entity_rows = [{schema.ENTITY_KEY: 10}]
        return store.get_online_features(features=service, entity_rows=entity_rows).to_dict()[
            "spend_7d"
        ]

    hour = timedelta(hours=1)
    assert push(-24 * hour, -1.0, 24 * hour) == row["spend_7d"].tolist()  # older event
    assert push(hour, 42.0, hour) == [42.0]  # newer event
    assert push(hour, -2.0, 0 * hour) == [42.0]  # same event, older created
    assert push(hour, 43.0, 2 * hour) == [43.0]  # same event, newer created: a correction
    if backend == "redis":  # Feast's async writer, which has its own rule
        assert push(hour, -3.0, hour, asynchronous=True) == [43.0]
        assert push(hour, 44.0, 3 * hour, asynchronous=True) == [44.0]


def test_a_store_feasts_own_sqlite_store_wrote_is_taken_over_exactly(keel_home, marts):
    from keel.mirrors.feast_online_reader import OnlineFeatureReader

    path = str(keel_home.feast / "taken_over.db")
    project = f"t{uuid.uuid4().hex[:10]}"

    def store_of(kind: str):
        online = {"type": kind, "path": path}
        return features.open_store(overrides={"project": project, "online_store": online})

    plain = store_of("sqlite")
    features.apply_repo(plain)
    materialize_all(plain, 3)
    ours = store_of("keel.mirrors.feast_online_stores.KeelSqliteOnlineStore")
    features.apply_repo(ours)  # takes the table over: one JSON row per entity from Feast's rows
    features.materialize_day(ours, date(2026, 1, 2))  # older than what Feast's store wrote
    service = ours.get_feature_service(SERVICE)
    ids = [10, 20, 30, 99_999]
    expected = ours.get_online_features(
        features=service, entity_rows=[{schema.ENTITY_KEY: i} for i in ids]
    ).to_dict()
    rows = source_rows(marts)
    third = rows[rows[schema.EVENT_TIMESTAMP] == stamp(2)].set_index(schema.ENTITY_KEY)
    assert expected["spend_7d"][:3] == third.loc[ids[:3], "spend_7d"].tolist()
    assert OnlineFeatureReader(ours, SERVICE).get(ids) == expected


def test_materialize_day_refuses_a_missing_partition(keel_home, marts):
    store = applied_store()
    with pytest.raises(features.FeatureStoreError, match="2026-03-01 is missing or empty"):
        features.materialize_day(store, date(2026, 3, 1))


def test_partition_window_covers_the_day_end_stamp_once():
    start, end = features.partition_window(date(2026, 1, 5))
    assert end == datetime(2026, 1, 6, tzinfo=UTC)
    assert start == datetime(2026, 1, 5, tzinfo=UTC) + timedelta(microseconds=1)
    assert features.partition_window(date(2026, 1, 6))[0] > end


# -- Dagster assets ---------------------------------------------------------------------------


def test_assets_apply_materialize_a_partition_and_write_the_training_set(keel_home, marts):
    from assets.features import feast_registry, online_features, training_set
    from orchestration.resources import ArtefactStore, FeatureStoreResource

    resources = {
        "feature_store": FeatureStoreResource(
            repo_path=str(FEATURE_REPO_DIR),
            config_file="feature_store.yaml",
            marts=str(keel_home.marts),
            variables={"KEEL_HOME": str(keel_home.home)},
        ),
        "artefacts": ArtefactStore(root=str(keel_home.artefacts)),
    }
    result = dg.materialize([feast_registry, training_set], resources=resources)
    assert result.success
    registry = result.asset_materializations_for_node("feast_registry")[0].metadata
    assert {SERVICE, TAIWAN.feature_service} <= set(registry["feature_services"].value)
    built = result.asset_materializations_for_node("training_set")[0].metadata
    version = built["dataset_version"].value
    assert Path(built["path"].value).name == f"{version}.parquet"
    assert built["rows"].value == 400 and built["feature_service"].value == SERVICE
    online = dg.materialize([online_features], resources=resources, partition_key="2026-01-04")
    written = online.asset_materializations_for_node("online_features")[0].metadata
    assert written["rows"].value == 120
    reader = resources["feature_store"].online_reader(SERVICE)
    rows = source_rows(marts)
    expected = rows[rows[schema.EVENT_TIMESTAMP] == stamp(3)].set_index(schema.ENTITY_KEY)
    assert reader.get([10, 20])["balance"] == expected.loc[[10, 20], "balance"].tolist()
