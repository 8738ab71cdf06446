"""Service identities of the team profile (keel.team.keys) and `keel scenario`'s refusals."""

from __future__ import annotations

import socket
import stat
import uuid
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from keel.access import KeyStore, authenticate, default_store_path
from keel.access.guard import RegistryAccessDenied
from keel.access.store import KEY_ENV
from keel.registry import ModelRegistry
from keel.settings import KeelPaths
from keel.team import keys, services
from tests.team_world import delete_queues, team_world
from tests.test_registry import (  # noqa: F401 (fixtures)
    GATES,
    METRICS,
    config,
    empty_mlflow_db,
    isolated_mlflow_uris,
    training_run,
)

REDIS_DB = 9  # Feast's online store in the slow tests below


@pytest.fixture
def store(keel_home: KeelPaths) -> KeyStore:
    return KeyStore(default_store_path(), cache_seconds=0.0)


def _active(store: KeyStore) -> dict[str, list[str]]:
    active: dict[str, list[str]] = {}
    for row in store.list():
        if row["revoked_at"] is None:
            active.setdefault(str(row["owner"]), []).append(str(row["key_id"]))
    return active


def test_provisioning_gives_each_service_one_identity_with_its_roles_and_reuses_it(
    keel_home, store, monkeypatch
):
    # Whoever starts the services holds an admin key: the services must not act with it.
    monkeypatch.setenv(KEY_ENV, store.add("ops", ["admin"]))
    first = keys.provision(keel_home, store)
    assert [(p.name, p.issued) for p in first] == [
        ("svc-daemon", True),
        ("svc-workers", True),
        ("svc-watcher", True),
    ]
    folder = keel_home.home / "team" / "keys"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for entry in first:
        assert stat.S_IMODE(entry.key_file.stat().st_mode) == 0o600
        identity = authenticate(store, key=keys.service_key(keel_home, entry.name))
        assert identity.name == entry.name and identity.roles == set(keys.SERVICE_ROLES[entry.name])
    # A worker's and the daemon's environment carry their own identity, not the caller's.
    for service in (keys.WORKERS, keys.DAEMON):
        env = services.team_environment(keel_home, service)
        identity = authenticate(store, key=env[KEY_ENV])
        assert (identity.name, identity.roles) == (service, {"deployer", "trainer"})
        assert identity.allows("run") and identity.allows("register")
        assert not identity.allows("approve") and not identity.allows("admin")
    # The daemon's launcher launches the schedules', sensors' and release runs, never an approval.
    from keel.access import AccessDenied
    from keel.access.jobs import LAUNCHED_BY_TAG, authorize_run

    daemon = authenticate(store, key=keys.service_key(keel_home, keys.DAEMON))
    for job in ("daily_pipeline", "retrain", "release"):
        assert authorize_run(job, {}, daemon)[LAUNCHED_BY_TAG] == "svc-daemon"
    approve = {"ops": {"apply_registry_action": {"config": {"action": "approve"}}}}
    with pytest.raises(AccessDenied, match=r"svc-daemon .* may not approve"):
        authorize_run("registry_action", approve, daemon)
    watcher = authenticate(store, key=keys.service_key(keel_home, keys.WATCHER))
    assert watcher.allows("deploy") and not watcher.allows("run") and not watcher.allows("predict")

    # A second `keel team up` keeps every key: no second identity, no second key.
    second = keys.provision(keel_home, store)
    assert not any(p.issued for p in second)
    assert [p.key_id for p in second] == [p.key_id for p in first]
    assert {name: len(ids) for name, ids in _active(store).items() if name != "ops"} == {
        "svc-daemon": 1,
        "svc-workers": 1,
        "svc-watcher": 1,
    }
    # A lost key file or --rotate-keys: the old key is revoked and one new key replaces it.
    (folder / "svc-watcher.key").unlink()
    old_daemon = keys.service_key(keel_home, keys.DAEMON)
    third = {p.name: p for p in keys.provision(keel_home, store)}
    assert [n for n, p in third.items() if p.issued] == ["svc-watcher"]
    rotated = {p.name: p for p in keys.provision(keel_home, store, rotate=True)}
    assert all(p.issued for p in rotated.values())
    assert store.check(old_daemon) is None
    active = _active(store)
    assert all(active[name] == [rotated[name].key_id] for name in keys.SERVICE_ROLES)
    assert keys.describe(keel_home, store)["svc-workers"] == "svc-workers (deployer, trainer)"


