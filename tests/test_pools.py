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
def team_dagster_url(keel_home, monkeypatch):
    """A Dagster database of this test alone for the team instance; dropped afterwards."""
    database = f"pools_dagster_{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("KEEL_PROFILE", "team")
    monkeypatch.setenv(services.PG_URL_ENV, f"{PG_SERVER}/{database}")
    yield keel_home
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as connection:
        connection.execute(f'drop database if exists "{database}" with (force)')


def test_the_team_instance_gives_raw_loads_several_slots_and_dbt_one(team_dagster_url):
    """As `keel team up` (and every team path through prepare_dagster_home) leaves it."""
    home = keel_cli.prepare_dagster_home(team_dagster_url, "team")
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
        keel_cli.prepare_dagster_home(team_dagster_url, "team")
        assert storage.get_concurrency_info("warehouse").limit == 6
