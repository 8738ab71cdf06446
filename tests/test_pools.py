"""Which warehouse writers run side by side: their pools per profile, the pools' limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from keel import cli as keel_cli
from keel.team import services

REPO = Path(__file__).resolve().parent.parent
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
DAY = "2026-02-01"
RAW_STEPS = ("raw_account_activity", "raw_default_labels")

# The pool of every kind of warehouse writer, printed by a process of the given profile.
WRITERS_POOLS = """
import json
from assets.ingestion import INGESTION_CHECKS, raw_account_activity, raw_default_labels
from assets.transformation import daily_dbt_models, dbt_models, dbt_unit_tests

print(json.dumps({
    "raw_account_activity": raw_account_activity.op.pool,
    "raw_default_labels": raw_default_labels.op.pool,
    "great_expectations": INGESTION_CHECKS[1].node_def.pool,
    "daily_dbt_models": daily_dbt_models.op.pool,
    "dbt_models": dbt_models.op.pool,
    "dbt_unit_tests": dbt_unit_tests.node_def.pool,
}))
"""


def _writers_pools(profile: str) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-c", WRITERS_POOLS],
        cwd=REPO,
        env={**os.environ, "KEEL_PROFILE": profile, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_on_the_local_profile_every_warehouse_writer_shares_one_slot(keel_home):
    """One DuckDB file, one writing process: raw loads, checks and dbt all in one pool of 1."""
    pools = _writers_pools("local")
    assert set(pools.values()) == {"warehouse"}, pools
    home = keel_cli.prepare_dagster_home(keel_home, "local")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        info = instance.event_log_storage.get_concurrency_info("warehouse")
    assert info.limit == 1


def test_on_the_team_profile_dbt_has_a_pool_of_its_own():
    """On the lake, raw loads and their checks share `warehouse`; dbt's steps are in `dbt`."""
    pools = _writers_pools("team")
    dbt = {name: pools.pop(name) for name in ("daily_dbt_models", "dbt_models", "dbt_unit_tests")}
    assert set(dbt.values()) == {"dbt"}, dbt
    assert set(pools.values()) == {"warehouse"}, pools


@pytest.fixture
def team_home(keel_home, monkeypatch):
    """Dagster and lake databases and Celery queues of this test alone; dropped afterwards."""
    unique = uuid.uuid4().hex[:10]
    databases = [f"pools_dagster_{unique}", f"pools_lake_{unique}"]
    monkeypatch.setenv("KEEL_PROFILE", "team")
    monkeypatch.setenv(services.PG_URL_ENV, f"{PG_SERVER}/{databases[0]}")
    monkeypatch.setenv("KEEL_LAKE_CATALOG", f"{PG_SERVER}/{databases[1]}")
    monkeypatch.delenv("KEEL_LAKE_DATA_PATH", raising=False)
    monkeypatch.setenv("KEEL_CELERY_QUEUE_PREFIX", f"pools-{unique}-")
    yield keel_home
    services.stop_all(keel_home)
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as connection:
        for database in databases:
            connection.execute(f'drop database if exists "{database}" with (force)')


def test_the_team_instance_gives_raw_loads_several_slots_and_dbt_one(team_home):
    """As `keel team up` (and every team path through prepare_dagster_home) leaves it."""
    home = keel_cli.prepare_dagster_home(team_home, "team")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        storage = instance.event_log_storage
        assert {pool.name: pool.limit for pool in storage.get_pool_limits()} == {
            "warehouse": 4,
            "dbt": 1,
        }
        # Every other pool (gpu, feast) keeps the instance's default: one step at a time.
        assert storage.get_concurrency_info("gpu").limit == 1
        # A limit set by hand (`dagster instance concurrency set`) outlives the next prepare.
        storage.set_concurrency_slots("warehouse", 6)
        keel_cli.prepare_dagster_home(team_home, "team")
        assert storage.get_concurrency_info("warehouse").limit == 6


def pools_load_job() -> dg.JobDefinition:
    """Both raw tables of one day loaded into the team profile's lake, each a Celery task."""
    from assets.ingestion import raw_account_activity, raw_default_labels
    from orchestration.executors import executor_for
    from orchestration.profiles import resources_for
    from tests.team_support import sources

    assets = [raw_account_activity, raw_default_labels]
    return dg.Definitions(
        assets=assets,
        jobs=[dg.define_asset_job("pools_load", selection=dg.AssetSelection.assets(*assets))],
        resources={"warehouse": resources_for("team")["warehouse"], "sources": sources()},
        executor=executor_for("team"),
    ).resolve_job_def("pools_load")


def _raw_loads_overlap(instance: dg.DagsterInstance) -> bool:
    """Whether the two raw loads of the run just executed were running at the same time."""
    result = dg.execute_job(
        dg.reconstructable(pools_load_job), instance=instance, tags={"dagster/partition": DAY}
    )
    assert result.success
    window = {}
    for kind in (dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS):
        for record in instance.all_logs(result.run_id, of_type=kind):
            window.setdefault(record.step_key, []).append(record.timestamp)
    (start_a, end_a), (start_b, end_b) = (window[step] for step in RAW_STEPS)
    return start_a < end_b and start_b < end_a


@pytest.mark.slow
@pytest.mark.team
def test_two_workers_load_two_raw_tables_at_once_only_as_the_pool_allows(team_home):
    """With two Celery workers the loads of both raw tables run side by side on the lake;
    with the warehouse pool cut to one slot the same run loads them one after the other."""
    from orchestration.pools import WAREHOUSE_POOL

    paths = team_home
    home = keel_cli.prepare_dagster_home(paths, "team")
    services.ensure_database(os.environ["KEEL_LAKE_CATALOG"])
    workers = [services.start_worker(paths, "default", f"pools{n}-{os.getpid()}") for n in (1, 2)]
    for entry in workers:
        services.wait_until_ready(entry)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert _raw_loads_overlap(instance)
        instance.event_log_storage.set_concurrency_slots(WAREHOUSE_POOL, 1)
        assert not _raw_loads_overlap(instance)
