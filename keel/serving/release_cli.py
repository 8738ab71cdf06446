"""``keel release``: canary, shadow and blue-green releases of the models ``keel serve`` runs.

The registry is the one ``keel serve`` follows (KEEL_SERVE_REGISTRY, else the local profile's).
Whoever runs a command acts as their authenticated identity (`keel.access.authenticate`): the
API key in ``KEEL_API_KEY``, else, in the local profile, the OS user. Releasing needs the
``deployer`` role; a refusal is recorded in the audit trail too. Every command writes an audit
record (``keel registry audit``); running workers follow the aliases within their poll
interval.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

reason_option = click.option("--reason", default="", help="Why, for the audit trail.")


def _run(action: Callable[[Any, Any], Any]) -> Any:
    """Run ``action(registry, identity)`` on the serving registry as the caller.

    Refusals (no identity, no role, a workflow rule) become one-line errors.
    """
    from keel.access import AccessError, authenticate
    from keel.registry import ModelRegistry, RegistryError
    from keel.serving.guardrails import GuardrailError
    from keel.serving.release import ReleaseError
    from keel.serving.settings import ServeSettings

    try:
        identity = authenticate()
        with ModelRegistry(ServeSettings.from_env().registry_config()) as registry:
            return action(registry, identity)
    except (AccessError, RegistryError, ReleaseError, GuardrailError) as error:
        raise click.ClickException(str(error)) from error


def _echo_record(record: Any) -> None:
    if record is None:
        click.echo("nothing to do")
        return
    click.echo(
        f"#{record.id} {record.action} by {record.actor}: {record.from_version or '-'} -> "
        f"{record.to_version or '-'} ({record.reason})"
    )


@click.group("release")
def release() -> None:
    """Canary, shadow and blue-green releases of the served models."""


@release.command("status")
def status() -> None:
    """What the registry deploys: champion, canary (share, policy), shadow, slots."""
    from keel.serving.release import release_state

    def read(registry: Any, identity: Any) -> Any:
        identity.require("read", "the release state")
        return release_state(registry)

    state = _run(read)
    click.echo(json.dumps(state.to_dict(), indent=2))


@release.command("canary")
@click.argument("version")
@click.option("--share", type=float, default=0.1, show_default=True, help="Share of entities.")
@click.option("--window-minutes", type=float, default=None, help="Sliding window judged.")
@click.option("--min-requests", type=int, default=None, help="Rows per arm before judging.")
@click.option("--promote-after-requests", type=int, default=None)
@click.option("--promote-after-minutes", type=float, default=None)
@click.option("--auto-approve", is_flag=True, help="Approve a gated version by policy first.")
@reason_option
def canary(
    version: str,
    share: float,
    window_minutes: float | None,
    min_requests: int | None,
    promote_after_requests: int | None,
    promote_after_minutes: float | None,
    auto_approve: bool,
    reason: str,
) -> None:
    """Send a sticky share of entities to VERSION; the guardrails promote or roll it back."""
    from keel.serving.guardrails import GuardrailPolicy
    from keel.serving.release import start_canary

    limits = {
        "window_minutes": window_minutes,
        "min_requests": min_requests,
        "promote_after_requests": promote_after_requests,
        "promote_after_minutes": promote_after_minutes,
    }

    def start(registry: Any, actor: Any) -> Any:
        policy = GuardrailPolicy(**{k: v for k, v in limits.items() if v is not None})
        return start_canary(
            registry, version, actor, share, policy, auto_approve=auto_approve, reason=reason
        )

    _echo_record(_run(start))


@release.command("canary-stop")
@click.option("--reason", required=True, help="Why the canary stops.")
def canary_stop(reason: str) -> None:
    """Take the running canary off traffic now."""
    from keel.serving.release import stop_canary

    _echo_record(_run(lambda registry, actor: stop_canary(registry, actor, reason)))


@release.command("evaluate")
def evaluate() -> None:
    """Judge the running canary on the prediction log now: roll back, promote or keep it."""
    from keel.serving.release import evaluate_release
    from keel.serving.settings import ServeSettings

    log_dir = ServeSettings.from_env().resolved_log_dir()
    outcome = _run(lambda registry, actor: evaluate_release(registry, log_dir, actor=actor))
    click.echo(f"{outcome.action}: {outcome.verdict.summary() if outcome.verdict else ''}")
    if outcome.record is not None:
        _echo_record(outcome.record)


@release.command("shadow")
@click.argument("version", required=False)
@click.option("--stop", is_flag=True, help="Stop the shadow.")
@reason_option
def shadow(version: str | None, stop: bool, reason: str) -> None:
    """Let VERSION score every request off the response path (or --stop)."""
    from keel.serving.release import set_shadow

    if bool(version) == stop:
        raise click.UsageError("give a VERSION or --stop")
    _echo_record(_run(lambda registry, actor: set_shadow(registry, version, actor, reason)))


@release.command("slot")
@click.argument("slot", type=click.Choice(["blue", "green"]))
@click.argument("version")
@reason_option
def slot(slot: str, version: str, reason: str) -> None:
    """Load VERSION into the idle blue-green SLOT (every worker warms it)."""
    from keel.serving.release import assign_slot

    _echo_record(_run(lambda registry, actor: assign_slot(registry, slot, version, actor, reason)))


@release.command("switch")
@click.option("--to", "to_slot", type=click.Choice(["blue", "green"]), default=None)
@reason_option
def switch(to_slot: str | None, reason: str) -> None:
    """Make the idle slot live in one step; run it again to switch back."""
    from keel.serving.release import switch as flip

    _echo_record(_run(lambda registry, actor: flip(registry, actor, reason, to_slot)))
