"""Dagster jobs under the identity model: who launches a run, and may they.

Dagster's open-source UI has no login, so a run acts as the identity of the Dagster process
that launches it (its ``KEEL_API_KEY``, else its OS user in the local profile); the run
launcher checks that identity's role for the job and tags the run with it. People reach the
UI through an authenticating proxy (see the README).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keel.access.identity import Identity

LAUNCHED_BY_TAG = "keel/launched_by"
# Jobs whose runs need more than the ``run`` permission.
JOB_PERMISSIONS = {"retrain": "train", "release": "deploy"}
REGISTRY_JOB = "registry_action"
_REGISTRY_ACTIONS = {"approve", "reject", "promote", "rollback"}


def required_permission(job_name: str, run_config: Mapping[str, Any] | None) -> str:
    """The permission a run of ``job_name`` with ``run_config`` needs."""
    if job_name == REGISTRY_JOB:
        ops = (run_config or {}).get("ops") or {}
        config = next(iter(ops.values()), {}).get("config") or {}
        action = str(config.get("action", ""))
        return action if action in _REGISTRY_ACTIONS else "deploy"
    return JOB_PERMISSIONS.get(job_name, "run")


def authorize_run(
    job_name: str, run_config: Mapping[str, Any] | None, identity: Identity
) -> dict[str, str]:
    """The tags recording who launched the run; AccessDenied when the identity may not."""
    identity.require(required_permission(job_name, run_config), f"job {job_name}")
    return {LAUNCHED_BY_TAG: identity.name, f"{LAUNCHED_BY_TAG}_method": identity.method}
