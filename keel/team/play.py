"""The closed-loop scenario played on the team profile, as `keel scenario --profile team` does.

It uses this machine's team services (Postgres, RabbitMQ, an MLflow server) and starts what
the scenario needs of its own: Celery workers and a ``dagster-daemon`` on the scenario's code
location (`keel.team.scenario`), both started with ``KEEL_TEAM_SCENARIO`` so that they rebuild
the scenario's jobs, on queues of their own so that the workers of ``keel team up`` (which
cannot build them) never take its steps. Every service acts with its own key
(`keel.team.keys`); every run goes through the queue (`keel.team.scenario.QueuedRuns`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from keel.settings import KeelPaths
from keel.team import keys, services
from keel.team import scenario as team_scenario

DAEMON_STOP_S = 60


@dataclass
class TeamPlay:
    """What `team_services` started for one scenario: MLflow (when none served), workers, daemon."""

    paths: KeelPaths
    mlflow_url: str
    workers: list[dict] = field(default_factory=list)
    started: list[dict] = field(default_factory=list)
    daemon: subprocess.Popen | None = None


def unreachable() -> list[str]:
    """Why the team profile cannot play on this machine: each system service that is down."""
    return [
        f"{service.name} is not reachable at {service.url} (Debian package {service.package})"
        for service in services.system_services()
        if not service.reachable()
    ]


def prepare(paths: KeelPaths) -> list[keys.Provisioned]:
    """The team's databases, the instance file, and the services' identities (as team up)."""
    from keel.dagster_home import prepare_dagster_home

    services.ensure_database(services.dagster_pg_url())
    services.ensure_audit_store()
    services.ensure_database(services.feast_registry_url().replace("+psycopg", "", 1))
    prepare_dagster_home(paths, "team")
    return keys.provision(paths)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _serving(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def environment(changes: dict[str, str]) -> Iterator[None]:
    """``changes`` in this process's environment, which every started service inherits."""
    before = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _stop_daemon(daemon: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(daemon.pid, signal.SIGTERM)
    try:
        daemon.wait(timeout=DAEMON_STOP_S)
    except subprocess.TimeoutExpired:
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(timeout=DAEMON_STOP_S)


@contextlib.contextmanager
def team_services(paths: KeelPaths, scenario, workers: int = 2) -> Iterator[TeamPlay]:
    """The scenario's services, stopped on exit; an MLflow server only when none serves.

    Call `prepare` first. The scenario, its queue prefix and the MLflow URL stay in this
    process's environment while the block runs (the queue's code server reads them too).
    """
    from orchestration.executors import QUEUE_PREFIX_ENV

    prefix = f"{os.environ.get(QUEUE_PREFIX_ENV, '').strip()}scenario-{os.getpid()}-"
    url = os.environ.get(services.MLFLOW_URL_ENV, "").strip() or services.DEFAULT_MLFLOW_URL
    changes = {
        team_scenario.SCENARIO_ENV: team_scenario.scenario_to_env(scenario),
        QUEUE_PREFIX_ENV: prefix,
        services.MLFLOW_URL_ENV: url,
    }
    with environment(changes):
        play = TeamPlay(paths, url)
        try:
            if not _serving(url):
                server = services.start_mlflow(paths, "127.0.0.1", _free_port())
                play.started.append(server)
                play.mlflow_url = server["url"]
                os.environ[services.MLFLOW_URL_ENV] = server["url"]
                services.wait_until_serving(server)
            for n in range(1, workers + 1):
                entry = services.start_worker(paths, "default,gpu", f"scenario-{n}-{os.getpid()}")
                play.started.append(entry)
                play.workers.append(entry)
            for entry in play.workers:
                services.wait_until_ready(entry)
            env = services.team_environment(paths, keys.DAEMON)
            play.daemon = team_scenario.start_daemon(paths, env)
            yield play
        finally:
            if play.daemon is not None:
                _stop_daemon(play.daemon)
            services.stop(paths, play.started)


def play(
    scenario, paths: KeelPaths, echo: Callable[[str], None] = print, workers: int = 2
):  # -> orchestration.scenario.ScenarioResult
    """Play ``scenario`` on the team profile through the run queue; `prepare` first."""
    import dagster as dg

    from orchestration.profiles import resources_for
    from orchestration.scenario import run_scenario

    with team_services(paths, scenario, workers) as started:
        echo(
            f"team services: MLflow {started.mlflow_url}, workers "
            f"{', '.join(w['name'] for w in started.workers)} as {keys.WORKERS}, "
            f"daemon as {keys.DAEMON}"
        )
        with (
            dg.DagsterInstance.get() as instance,
            team_scenario.QueuedRuns(instance) as queue,
        ):
            return run_scenario(scenario, instance, resources_for("team"), echo=echo, queue=queue)
