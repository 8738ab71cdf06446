"""``keel cost``: money and resources per asset, model version, day or run."""

from __future__ import annotations

import json

import click


def _model_versions() -> dict[str, list[str]]:
    """Each version of every registered model ("<name> v<n>") -> its MLflow training run.

    The project's model and each dataset folder's are registered models of the same store.
    """
    import os

    from mlflow import MlflowClient

    from keel.registry_types import RegistryConfig

    tracking = os.environ.get("MLFLOW_TRACKING_URI") or RegistryConfig.local().tracking_uri
    registry = os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    client = MlflowClient(tracking_uri=tracking, registry_uri=registry)
    versions = client.search_model_versions()
    return {
        f"{v.name} v{v.version}": [v.run_id]
        for v in sorted(versions, key=lambda v: (v.name, int(v.version)))
        if v.run_id
    }


@click.command("cost")
@click.option("--since", default="30d", show_default=True, help="30d, 12h, 2w or an ISO date.")
@click.option(
    "--by",
    "group",
    type=click.Choice(["asset", "model", "day", "run"]),
    multiple=True,
    help="Groupings to show [default: asset, model and day].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the totals as JSON.")
def cost(since: str, group: tuple[str, ...], as_json: bool) -> None:
    """Measured cost of Dagster steps (CPU, peak memory, GPU, bytes written), priced per profile."""
    from keel.cost.store import CostError, CostStore, parse_since

    try:
        start = parse_since(since)
    except CostError as error:
        raise click.BadParameter(str(error), param_hint="--since") from error
    store = CostStore()
    rows = store.rows(start)
    currency = rows[-1]["currency"] if rows else ""
    tables = {}
    for name in group or ("asset", "model", "day"):
        if name == "model":
            tables[name] = store.by_model(_model_versions(), start)
        else:
            tables[name] = getattr(store, f"by_{name}")(start)
    if as_json:
        payload = {k: {key: t.to_json() for key, t in v.items()} for k, v in tables.items()}
        click.echo(json.dumps({"since": start.isoformat(), "currency": currency, **payload}))
        return
    click.echo(f"{len(rows)} steps since {start:%Y-%m-%d %H:%M} UTC ({currency or 'no costs'})")
    for name, totals in tables.items():
        click.echo(f"\nper {name}")
        click.echo(f"  {'':<36} {'cost':>10} {'saved':>9} {'cpu s':>9} {'gpu s':>8} {'written':>9}")
        for key, total in totals.items():
            click.echo(
                f"  {key[:36]:<36} {total.cost:>10.4f} {total.saved:>9.4f} {total.cpu_s:>9.1f} "
                f"{total.gpu_s:>8.1f} {total.bytes_written / 2**20:>7.1f}MB"
            )
