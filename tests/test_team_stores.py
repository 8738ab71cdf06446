"""The team profile's shared stores on this machine's Postgres and Redis: audit log and Feast."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import dagster as dg
import psycopg
import pytest
import sqlalchemy

from keel.registry_audit import AUDIT_TABLE, PENDING_TABLE, AuditLog
from keel.team import services

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
# Helper databases and Redis keys of these tests: Redis database 5, a database per test.
REDIS_DB = 5


def _drop(databases: list[str], roles: list[str] = ()) -> None:
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as connection:
        for name in databases:
            connection.execute(f'drop database if exists "{name}" with (force)')
        for name in roles:
            connection.execute(f'drop role if exists "{name}"')


@pytest.fixture
def audit_store(keel_home, monkeypatch):
    """A team audit database and writer role of their own, as `keel team up` makes them."""
    name = f"keel_audit_test_{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv(services.PG_URL_ENV, f"{PG_SERVER}/keel_dagster")
    monkeypatch.setenv(services.AUDIT_URI_ENV, f"postgresql://{name}@127.0.0.1:5432/{name}")
    yield name
    _drop([name], [name])


def test_audit_writer_role_appends_and_reads_but_cannot_change_or_delete(audit_store):
    role = services.ensure_audit_store()
    # A second `keel team up` finds role, database and grants in place.
    assert services.ensure_audit_store() == role == audit_store
    writer = sqlalchemy.create_engine(services.audit_uri())
    try:
        log = AuditLog(writer, b"k" * 32, "team-model")
        # The writer finds the tables made and leaves their definition alone.
        log.create()
        first = log.append("2026-02-01T00:00:00", "register", "ci", None, "1", "first")
        log.append("2026-02-01T00:01:00", "promote", "ci", None, "1", "passed the gates")
        assert [r.action for r in log.pending()] == ["register", "promote"]
        # Pending rows are settled (deleted) by the same role: a grant of their own table.
        log.settle(first.id)
        assert [r.action for r in log.pending()] == ["promote"]
        assert [r.action for r in log.records()] == ["register", "promote"]

        refused = (
            f"update {AUDIT_TABLE} set reason = 'rewritten'",
            f"delete from {AUDIT_TABLE}",
            f"truncate {AUDIT_TABLE}",
            f"drop trigger {AUDIT_TABLE}_no_change on {AUDIT_TABLE}",
            f"alter table {AUDIT_TABLE} disable trigger all",
        )
        for statement in refused:
            with writer.connect() as connection, pytest.raises(sqlalchemy.exc.DBAPIError) as err:
                connection.execute(sqlalchemy.text(statement))
            # Refused by the role's privileges, before any trigger of the table could run.
            assert "permission denied" in str(err.value) or "must be owner" in str(err.value), (
                statement,
                err.value,
            )
        with writer.connect() as connection:
            reasons = connection.execute(
                sqlalchemy.text(f"select reason from {AUDIT_TABLE} order by id")
            ).scalars()
            assert list(reasons) == ["first", "passed the gates"]
    finally:
        writer.dispose()
    # The tables belong to the administrating user, not to the writer.
    with psycopg.connect(f"{PG_SERVER}/{audit_store}") as connection:
        owners = connection.execute(
            "select tablename, tableowner from pg_tables where tablename in (%s, %s)",
            [AUDIT_TABLE, PENDING_TABLE],
        ).fetchall()
    assert sorted(owners) == [(AUDIT_TABLE, "postgres"), (PENDING_TABLE, "postgres")]


def test_team_registry_records_through_the_writer_role(audit_store, keel_home, monkeypatch):
    """The team profile's governance resource: registry changes land in the role's audit log."""
    from orchestration.profiles import resources_for

    services.ensure_audit_store()
    monkeypatch.setenv(services.AUDIT_KEY_ENV, "team-test-key-" + "x" * 32)
    monkeypatch.setenv(services.MLFLOW_URL_ENV, "http://127.0.0.1:1")
    from keel.registry import ModelRegistry, RegistryConfig

    @dg.asset
    def audit_settings(governance: dg.ResourceParam[dg.ConfigurableResource]) -> tuple:
        return governance.audit_uri, governance.audit_key

    resources = {"governance": resources_for("team")["governance"]}
    result = dg.materialize([audit_settings], resources=resources)
    uri, key = result.output_for_node("audit_settings")
    assert (uri, key) == (services.audit_uri(), os.environ[services.AUDIT_KEY_ENV])
    database = f"sqlite:///{keel_home.mlflow / 'mlflow.db'}"
    config = RegistryConfig(
        tracking_uri=database,
        registry_uri=database,
        lock_file=str(keel_home.mlflow / "registry.lock"),
        audit_uri=uri,
        audit_key=key,
    )
    with ModelRegistry(config) as registry:
        assert registry.verify_audit().intact
        registry._log.append("2026-02-01T00:00:00", "register", "ci", None, "1", "probe")
    with psycopg.connect(f"{PG_SERVER}/{audit_store}") as connection:
        actors = connection.execute(f"select action, actor from {AUDIT_TABLE}").fetchall()
    assert actors == [("register", "ci")]


# `feast apply` and a materialisation in one Feast process: 30-60 s on two busy cores.
APPLY_AND_MATERIALIZE = """
from feast.cli.cli import cli

for command in (
    ["-f", "feature_store.team.yaml", "apply"],
    ["-f", "feature_store.team.yaml", "materialize", "2026-01-01T00:00:00", "2026-01-04T00:00:00",
     "--views", "account_daily_fv"],
):
    print(f"$ feast {' '.join(command)}", flush=True)
    cli.main(command, prog_name="feast", standalone_mode=False)
"""


@pytest.mark.slow
def test_feast_apply_with_the_team_yaml_uses_the_postgres_registry_and_redis(keel_home):
    import redis

    from bench.pit_join import write_synthetic_marts
    from keel import schema
    from keel.features import open_store
    from keel.settings import FEATURE_REPO_DIR

    database = f"keel_feast_test_{uuid.uuid4().hex[:10]}"
    services.ensure_database(f"{PG_SERVER}/{database}")
    client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    before = set(client.keys("*"))
    variables = {
        "KEEL_HOME": str(keel_home.home),
        services.FEAST_REGISTRY_ENV: f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
        services.FEAST_REDIS_ENV: f"127.0.0.1:6379,db={REDIS_DB}",
    }
    try:
        write_synthetic_marts(keel_home.marts, accounts=30, days=4, label_rows=40)
        result = subprocess.run(
            [sys.executable, "-c", APPLY_AND_MATERIALIZE],
            cwd=FEATURE_REPO_DIR,
            env={**os.environ, **variables, "KEEL_PROFILE": "team"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
        assert "Deploying infrastructure for account_daily_fv" in output, output
        # The registry is Postgres's, the online rows Redis's.
        with psycopg.connect(f"{PG_SERVER}/{database}") as connection:
            views = connection.execute("select feature_view_name from feature_views").fetchall()
        assert ("account_daily_fv",) in views
        written = set(client.keys("*")) - before
        assert len(written) == 30
        store = open_store("feature_store.team.yaml", variables=variables)
        online = store.get_online_features(
            features=[f"account_daily_fv:{schema.DAILY_NUMERIC_FEATURES[0]}"],
            entity_rows=[{schema.ENTITY_KEY: 10}],
        ).to_dict()
        assert online[schema.DAILY_NUMERIC_FEATURES[0]][0] is not None
    finally:
        added = set(client.keys("*")) - before
        if added:
            client.delete(*added)
        _drop([database])
