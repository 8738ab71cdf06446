"""``keel dashboards``: feed the Evidently workspace from Dagster's event log, serve its UI."""

from __future__ import annotations

import click

from keel.dashboards.service import DEFAULT_PORT


def _workspace():
    from keel.dashboards.service import workspace_dir
    from keel.settings import KeelPaths

    return workspace_dir(KeelPaths.current().artefacts)


@click.group()
def dashboards() -> None:
    """Monitoring dashboards: the daily reports in an Evidently UI workspace."""


@dashboards.command()
def feed() -> None:
    """Add every monitoring report in the Dagster instance (DAGSTER_HOME) to the workspace.

    The monitoring_dashboards sensor does the same as reports arrive; feeding twice adds
    nothing.
    """
    import os

    import dagster as dg

    from keel.dashboards import feed_workspace, reports_from_instance
    from keel.settings import KeelPaths

    # The instance files read DAGSTER_HOME; keel prepare and keel dev point it at the data folder.
    os.environ.setdefault("DAGSTER_HOME", str(KeelPaths.current().dagster_home))
    with dg.DagsterInstance.get() as instance:
        batch = reports_from_instance(instance)
    for problem in batch.problems:
        click.echo(f"not fed: {problem}", err=True)
    summary = feed_workspace(_workspace(), batch.reports)
    click.echo(
        f"{summary.added} snapshots added, {summary.replaced} replaced, {summary.unchanged} "
        f"unchanged; projects: {', '.join(sorted(summary.projects)) or 'none'} ({_workspace()})"
    )


@dashboards.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=DEFAULT_PORT, show_default=True)
def ui(host: str, port: int) -> None:
    """Serve the Evidently UI on the workspace (``keel dev`` starts it too)."""
    import subprocess

    from keel.dashboards.service import evidently_ui_command, evidently_ui_environment

    workspace = _workspace()
    workspace.mkdir(parents=True, exist_ok=True)
    command = evidently_ui_command(workspace, host, port)
    raise SystemExit(subprocess.call(command, env=evidently_ui_environment()))