def test_a_started_worker_runs_as_its_service_identity_and_status_shows_it(
    keel_home, store, monkeypatch
):
    from keel import cli as keel_cli

    prefix = f"keel-keys-{uuid.uuid4().hex[:8]}-"
    monkeypatch.setenv("KEEL_CELERY_QUEUE_PREFIX", prefix)
    monkeypatch.setenv(KEY_ENV, store.add("ops", ["admin"]))
    keys.provision(keel_home, store)
    entry = services.start_worker(keel_home, "default", "keys-worker")
    try:
        services.wait_until_ready(entry)
        raw = Path(f"/proc/{entry['pid']}/environ").read_bytes()
        environ = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        identity = store.check(environ[KEY_ENV.encode()].decode())
        assert identity is not None and identity.name == "svc-workers"
        assert entry["identity"] == "svc-workers"
        shown = CliRunner().invoke(keel_cli.cli, ["team", "status"])
        assert "keys-worker" in shown.output and "running as svc-workers" in shown.output
        assert "svc-watcher acts as svc-watcher (deploy)" in shown.output
    finally:
        services.stop(keel_home, [entry])
        delete_queues(prefix)
    assert services.recorded(keel_home) == []


def test_the_watcher_with_its_key_rolls_back_a_breached_canary_without_a_denied_record(
    config,  # noqa: F811
    keel_home,
    store,
    monkeypatch,
    tmp_path,
):
    from keel.serving import release
    from keel.serving.cli import watcher_key
    from keel.serving.prediction_log import PredictionLogWriter
    from tests.release_support import FAST_POLICY, log_rows

    tara = store.check(store.add("tara", ["trainer"]))
    root = store.check(store.add("root", ["admin"]))
    strict = replace(config, require_identity=True)
    with ModelRegistry(strict) as registry:
        for dataset in ("a", "b"):
            run = training_run(config, keel_home, dataset, trained_by="tara")
            registry.register(run, METRICS, GATES, tara)
            registry.approve(registry.challenger(), root, "report read")
        registry.promote("1", root)
        release.start_canary(registry, "2", root, share=0.3, policy=FAST_POLICY)
        start = datetime.fromisoformat(release.release_state(registry).canary_started_at)
    writer = PredictionLogWriter(tmp_path / "log")
    writer.write(log_rows("champion", "1", 400, start=start, seed=1))
    writer.write(log_rows("canary", "2", 200, start=start, error_share=0.2, seed=2))
    writer.close()

    # The gap: a watcher in a `keel serve` started without a key is refused at every tick.
    monkeypatch.setenv("KEEL_PROFILE", "team")
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert watcher_key() == ""
    with pytest.raises(RegistryAccessDenied, match="not an authenticated identity"):
        release.ReleaseWatcher(strict, tmp_path / "log").check_once()
    with ModelRegistry(strict) as registry:
        denied_before = [r for r in registry.audit_records() if r.action == "denied"]
    assert len(denied_before) == 1

    keys.provision(keel_home, store)
    assert watcher_key() == keys.service_key(keel_home, keys.WATCHER)
    outcome = release.ReleaseWatcher(strict, tmp_path / "log", api_key=watcher_key()).check_once()
    assert outcome.action == "rolled_back"
    with ModelRegistry(strict) as registry:
        records = registry.audit_records()
        assert [r for r in records if r.action == "denied"] == denied_before
        rollback = records[-1]
        assert (rollback.action, rollback.actor) == ("canary_rollback", "svc-watcher")
        assert rollback.details["identity"]["roles"] == ["deploy"]
        assert release.release_state(registry).canary is None
        assert registry.champion() == "1"
        # Nothing left to judge: the next tick writes nothing at all.
        again = release.ReleaseWatcher(strict, tmp_path / "log", api_key=watcher_key())
        assert again.check_once().action == "none"
        assert len(registry.audit_records()) == len(records)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_scenario_on_the_team_profile_refuses_with_a_clear_message(keel_home, monkeypatch):
    from keel import cli as keel_cli

    runner = CliRunner()
    bad = runner.invoke(keel_cli.cli, ["scenario", "--profile", "team", "--days", "3"])
    assert bad.exit_code == 2 and "--drift-day" in bad.output and "0..2" in bad.output

    monkeypatch.setenv("KEEL_CELERY_BROKER", f"pyamqp://guest:guest@127.0.0.1:{_closed_port()}//")
    down = runner.invoke(keel_cli.cli, ["scenario", "--profile", "team"])
    assert down.exit_code == 1
    assert "the team profile cannot play here: rabbitmq is not reachable" in down.output
    assert "postgres is not reachable" not in down.output

    # Postgres answers but refuses the role the team's database URL names.
    monkeypatch.delenv("KEEL_CELERY_BROKER")
    role = f"keys_nobody_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(services.PG_URL_ENV, f"postgresql://{role}@127.0.0.1:5432/keys_nowhere")
    refused = runner.invoke(keel_cli.cli, ["scenario", "--profile", "team"])
    assert refused.exit_code == 1 and "Postgres refused the team's databases" in refused.output
    assert role in refused.output and "Traceback" not in refused.output
    # Nothing was started.
    assert services.recorded(keel_home) == []


