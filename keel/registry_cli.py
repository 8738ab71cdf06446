"""``keel registry``: approve, reject, promote and roll back model versions; audit and lineage.

Whoever runs a command acts as their authenticated identity (`keel.access.authenticate`):
the API key in ``KEEL_API_KEY``, else, in the local profile, the OS user. MLflow loads only
when a command runs, so ``keel --help`` stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import click

from keel.settings import active_profile

if TYPE_CHECKING:
    from keel.access import Identity
    from keel.registry import ModelRegistry, VersionInfo

T = TypeVar("T")


@click.group("registry")
@click.option(
    "--tracking-uri",
    envvar="MLFLOW_TRACKING_URI",
    help="MLflow tracking store [default: the local profile's SQLite store in KEEL_HOME].",
)
@click.option(
    "--registry-uri",
    envvar="MLFLOW_REGISTRY_URI",
    help="MLflow model registry [default: the tracking store].",
)
@click.option(
    "--audit-uri",
    envvar="KEEL_REGISTRY_AUDIT_URI",
    default="",
    help="SQLAlchemy URL of the audit database [default: the registry's database].",
)
@click.option(
    "--lock-file",
    envvar="KEEL_REGISTRY_LOCK_FILE",
    default=None,
    help="File lock serialising registry writes [default: next to the local store].",
)
@click.option(
    "--audit-key-file",
    envvar="KEEL_REGISTRY_AUDIT_KEY_FILE",
    default="",
    help="File (mode 0600) holding the key that chains the audit log [default: "
    "registry-audit.key next to a SQLite audit database; KEEL_REGISTRY_AUDIT_KEY wins].",
)
@click.pass_context
def registry(
    ctx: click.Context,
    tracking_uri: str | None,
    registry_uri: str | None,
    audit_uri: str,
    lock_file: str | None,
    audit_key_file: str,
) -> None:
    """Model registry: approvals, promotion, rollback, audit trail and lineage."""
    ctx.obj = {
        "tracking_uri": tracking_uri,
        "registry_uri": registry_uri,
        "audit_uri": audit_uri,
        "lock_file": lock_file,
        "audit_key_file": audit_key_file,
    }


def _open(ctx: click.Context) -> ModelRegistry:
    import os

    from keel.registry import ModelRegistry, RegistryConfig

    options = ctx.obj
    # A secret: read from the environment only, never from a command line that ps shows.
    key = {
        "audit_key": os.environ.get("KEEL_REGISTRY_AUDIT_KEY", ""),
        "audit_key_file": options["audit_key_file"],
    }
    if options["tracking_uri"]:
        config = RegistryConfig(
            tracking_uri=options["tracking_uri"],
            registry_uri=options["registry_uri"] or options["tracking_uri"],
            lock_file=options["lock_file"] or "",
            audit_uri=options["audit_uri"],
            **key,
        )
    elif active_profile() == "production":
        raise click.UsageError(
            "the production profile has no local registry: set MLFLOW_TRACKING_URI "
            "(or pass --tracking-uri)"
        )
    else:
        local = RegistryConfig.local()
        config = RegistryConfig(
            tracking_uri=local.tracking_uri,
            registry_uri=options["registry_uri"] or local.registry_uri,
            lock_file=options["lock_file"] or local.lock_file,
            audit_uri=options["audit_uri"],
            **key,
        )
    return ModelRegistry(config)


def _run(ctx: click.Context, action: Callable[[ModelRegistry], T]) -> T:
    """Run ``action`` on the registry; workflow refusals become one-line CLI errors."""
    from keel.access import AccessError
    from keel.registry import RegistryError

    try:
        with _open(ctx) as registry:
            return action(registry)
    except (RegistryError, AccessError) as error:
        raise click.ClickException(str(error)) from error


def _echo_version(info: VersionInfo) -> None:
    aliases = f", aliases {', '.join(info.aliases)}" if info.aliases else ""
    click.echo(
        f"version {info.version}: {info.approval_status}, stage {info.stage}{aliases} "
        f"(trained by {info.trained_by}, {info.model_family}, dataset {info.dataset_version[:12]})"
    )


def _identity() -> Identity:
    """The caller: KEEL_API_KEY's owner, else the OS user (local profile only)."""
    from keel.access import AuthenticationError, authenticate

    try:
        return authenticate()
    except AuthenticationError as error:
        raise click.ClickException(str(error)) from error


