"""``keel team up|down|status`` and ``keel workers start``: the team profile on this machine."""

from __future__ import annotations

import os
import subprocess

import click

from keel.settings import KeelPaths


@click.group()
def team() -> None:
    """Start, stop and check the team profile's services on this machine."""


@team.command()
@click.option("--workers", default=1, show_default=True, help="Workers on the default queue.")
@click.option("--gpu-workers", default=1, show_default=True, help="Workers on the gpu queue.")
@click.option("--mlflow-host", default="127.0.0.1", show_default=True)
@click.option(
    "--mlflow-port", default=5000, show_default=True, help="MLflow server port; 0 starts none."
)
@click.option(
    "--rotate-keys", is_flag=True, help="Revoke the services' API keys and issue new ones."
)
def up(
    workers: int, gpu_workers: int, mlflow_host: str, mlflow_port: int, rotate_keys: bool
) -> None:
    """Create Dagster's database, start the workers and the MLflow server, print where.

    Each long-running service gets an identity and API key of its own (keel.team.keys).
    """
    from keel.team import keys, services

    missing = [s for s in services.system_services() if not s.reachable()]
    if missing:
        for service in missing:
            click.echo(f"{service.name} is not reachable at {service.url}", err=True)
            click.echo(f"  install and start the Debian package {service.package}", err=True)
        raise SystemExit(1)
    url = services.dagster_pg_url()
    created = services.ensure_database(url)
    click.echo(f"dagster storage  {url} ({'created' if created else 'exists'})")
    paths = KeelPaths.current().ensure()
    role = services.ensure_audit_store()
    click.echo(f"registry audit   {services.audit_uri()} (role {role}: INSERT and SELECT only)")
    feast = services.feast_registry_url()
    services.ensure_database(feast.replace("+psycopg", "", 1))
    click.echo(f"feast registry   {feast}")
    from keel.dagster_home import prepare_dagster_home

    # The instance file, and the pool limits that let the workers' lake writers run side by side.
    home = prepare_dagster_home(paths, "team")
    click.echo(f"DAGSTER_HOME     {home}")
    for entry in keys.provision(paths, rotate=rotate_keys):
        state = "issued" if entry.issued else "kept"
        click.echo(
            f"identity {entry.name:<12} {', '.join(entry.roles):<18} key {entry.key_id} "
            f"({state}) in {entry.key_file}"
        )
    if services.recorded(paths):
        services.stop_all(paths)
    started = [
        services.start_worker(paths, queue, f"keel-{queue}-{n}")
        for queue, count in (("default", workers), ("gpu", gpu_workers))
        for n in range(1, count + 1)
    ]
    for entry in started:
        services.wait_until_ready(entry)
        click.echo(
            f"worker {entry['name']:<16} queue {entry['queue']:<8} pid {entry['pid']} "
            f"as {entry['identity']}"
        )
    if mlflow_port:
        server = services.start_mlflow(paths, mlflow_host, mlflow_port)
        services.wait_until_serving(server)
        click.echo(f"mlflow server    {server['url']} pid {server['pid']}")
        click.echo(f"  backend store  {services.mlflow_pg_url()}")
        if server["url"] != services.DEFAULT_MLFLOW_URL:
            click.echo(f"  export {services.MLFLOW_URL_ENV}={server['url']}")
    click.echo(f"broker           {services.system_services()[1].url}")
    click.echo("other machines:  keel workers start --queue default|gpu (same env, same KEEL_HOME)")


@team.command()
def down() -> None:
    """Stop the workers ``keel team up`` started (the services' identities stay)."""
    from keel.team import services

    for entry in services.stop_all(KeelPaths.current()):
        click.echo(f"stopped {entry['name']} (pid {entry['pid']})")


@team.command()
def status() -> None:
    """Report each service reachable or not, the workers started here and who they act as."""
    from keel.team import keys, services

    down_count = 0
    for service in services.system_services():
        ok = service.reachable()
        down_count += not ok
        state = "reachable" if ok else f"NOT reachable (Debian package {service.package})"
        click.echo(f"{service.name:<10} {service.url:<52} {state}")
    for entry in services.recorded(KeelPaths.current()):
        ok = services.alive(entry["pid"])
        down_count += not ok
        state = "running" if ok else "NOT running"
        where = f"queue {entry['queue']}" if "queue" in entry else entry["url"]
        who = f" as {entry['identity']}" if "identity" in entry else ""
        click.echo(f"{entry['name']:<10} {where:<30} pid {entry['pid']:<8} {state}{who}")
    for service, identity in keys.describe(KeelPaths.current()).items():
        click.echo(f"{service:<10} acts as {identity}")
    raise SystemExit(1 if down_count else 0)