@pytest.fixture
def keys_world(keel_home, monkeypatch):
    """Team databases, role, queues and a Redis database of these tests alone."""
    with team_world(keel_home, monkeypatch, "keys", REDIS_DB):
        # No MLflow server answers here: the scenario starts its own.
        monkeypatch.setenv(services.MLFLOW_URL_ENV, f"http://127.0.0.1:{_closed_port()}")
        monkeypatch.delenv(KEY_ENV, raising=False)
        yield keel_home


def test_team_up_twice_keeps_one_identity_per_service_and_down_leaves_them(keys_world):
    from keel import cli as keel_cli

    paths = keys_world
    runner = CliRunner()
    args = ["team", "up", "--workers", "1", "--gpu-workers", "0", "--mlflow-port", "0"]
    first = runner.invoke(keel_cli.cli, args)
    assert first.exit_code == 0, first.output
    assert first.output.count("(issued)") == 3 and "as svc-workers" in first.output
    second = runner.invoke(keel_cli.cli, args)
    assert second.exit_code == 0, second.output
    assert second.output.count("(kept)") == 3 and "(issued)" not in second.output
    store = KeyStore(default_store_path(), cache_seconds=0.0)
    assert {name: len(ids) for name, ids in _active(store).items()} == dict.fromkeys(
        keys.SERVICE_ROLES, 1
    )
    down = runner.invoke(keel_cli.cli, ["team", "down"])
    assert down.exit_code == 0 and "stopped keel-default-1" in down.output
    assert services.recorded(paths) == []
    status = runner.invoke(keel_cli.cli, ["team", "status"])
    assert "svc-daemon acts as svc-daemon (deployer, trainer)" in status.output
    assert "svc-watcher acts as svc-watcher (deploy)" in status.output


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_keel_scenario_plays_the_closed_loop_through_the_team_queue(keys_world):
    import dagster as dg

    from keel import cli as keel_cli
    from keel.access.jobs import LAUNCHED_BY_TAG
    from orchestration.scenario import Scenario

    paths = keys_world
    args = ["--accounts", "1500", "--history-days", "45", "--days", "2", "--drift-day", "1"]
    played = CliRunner().invoke(keel_cli.cli, ["scenario", "--profile", "team", *args])
    assert played.exit_code == 0, played.output
    days = Scenario(accounts=1_500, history_days=45, days=2, drift_day=1).monitored_days
    for day in days:
        assert f"    {day.isoformat()}: drift=" in played.output
    assert "team services: MLflow http://127.0.0.1:" in played.output
    assert "champion versions over time: " in played.output
    # The daemon launched every run as its identity; the scenario's services are stopped.
    with dg.DagsterInstance.get() as instance:
        runs = [record.dagster_run for record in instance.get_run_records()]
    assert runs and {run.tags.get(LAUNCHED_BY_TAG) for run in runs} == {"svc-daemon"}
    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
    assert services.recorded(paths) == []
    # The workers registered and attached bundles as their identity; nothing was refused.
    import psycopg
    from sqlalchemy.engine import make_url

    audit = make_url(services.audit_uri()).database
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{audit}") as connection:
        trail = connection.execute("select action, actor from keel_registry_audit").fetchall()
    assert ("register", "svc-workers") in trail and ("attach_bundle", "svc-workers") in trail
    assert not any(action == "denied" for action, _ in trail)
