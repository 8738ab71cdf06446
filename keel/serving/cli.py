"""``keel serve``: run the serving app under uvicorn, and manage its API keys."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import click

from keel.serving.settings import UNKNOWN_POLICIES, ServeSettings, serve_dir

ROLE_CHOICES = ("predict", "deploy", "admin")


def prepare_metrics_dir(port: int) -> str:
    """A fresh folder for the workers' metric files (stale files would be summed in)."""
    folder = serve_dir() / f"metrics-{port}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return str(folder)


def watcher_key() -> str:
    """The release watcher's own key where identities are required and `keel team up` issued it."""
    from keel.access.identity import identities_required
    from keel.settings import KeelPaths
    from keel.team.keys import WATCHER, service_key

    return service_key(KeelPaths.current(), WATCHER) if identities_required() else ""


def run_server(
    settings: ServeSettings, host: str, port: int, workers: int, log_level: str = "warning"
) -> None:
    """Start uvicorn with ``workers`` processes, each building the app from ``settings``."""
    import uvicorn

    # Workers read their settings and the metrics folder from the environment, and
    # prometheus-client picks multiprocess mode on import: both before any worker starts.
    os.environ.update(settings.to_env())
    # A server's log is no place for model download progress bars.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = prepare_metrics_dir(port)
    # The supervisor judges a running canary (keel.serving.release), like the Dagster sensor.
    from keel.serving.release import ReleaseWatcher

    watcher = ReleaseWatcher(
        settings.registry_config(),
        settings.resolved_log_dir(),
        webhook_url=os.environ.get("KEEL_ALERT_WEBHOOK", ""),
        api_key=watcher_key(),
    ).start()
    try:
        uvicorn.run(
            "keel.serving.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    finally:
        watcher.stop()


@click.group(invoke_without_command=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--workers", default=2, show_default=True, help="uvicorn worker processes.")
@click.option("--feast-config", default=None, help="Feast yaml in feature_repo/ (profile's).")
@click.option(
    "--feast-overrides", default=None, help='JSON merged over it, e.g. {"project": "keel"}.'
)
@click.option("--poll-seconds", type=float, default=None, help="Registry alias poll interval.")
@click.option("--cache-entries", type=int, default=None, help="Prediction cache per worker.")
@click.option("--unknown", type=click.Choice(UNKNOWN_POLICIES), default=None, help="Policy.")
@click.option("--no-auth", is_flag=True, help="Serve without API keys (local experiments).")
@click.option(
    "--bundle",
    type=click.Choice(["fp32", "int8"]),
    default=None,
    help="Serve each version's edge bundle (ONNX) instead of its native model.",
)
@click.option("--log-level", default="warning", show_default=True)
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    workers: int,
    feast_config: str | None,
    feast_overrides: str | None,
    poll_seconds: float | None,
    cache_entries: int | None,
    unknown: str | None,
    no_auth: bool,
    bundle: str | None,
    log_level: str,
) -> None:
    """Serve default-risk scores over HTTP (POST /v1/predict, /docs); `keys` manages API keys.

    Settings not given here come from KEEL_SERVE_* variables, else the active profile.
    """
    if ctx.invoked_subcommand is not None:
        return
    if workers < 1:
        raise click.BadParameter("at least one worker", param_hint="--workers")
    settings = ServeSettings.from_env()
    changes: dict = {
        "feast_config": feast_config,
        "feast_overrides": json.loads(feast_overrides) if feast_overrides else None,
        "poll_seconds": poll_seconds,
        "cache_entries": cache_entries,
        "unknown_entities": unknown,
        "auth": False if no_auth else None,
        "bundle": bundle,
    }
    settings = replace(settings, **{k: v for k, v in changes.items() if v is not None})
    if settings.auth and not settings.resolved_keys_file().exists():
        click.echo(
            "no API keys yet: create one with `keel serve keys add --owner NAME --role predict`",
            err=True,
        )
    click.echo(f"keel serve on http://{host}:{port} ({workers} workers); docs at /docs", err=True)
    run_server(settings, host, port, workers, log_level)


@serve.group()
def keys() -> None:
    """Create, list and revoke API keys (stored hashed in $KEEL_HOME/serve/api_keys.db)."""


def _key_store():
    from keel.serving.auth import KeyStore

    return KeyStore(ServeSettings.from_env().resolved_keys_file())


@keys.command("add")
@click.option("--owner", required=True, help="Who uses the key; recorded as the actor.")
@click.option("--role", "roles", multiple=True, required=True, type=click.Choice(ROLE_CHOICES))
def add_key(owner: str, roles: tuple[str, ...]) -> None:
    """Create a key and print it once (only its hash is kept)."""
    from keel.serving.auth import ApiKeyError

    try:
        key = _key_store().add(owner, roles)
    except ApiKeyError as error:
        raise click.ClickException(str(error)) from error
    click.echo(key)


@keys.command("list")
def list_keys() -> None:
    """Every key's id, owner, roles and state (never the key itself)."""
    for row in _key_store().list():
        state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
        click.echo(f"{row['key_id']}  {row['owner']:<20} {row['roles']:<24} {state}")


@keys.command("revoke")
@click.argument("key_id")
def revoke_key(key_id: str) -> None:
    """Revoke a key by its id (the 8 hex digits after ``keel_``)."""
    from keel.serving.auth import ApiKeyError

    try:
        _key_store().revoke(key_id)
    except ApiKeyError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"revoked {key_id}")
