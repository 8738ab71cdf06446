"""``keel dataset``: scaffold and check dataset folders."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def dataset() -> None:
    """Datasets as configuration: one folder per dataset under datasets/."""


@dataset.command()
@click.argument("name")
@click.option(
    "--from",
    "source",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A CSV or Parquet file with one row per entity and observation.",
)
def new(name: str, source: Path) -> None:
    """Scaffold datasets/NAME from a file: types, key, time column and choices to confirm."""
    from keel.datasets.scaffold import scaffold
    from keel.datasets.spec import SpecError, load_spec

    try:
        folder = scaffold(name, source)
    except SpecError as error:
        raise click.ClickException(str(error)) from error
    spec = load_spec(folder)
    click.echo(f"created {folder}")
    click.echo(f"  entity key   {spec.entity_key}")
    click.echo(f"  label        {spec.label.column}")
    click.echo(f"  protected    {', '.join(spec.protected_attributes) or 'none found'}")
    click.echo(f"  features     {len(spec.features)}")
    click.echo(f"confirm the choices listed in {folder / 'README.md'}, then run `keel prepare`")


@dataset.command("list")
def list_datasets() -> None:
    """Every dataset folder, checked: its entity, label, feature service and model."""
    from keel.datasets.spec import SpecError, all_datasets

    try:
        specs = all_datasets()
    except SpecError as error:
        raise click.ClickException(str(error)) from error
    for spec in specs:
        loop = f"  ({spec.loop} loop)" if spec.loop else ""
        click.echo(
            f"{spec.name:<20} {spec.entity_key:<16} {spec.label.column:<14} "
            f"{spec.feature_service:<22} {spec.registered_model}{loop}"
        )
