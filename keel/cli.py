"""The ``keel`` command line: one entry point, one subcommand group per pipeline stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from keel.access.cli import access
from keel.cost.cli import cost
from keel.dagster_home import prepare_dagster_home
from keel.dashboards.cli import dashboards
from keel.dashboards.service import DEFAULT_PORT as DASHBOARDS_PORT
from keel.datasets.cli import dataset
from keel.lake_cli import lake
from keel.registry_cli import registry
from keel.serving.cli import serve
from keel.serving.release_cli import release
from keel.settings import PROJECT_ROOT, KeelPaths, active_profile
from keel.streaming.cli import stream
from keel.team.cli import scenario, team, workers


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="keel")
def cli() -> None:
    """Keel: raw data to features, models, gates, registry, serving and drift-driven retraining."""


@cli.command()
def info() -> None:
    """Print the active profile and where every artefact lives."""
    paths = KeelPaths.current()
    click.echo(f"profile        {active_profile()}")
    for name in ("home", "warehouse", "marts", "landing", "artefacts", "mlflow", "feast"):
        click.echo(f"{name:<14} {getattr(paths, name)}")
    click.echo(f"{'dagster_home':<14} {os.environ.get('DAGSTER_HOME', paths.dagster_home)}")


@cli.command()
def prepare() -> None:
    """Create the data folder and DAGSTER_HOME, and parse the dbt project for Dagster."""
    paths = KeelPaths.current().ensure()
    home = prepare_dagster_home(paths, active_profile())
    from orchestration.dbt import prepare as prepare_dbt

    prepare_dbt()
    click.echo(f"prepared {paths.home} (DAGSTER_HOME={home})")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True)
@click.option(
    "--dashboards-port",
    default=DASHBOARDS_PORT,
    show_default=True,
    help="Port of the Evidently UI (monitoring dashboards); 0 leaves it off.",
)
def dev(host: str, port: int, dashboards_port: int) -> None:
    """Serve the Dagster UI, run the daemon, and serve the Evidently UI beside them."""
    paths = KeelPaths.current()
    prepare_dagster_home(paths, active_profile())
    if active_profile() == "team":
        from keel.access.store import KEY_ENV
        from keel.team.keys import DAEMON, service_key

        # The daemon launches every run: as its service identity, not as whoever started it.
        key = service_key(paths, DAEMON)
        if key:
            os.environ[KEY_ENV] = key
            click.echo(f"the Dagster daemon acts as {DAEMON}", err=True)
    dagster = Path(sys.executable).with_name("dagster")
    command = [str(dagster), "dev", "-w", "workspace.yaml", "-h", host, "-p", str(port)]
    if not dashboards_port:
        raise SystemExit(subprocess.call(command, cwd=PROJECT_ROOT))
    from keel.dashboards.service import run_beside, workspace_dir

    workspace = workspace_dir(paths.artefacts)
    code = run_beside(
        command, PROJECT_ROOT, workspace, host=host, port=dashboards_port, echo=click.echo
    )
    raise SystemExit(code)


@cli.command()
@click.option("--accounts", default=5_000, show_default=True, help="Accounts in the world.")
@click.option("--history-days", default=45, show_default=True, help="Days before monitoring.")
@click.option("--days", default=10, show_default=True, help="Days run one at a time.")
@click.option("--drift-day", default=4, show_default=True, help="Monitored day drift starts.")
@click.option("--no-release", is_flag=True, help="Skip the serving and release part.")
def demo(accounts: int, history_days: int, days: int, drift_day: int, no_release: bool) -> None:
    """Run the whole loop on generated data and print where to look."""
    import dagster as dg

    from orchestration.profiles import resources_for
    from orchestration.scenario import Scenario, run_scenario

    paths = KeelPaths.current().ensure()
    prepare_dagster_home(paths, "local")
    scenario = Scenario(
        accounts=accounts, history_days=history_days, days=days, drift_day=drift_day
    )
    drift_start = scenario.monitored_days[drift_day].isoformat()
    click.echo(
        f"Keel demo in {paths.home}: {accounts} accounts, covariate drift from {drift_start}"
    )
    with dg.DagsterInstance.get() as instance:
        result = run_scenario(scenario, instance, resources_for("local"), echo=click.echo)
    for line in result.summary(drift_start):
        click.echo(line)
    lineage = result.champion_lineage
    click.echo(f"champion trained on {lineage.get('training_set', {}).get('path')}")
    if not no_release:
        from keel.serving.demo import run_release_demo

        click.echo("")
        click.echo("Release: keel serve for a moment, canaries judged on live traffic")
        run_release_demo(paths, echo=click.echo)
    click.echo("")
    click.echo("Where to look:")
    click.echo("  Dagster UI   make dev, then http://127.0.0.1:3000 (runs, asset graph, reports)")
    click.echo(
        f"  dashboards   make dev, then http://127.0.0.1:{DASHBOARDS_PORT} (Evidently UI: drift,"
        " quality and performance over time, a project per dataset)"
    )
    click.echo(
        f"  MLflow UI    .venv/bin/mlflow ui --backend-store-uri sqlite:///{paths.mlflow}/mlflow.db"
        " then http://127.0.0.1:5000"
    )
    click.echo(f"  reports      {paths.artefacts}/monitoring and {paths.artefacts}/evaluation")
    click.echo("  audit trail  .venv/bin/keel registry audit")


@cli.group()
def profile() -> None:
    """Deployment profiles: check that a profile's settings describe one working deployment."""


@profile.command("check")
def profile_check() -> None:
    """Check the production profile's variables: all set, and its parts agree on locations."""
    from orchestration.profile_check import check_production

    problems = check_production()
    if problems:
        click.echo("the production profile cannot run:")
        for problem in problems:
            click.echo(f"- {problem}")
        raise SystemExit(1)
    click.echo("the production profile is complete and consistent")


cli.add_command(registry)
cli.add_command(dashboards)
cli.add_command(serve)
cli.add_command(release)
cli.add_command(access)
cli.add_command(cost)
cli.add_command(stream)
cli.add_command(dataset)
cli.add_command(lake)
cli.add_command(team)
cli.add_command(workers)
cli.add_command(scenario)


def main() -> None:
    """Entry point of the ``keel`` script."""
    # dbt and dagster run as subprocesses: find them in the same environment as keel itself.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    cli()
