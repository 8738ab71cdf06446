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
def up(workers: int, gpu_workers: int, mlflow_host: str, mlflow_port: int) -> None:
    """Create Dagster's database, start the workers and the MLflow server, print where."""
    from keel.team import services

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
    home = services.write_instance_file(paths)
    click.echo(f"DAGSTER_HOME     {home}")
    if services.recorded(paths):
        services.stop_all(paths)
    started = [
        services.start_worker(paths, queue, f"keel-{queue}-{n}")
        for queue, count in (("default", workers), ("gpu", gpu_workers))
        for n in range(1, count + 1)
    ]
    for entry in started:
        services.wait_until_ready(entry)
        click.echo(f"worker {entry['name']:<16} queue {entry['queue']:<8} pid {entry['pid']}")
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
    """Stop the workers ``keel team up`` started."""
    from keel.team import services

    for entry in services.stop_all(KeelPaths.current()):
        click.echo(f"stopped {entry['name']} (pid {entry['pid']})")


@team.command()
def status() -> None:
    """Report each service reachable or not, and the workers started here."""
    from keel.team import services

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
        click.echo(f"{entry['name']:<10} {where:<30} pid {entry['pid']:<8} {state}")
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

    paths = KeelPaths.current()
    services.write_instance_file(paths)
    command = services.worker_command(queue, name or f"keel-{queue}-{os.getpid()}")
    env = services.team_environment(paths)
    raise SystemExit(subprocess.call(command, cwd=PROJECT_ROOT, env=env))
