"""The closed loop on the team profile, through the run queue, against the local profile.

Twenty monitored days with a covariate drift from day 12, played twice on the same seed: in
process on the local profile, and on the team profile where every run is submitted to the
queued run coordinator, taken off the queue by ``dagster-daemon``, and its steps run as Celery
tasks in two workers. Both must reach the same drift verdicts, retrainings, registrations and
audit trail.
"""

from __future__ import annotations

import socket

import dagster as dg
import pytest

from keel.access.jobs import LAUNCHED_BY_TAG
from keel.settings import KeelPaths
from keel.team import keys, play, services
from keel.team import scenario as team_scenario
from orchestration.scenario import Scenario, run_scenario
from tests.team_world import PG_SERVER
from tests.team_world import team_world as team_databases

# Local and team together take about 22 minutes on two quiet cores: CI runs it in `make test-team`.
pytestmark = [pytest.mark.slow, pytest.mark.team, pytest.mark.timeout(5400)]

REDIS_DB = 5
SCENARIO = Scenario(accounts=1_500, history_days=45, days=20, drift_day=12)


def _audit_trail(result) -> list[tuple]:
    """The audit records as the scenario decided them (not who, as which identity, or when)."""
    return [
        (r["model_name"], r["action"], r["from_version"], r["to_version"], r["reason"])
        for r in result.audit
    ]


def _retrainings(result) -> list[tuple]:
    return [(r["run_key"], r["success"], tuple(r["failed_gates"])) for r in result.retraining_runs]


@pytest.fixture
def team_world(tmp_path, monkeypatch):
    """The team profile's services of this test alone: databases, role, queues, Redis keys."""
    paths = KeelPaths(tmp_path / "team-home").ensure()
    with team_databases(paths, monkeypatch, "keel_e", REDIS_DB) as names:
        services.ensure_database(f"{PG_SERVER}/{names['lake']}")
        services.ensure_audit_store()
        monkeypatch.setenv(services.AUDIT_KEY_ENV, services.audit_key(paths))
        yield paths


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _workers_by_run(instance: dg.DagsterInstance) -> dict[str, set[str]]:
    """Each run's Celery workers (names before the host), from its engine events."""
    taken: dict[str, set[str]] = {}
    for record in instance.get_run_records():
        run_id = record.dagster_run.run_id
        for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            worker = event.dagster_event.engine_event_data.metadata.get("Celery worker")
            if worker is not None:
                taken.setdefault(run_id, set()).add(worker.value.split("@")[0])
    return taken


def test_the_closed_loop_on_the_team_profile_matches_the_local_profile(
    tmp_path, monkeypatch, team_world, capsys
):
    from orchestration.profiles import resources_for

    # The team profile as `keel scenario --profile team` plays it: the team's databases and
    # service identities, an MLflow server of the test's own (nothing serves on the port it
    # names), two workers on both queues and the daemon, each acting with its own key.
    paths = team_world
    play.prepare(paths)
    monkeypatch.setenv(services.MLFLOW_URL_ENV, f"http://127.0.0.1:{_free_port()}")
    with play.team_services(paths, SCENARIO, workers=2) as started:
        workers = started.workers
        with dg.DagsterInstance.get() as instance:
            with team_scenario.QueuedRuns(instance) as queue:
                team = run_scenario(
                    SCENARIO, instance, resources_for("team"), echo=print, queue=queue
                )
            runs = {
                record.dagster_run.run_id: record.dagster_run
                for record in instance.get_run_records()
            }
            taken = _workers_by_run(instance)
            # Only the queued run coordinator records RUN_ENQUEUED; the scenario never launches
            # a run itself, so a queued run that started was taken off the queue by the daemon.
            enqueued = {
                run_id
                for run_id in runs
                if instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_ENQUEUED)
                and instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_START)
            }

    # The local profile on the same seed, in process, in its own data folder and instance.
    with monkeypatch.context() as local_env:
        local_env.setenv("KEEL_PROFILE", "local")
        local_env.setenv("KEEL_HOME", str(KeelPaths(tmp_path / "local-home").ensure().home))
        local_env.delenv("DAGSTER_HOME")
        local_env.delenv("KEEL_API_KEY", raising=False)
        with dg.DagsterInstance.ephemeral() as instance:
            local = run_scenario(SCENARIO, instance, resources_for("local"), echo=lambda _: None)

    with capsys.disabled():
        print(f"\nlocal: {local.to_json()}\nteam: {team.to_json()}")
    # Every run went through the queue and the daemon, whose run launcher tagged it with the
    # identity it launched it as (the daemon's own); every run's steps ran on Celery workers,
    # and the steps of one run ran in both workers, which registered the models as theirs.
    assert runs and enqueued == set(runs)
    assert {run.tags.get(LAUNCHED_BY_TAG) for run in runs.values()} == {keys.DAEMON}
    assert {r["actor"] for r in team.audit if r["action"] == "register"} == {keys.WORKERS}
    names = {entry["name"] for entry in workers}
    assert set(taken) == set(runs)
    assert any(used == names for used in taken.values()), taken

    # The same story on both profiles.
    assert team.drift_by_day == local.drift_by_day
    assert team.drifted_features == local.drifted_features
    assert _retrainings(team) == _retrainings(local)
    assert team.champions == local.champions
    assert _audit_trail(team) == _audit_trail(local)
    # ... and a meaningful one: the drift is flagged, a retraining registers a new champion.
    drift_start = SCENARIO.monitored_days[SCENARIO.drift_day].isoformat()
    assert any(v for day, v in local.drift_by_day.items() if day >= drift_start)
    assert local.retraining_runs and local.retraining_runs[0]["run_key"].startswith("drift:")
