"""Release routes of ``keel serve`` under ``/v1/admin``: canary, shadow, blue-green, rollback.

Every route needs an API key with the ``deploy`` role; the key's owner is the actor in the
registry's audit trail. A route moves registry aliases (`keel.serving.release`), then makes the
worker that answered pick them up at once; the other workers follow within their poll
interval. A step the workflow refuses (an unapproved version, an empty slot) is a 409 with the
reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from keel.serving.auth import Principal, require_role

router = APIRouter(prefix="/v1/admin", tags=["admin"])
Deployer = Annotated[Principal, Depends(require_role("deploy"))]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="", max_length=2_000, description="Why, for the audit trail.")


class CanaryRequest(_Body):
    """A canary: version, traffic share and optional guardrail limits."""

    version: str = Field(min_length=1, max_length=64, description="Version number or alias.")
    share: float = Field(default=0.1, gt=0.0, lt=1.0, description="Share of entities routed.")
    window_minutes: float | None = Field(default=None, gt=0)
    min_requests: int | None = Field(default=None, ge=1)
    promote_after_requests: int | None = Field(default=None, ge=1)
    promote_after_minutes: float | None = Field(default=None, ge=0)


class ShadowRequest(_Body):
    """The version that scores in the shadow, or null to stop it."""

    version: str | None = Field(
        default=None, max_length=64, description="Version to shadow; null stops the shadow."
    )


class SlotRequest(_Body):
    """The version to load into a blue-green slot."""

    version: str = Field(min_length=1, max_length=64)


class SwitchRequest(_Body):
    """The slot to make live (default: the idle one)."""

    to_slot: str | None = Field(default=None, pattern="^(blue|green)$")


class RollbackRequest(_Body):
    """Why the change is undone (required)."""

    reason: str = Field(min_length=1, max_length=2_000)


def _act(request: Request, action: Callable[[Any], Any]) -> dict[str, Any]:
    """Run ``action(registry)``; refusals become 409 (bad limits 422), then refresh this worker."""
    from keel.registry import ModelRegistry, RegistryError
    from keel.serving.guardrails import GuardrailError
    from keel.serving.release import ReleaseError, release_state

    settings = request.app.state.service.settings
    try:
        with ModelRegistry(settings.registry_config()) as registry:
            result = action(registry)
            state = release_state(registry).to_dict()
    except GuardrailError as error:
        raise HTTPException(422, detail=str(error)) from error
    except (RegistryError, ReleaseError) as error:
        raise HTTPException(409, detail=str(error)) from error
    deployments = request.app.state.deployments
    deployments.refresh()
    snapshot = deployments.current
    record = getattr(result, "record", result)
    return {
        "audit_record": record.to_json() if hasattr(record, "to_json") else None,
        "registry": state,
        "serving": snapshot.versions() if snapshot else {},
        **({"action": result.action} if hasattr(result, "action") else {}),
    }


@router.get("/release")
def release_status(request: Request, principal: Deployer) -> dict[str, Any]:
    """What the registry deploys and what this worker serves."""
    return _act(request, lambda registry: None)


@router.post("/canary")
def start_canary(body: CanaryRequest, request: Request, principal: Deployer) -> dict[str, Any]:
    """Send a sticky share of entities to an approved version, judged by the guardrails."""
    from keel.serving.guardrails import GuardrailPolicy
    from keel.serving.release import start_canary as start

    limits = body.model_dump(exclude={"version", "share", "reason"}, exclude_none=True)
    return _act(
        request,
        lambda registry: start(
            registry,
            body.version,
            principal,
            share=body.share,
            policy=GuardrailPolicy(**limits),
            reason=body.reason,
        ),
    )


@router.delete("/canary")
def stop_canary(body: RollbackRequest, request: Request, principal: Deployer) -> dict[str, Any]:
    """Take the canary off traffic now."""
    from keel.serving.release import stop_canary as stop

    return _act(request, lambda registry: stop(registry, principal, body.reason))


@router.post("/canary/evaluate")
def evaluate_canary(request: Request, principal: Deployer) -> dict[str, Any]:
    """Judge the canary on the prediction log now: roll back, promote or keep it."""
    from keel.serving.release import evaluate_release

    log_dir = request.app.state.service.settings.resolved_log_dir()
    return _act(request, lambda registry: evaluate_release(registry, log_dir, actor=principal))


@router.post("/shadow")
def set_shadow(body: ShadowRequest, request: Request, principal: Deployer) -> dict[str, Any]:
    """Let a version score every request off the response path (null stops it)."""
    from keel.serving.release import set_shadow as shadow

    return _act(request, lambda registry: shadow(registry, body.version, principal, body.reason))


@router.post("/slots/{slot}")
def assign_slot(
    slot: str, body: SlotRequest, request: Request, principal: Deployer
) -> dict[str, Any]:
    """Load an approved version into the idle blue-green slot."""
    from keel.serving.release import assign_slot as assign

    return _act(
        request, lambda registry: assign(registry, slot, body.version, principal, body.reason)
    )


@router.post("/switch")
def switch(body: SwitchRequest, request: Request, principal: Deployer) -> dict[str, Any]:
    """Make the idle slot live in one step; call again to switch back."""
    from keel.serving.release import switch as flip

    return _act(request, lambda registry: flip(registry, principal, body.reason, body.to_slot))


@router.post("/rollback")
def rollback(body: RollbackRequest, request: Request, principal: Deployer) -> dict[str, Any]:
    """Give the champion alias back to the version that held it before."""

    def roll_back(registry: Any) -> Any:
        registry.rollback(principal, body.reason)
        return registry.audit_records(limit=1)[-1]

    return _act(request, roll_back)