@click.group()
def workers() -> None:
    """Celery workers that run the team profile's steps."""


@workers.command()
@click.option("--queue", type=click.Choice(["default", "gpu"]), default="default")
@click.option("--name", default=None, help="Worker name (default: keel-QUEUE-PID).")
def start(queue: str, name: str | None) -> None:
    """Run a worker in the foreground on one queue (one per machine and queue, typically)."""
    from keel.settings import PROJECT_ROOT
    from keel.team import services
    from keel.team.keys import WORKERS

    paths = KeelPaths.current()
    services.write_instance_file(paths)
    command = services.worker_command(queue, name or f"keel-{queue}-{os.getpid()}")
    env = services.team_environment(paths, WORKERS)
    raise SystemExit(subprocess.call(command, cwd=PROJECT_ROOT, env=env))


@click.command("scenario")
@click.option(
    "--profile",
    "profile_name",
    type=click.Choice(["local", "team"]),
    default=None,
    help="Where runs execute: in this process (local) or through the team's run queue. "
    "Default: the active profile.",
)
@click.option("--accounts", default=5_000, show_default=True, help="Accounts in the world.")
@click.option("--history-days", default=45, show_default=True, help="Days before monitoring.")
@click.option("--days", default=10, show_default=True, help="Days run one at a time.")
@click.option("--drift-day", default=4, show_default=True, help="Monitored day drift starts.")
@click.option(
    "--workers", default=2, show_default=True, help="Celery workers started for it (team)."
)
def scenario(
    profile_name: str | None,
    accounts: int,
    history_days: int,
    days: int,
    drift_day: int,
    workers: int,
) -> None:
    """Play the closed loop day by day on generated data and print what happened each day.

    On the team profile every run is queued, taken off the queue by a daemon and its steps run
    on Celery workers; Postgres and RabbitMQ must be running (see keel team status).
    """
    from keel.settings import active_profile

    profile_name = profile_name or active_profile()
    if profile_name not in ("local", "team"):
        raise click.UsageError(
            f"the scenario plays on the local or team profile, not {profile_name}"
        )
    if not 0 <= drift_day < days:
        raise click.BadParameter(
            f"must lie in 0..{days - 1} (--days {days})", param_hint="--drift-day"
        )
    if workers < 1:
        raise click.BadParameter("at least one worker", param_hint="--workers")
    from orchestration.scenario import Scenario

    played = Scenario(accounts=accounts, history_days=history_days, days=days, drift_day=drift_day)
    os.environ["KEEL_PROFILE"] = profile_name
    paths = KeelPaths.current().ensure()
    drift_start = played.monitored_days[drift_day].isoformat()
    click.echo(
        f"Keel scenario ({profile_name} profile) in {paths.home}: {accounts} accounts, "
        f"covariate drift from {drift_start}"
    )
    result = (
        _play_team(played, paths, workers) if profile_name == "team" else _play_local(played, paths)
    )
    for line in result.summary(drift_start):
        click.echo(line)


def _play_local(played, paths: KeelPaths):
    import dagster as dg

    from keel.dagster_home import prepare_dagster_home
    from orchestration.profiles import resources_for
    from orchestration.scenario import run_scenario

    prepare_dagster_home(paths, "local")
    with dg.DagsterInstance.get() as instance:
        return run_scenario(played, instance, resources_for("local"), echo=click.echo)


def _play_team(played, paths: KeelPaths, workers: int):
    import psycopg
    import psycopg2

    from keel.team import play, services

    problems = play.unreachable()
    if problems:
        raise click.ClickException(
            "the team profile cannot play here: " + "; ".join(problems) + " (keel team status)"
        )
    try:
        play.prepare(paths)
    except (psycopg.Error, psycopg2.Error) as error:
        raise click.ClickException(
            f"Postgres refused the team's databases ({services.dagster_pg_url()}): "
            f"{str(error).strip()}"
        ) from error
    return play.play(played, paths, echo=click.echo, workers=workers)