@registry.command()
@click.argument("version")
@click.option("--reason", default="", help="Why, for the audit trail.")
@click.pass_context
def approve(ctx: click.Context, version: str, reason: str) -> None:
    """Approve VERSION (a number or alias); the person who trained it may not."""
    _echo_version(_run(ctx, lambda r: r.approve(version, _identity(), reason)))


@registry.command()
@click.argument("version")
@click.option("--reason", required=True, help="Why it is rejected.")
@click.pass_context
def reject(ctx: click.Context, version: str, reason: str) -> None:
    """Reject VERSION for good (the champion is rolled back instead)."""
    _echo_version(_run(ctx, lambda r: r.reject(version, _identity(), reason)))


@registry.command()
@click.argument("version")
@click.option("--reason", default="", help="Why, for the audit trail.")
@click.pass_context
def promote(ctx: click.Context, version: str, reason: str) -> None:
    """Make an approved VERSION the champion (the old champion stays for rollback)."""
    _echo_version(_run(ctx, lambda r: r.promote(version, _identity(), reason)))


@registry.command()
@click.option("--reason", required=True, help="Why the champion is rolled back.")
@click.pass_context
def rollback(ctx: click.Context, reason: str) -> None:
    """Give the champion alias back to the previous champion."""
    _echo_version(_run(ctx, lambda r: r.rollback(_identity(), reason)))


@registry.command()
@click.option("--json", "as_json", is_flag=True, help="Print the records as a JSON list.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the last N.")
@click.option(
    "--verify",
    is_flag=True,
    help="Check the keyed chain and its head; exit 1 if a record was rewritten or deleted.",
)
@click.pass_context
def audit(ctx: click.Context, as_json: bool, limit: int | None, verify: bool) -> None:
    """The append-only audit trail: who did what, when, from which version to which, why."""

    def read(registry):
        _identity().require("read", "the audit trail")
        return registry.audit_records(limit), registry.verify_audit() if verify else None

    records, verdict = _run(ctx, read)
    if as_json:
        click.echo(json.dumps([record.to_json() for record in records], indent=2))
    else:
        for r in records:
            moved = f"{r.from_version or '-'} -> {r.to_version or '-'}"
            click.echo(
                f"{r.id:>5}  {r.recorded_at}  {r.action:<8} {moved:<10} {r.actor}: {r.reason}"
            )
    if verdict is not None:
        if not verdict.intact:
            raise click.ClickException(f"the audit log fails verification: {verdict.problem}")
        click.echo("audit chain and head intact", err=True)


@registry.command()
@click.argument("version_or_alias")
@click.option("--json", "as_json", is_flag=True, help="Print the lineage as JSON.")
@click.pass_context
def lineage(ctx: click.Context, version_or_alias: str, as_json: bool) -> None:
    """What VERSION_OR_ALIAS was built from: training set, features, dbt models, code."""
    result = _run(ctx, lambda r: _identity().require("read") or r.lineage(version_or_alias))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    training_set = result["training_set"]
    for label, value in (
        ("version", f"{result['model']} {result['version']} ({', '.join(result['aliases'])})"),
        ("training set", training_set["path"]),
        ("sha256", f"{training_set['sha256']} (matches file: {training_set['sha256_matches']})"),
        ("feature service", result["feature_service"]),
        ("dbt models", ", ".join(result["dbt_models"])),
        ("code commit", f"{result['code_commit']}{' (dirty)' if result['code_dirty'] else ''}"),
        ("mlflow run", result["mlflow_run_id"]),
    ):
        click.echo(f"{label:<16} {value}")
