"""``keel lake maintain``: the active profile's lake, kept small (keel.lake_maintenance)."""

from __future__ import annotations

import click

from keel.lake_maintenance import FILE_GRACE, SNAPSHOT_RETENTION, parse_age


def _age(context: click.Context, parameter: click.Parameter, value: str) -> str:
    try:
        parse_age(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from error
    return value


@click.group()
def lake() -> None:
    """The team and production profiles' warehouse, a DuckLake."""


@lake.command()
@click.option(
    "--older-than",
    default=SNAPSHOT_RETENTION,
    show_default=True,
    callback=_age,
    help="Expire snapshots older than this (30m, 12h, 7d, 2w).",
)
@click.option(
    "--grace",
    default=FILE_GRACE,
    show_default=True,
    callback=_age,
    help="Delete unneeded and orphaned files only once they are this old.",
)
@click.option("--dry-run", is_flag=True, help="Change nothing; count what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def maintain(older_than: str, grace: str, dry_run: bool, as_json: bool) -> None:
    """Flush, expire snapshots, compact files, delete unneeded and orphaned files."""
    import json
    import re

    import dagster as dg

    from keel.lake import LakeError
    from keel.lake_maintenance import maintain as run_maintenance
    from keel.settings import active_profile
    from orchestration.profiles import resources_for

    profile = active_profile()
    try:
        warehouse = resources_for(profile)["warehouse"].process_config_and_initialize()
    except dg.DagsterInvalidConfigError as error:
        unset = re.findall(r'environment variable "([^"]+)"', str(error))
        problem = f"set {', '.join(unset)}" if unset else str(error)
        raise click.ClickException(f"the {profile} profile's lake: {problem}") from error
    if not warehouse.is_lake:
        raise click.ClickException(
            f"the {profile} profile keeps its warehouse in a DuckDB file, not a lake: there is "
            "nothing to maintain (KEEL_PROFILE=team or production has a lake)"
        )
    try:
        with warehouse.connect() as connection:
            connection.execute("set enable_progress_bar = false")
            summary = run_maintenance(connection, older_than, grace, dry_run=dry_run)
    except LakeError as error:
        raise click.ClickException(str(error)) from error
    if as_json:
        click.echo(json.dumps(summary.as_dict()))
        return
    if dry_run:
        click.echo("dry run, nothing changed; a run now would")
        lines = {
            "expire snapshots": summary.snapshots_expired,
            "delete old files": summary.files_deleted,
            "delete orphans": summary.orphans_deleted,
            "free bytes": summary.bytes_deleted,
        }
    else:
        lines = {
            "rows flushed": summary.rows_flushed,
            "files compacted": f"{summary.files_compacted} into {summary.files_written}",
            "snapshots expired": summary.snapshots_expired,
            "old files deleted": summary.files_deleted,
            "orphans deleted": summary.orphans_deleted,
            "bytes freed": summary.bytes_deleted,
        }
    lines["live files"] = f"{summary.live_files_before} -> {summary.live_files_after}"
    for name, value in lines.items():
        click.echo(f"{name:<18} {value}")
