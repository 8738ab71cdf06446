"""Registry assets: the evaluated challenger registered in MLflow, and the registry actions job.

The maths lives in ``keel.registry``. ``registered_model`` re-reads the gate results of the
evaluation it registers, because blocking checks only stop steps of the same run: a separate
run (a sensor, a manual launch) must not register a candidate that failed its gates. The
summary file is trusted only if its sha256 is the one the evaluation recorded in Dagster.

Registry steps act as the identity of the process that runs them (``KEEL_API_KEY``, else the
OS user in the local profile; `keel.access`), never as a name typed into run config: its roles
decide, and four-eyes compares it with the version's trainer.
"""

import hashlib
import json
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from assets.evaluation import EVALUATION_KEY, materialisation_metadata
from orchestration.resources import MlflowResource, ModelGovernance

if TYPE_CHECKING:
    from keel.access import Identity
    from keel.registry import AuditRecord, ModelRegistry

GROUP = "registry"
REGISTERED_MODEL_KEY = dg.AssetKey("registered_model")
AUDIT_ROWS_SHOWN = 25


class RegistrationConfig(dg.Config):
    """Why the version is registered (who registers is the step's identity)."""

    reason: str = Field(default="", description="Why, for the audit trail.")


def step_identity() -> "Identity":
    """The identity a registry step acts as: its process's (the one the run launcher checked)."""
    from keel.access import AccessError, authenticate

    try:
        return authenticate()
    except AccessError as error:
        raise dg.Failure(f"no identity to act as: {error}") from error


def audit_table(records: list["AuditRecord"]) -> dg.TableMetadataValue:
    """The latest audit records as a Dagster table (newest first)."""
    columns = ("id", "recorded_at", "action", "actor", "from_version", "to_version", "reason")
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord({name: getattr(record, name) or "" for name in columns})
            for record in reversed(records)
        ],
        schema=dg.TableSchema(
            columns=[dg.TableColumn(name, "int" if name == "id" else "string") for name in columns]
        ),
    )


def registry_state(registry: "ModelRegistry") -> dict[str, Any]:
    """Champion, challenger and the audit trail, as metadata."""
    return {
        "champion_version": dg.MetadataValue.text(registry.champion() or "none"),
        "challenger_version": dg.MetadataValue.text(registry.challenger() or "none"),
        "audit_trail": audit_table(registry.audit_records(limit=AUDIT_ROWS_SHOWN)),
    }


def read_evaluation(path: str, expected_sha256: str) -> dict[str, Any]:
    """The evaluation summary at ``path``, refused unless it has the bytes the evaluation wrote."""
    from upath import UPath

    target = UPath(path)
    if not expected_sha256:
        raise dg.Failure(
            f"the evaluation that wrote {path} recorded no sha256 of it, so it cannot be "
            "trusted: materialise challenger_evaluation again"
        )
    if not target.exists():
        raise dg.Failure(f"the evaluation summary {path} is gone: materialise the evaluation again")
    content = target.read_bytes()
    if hashlib.sha256(content).hexdigest() != expected_sha256:
        raise dg.Failure(
            f"the evaluation summary {path} is not the file its evaluation wrote (sha256 "
            f"{expected_sha256[:12]}...): it was changed or cut short; not registered. "
            "Materialise challenger_evaluation again"
        )
    return json.loads(content)


@dg.asset(deps=[EVALUATION_KEY], group_name=GROUP, kinds={"mlflow"})
def registered_model(
    context: dg.AssetExecutionContext,
    config: RegistrationConfig,
    mlflow: MlflowResource,
    governance: ModelGovernance,
) -> dg.MaterializeResult:
    """The evaluated challenger as an MLflow model version with lineage, gates and approval."""
    from keel.evaluation import flat_metrics
    from keel.serving.guardrails import TAG_SCORE_HISTOGRAM

    metadata = materialisation_metadata(context, EVALUATION_KEY)
    if metadata is None:
        raise dg.Failure("challenger_evaluation has never been materialised")
    evaluation = read_evaluation(
        str(metadata["evaluation_path"]), str(metadata.get("evaluation_sha256") or "")
    )
    gates = {gate["name"]: bool(gate["passed"]) for gate in evaluation["gates"]}
    failed = [name for name, passed in gates.items() if not passed]
    if failed:
        raise dg.Failure(
            f"the evaluated challenger failed the gates {', '.join(failed)}; not registered",
            metadata={"evaluation": dg.MetadataValue.path(str(metadata["evaluation_path"]))},
        )
    challenger = evaluation["challenger"]
    histogram = challenger.get("score_histogram")
    # The canary guardrail compares live scores with these held-out ones.
    extra_tags = {TAG_SCORE_HISTOGRAM: json.dumps(histogram)} if histogram else None
    from keel.access import AccessError

    identity = step_identity()
    mlflow.configure()
    with governance.registry(mlflow) as registry:
        try:
            info = registry.register(
                challenger["details"]["run_id"],
                flat_metrics(evaluation),
                gates,
                actor=identity,
                auto_approve=governance.auto_approve,
                model_uri=challenger["uri"],
                evaluation_report=str(metadata.get("report", "")),
                reason=config.reason,
                promote=governance.release == "direct",
                extra_tags=extra_tags,
            )
        except AccessError as error:
            raise dg.Failure(str(error)) from error
        state = registry_state(registry)
    context.log.info(
        f"version {info.version} ({'new' if info.created else 'already registered'}): "
        f"{info.approval_status}, stage {info.stage}"
    )
    return dg.MaterializeResult(
        metadata={
            "version": dg.MetadataValue.int(int(info.version)),
            "newly_registered": dg.MetadataValue.bool(info.created),
            "stage": dg.MetadataValue.text(info.stage),
            "approval_status": dg.MetadataValue.text(info.approval_status),
            "aliases": dg.MetadataValue.text(", ".join(info.aliases) or "none"),
            "model_uri": dg.MetadataValue.text(f"models:/{registry.name}/{info.version}"),
            "dataset_version": dg.MetadataValue.text(info.dataset_version),
            "model_family": dg.MetadataValue.text(info.model_family),
            "auto_approve": dg.MetadataValue.bool(governance.auto_approve),
            "release": dg.MetadataValue.text(governance.release),
            **state,
        }
    )


class RegistryAction(StrEnum):
    """What the ``registry_action`` job does."""

    approve = "approve"
    reject = "reject"
    promote = "promote"
    rollback = "rollback"
    # Releases of keel serve (keel.serving.release): blue-green switch, canary stop.
    switch = "switch"
    canary_stop = "canary_stop"


class RegistryActionConfig(dg.Config):
    """One approval-workflow step, as ``keel registry ...`` takes it."""

    action: RegistryAction = Field(
        description="approve, reject, promote, rollback, switch or canary_stop."
    )
    version: str = Field(
        default="",
        description="Version number or alias; for switch the slot (blue/green, default the idle).",
    )
    reason: str = Field(default="", description="Why; required for reject and rollback.")


@dg.op(tags={"kind": "mlflow"})
def apply_registry_action(
    context: dg.OpExecutionContext,
    config: RegistryActionConfig,
    mlflow: MlflowResource,
    governance: ModelGovernance,
) -> None:
    """Approve, reject, promote or roll back a model version, and record it in the audit trail."""
    from keel.registry import RegistryError

    needs_no_version = (RegistryAction.rollback, RegistryAction.switch, RegistryAction.canary_stop)
    if config.action not in needs_no_version and not config.version:
        raise dg.Failure(f"{config.action.value} needs a version (a number or an alias)")
    identity = step_identity()
    mlflow.configure()
    try:
        with governance.registry(mlflow) as registry:
            if config.action == RegistryAction.rollback:
                info = registry.rollback(identity, config.reason)
            elif config.action in (RegistryAction.switch, RegistryAction.canary_stop):
                info = _release_action(registry, config, identity)
            else:
                act = getattr(registry, config.action.value)
                info = act(config.version, identity, config.reason)
            record = registry.audit_records(limit=1)[-1]
            state = registry_state(registry)
    except RegistryError as error:
        raise dg.Failure(str(error)) from error
    context.log.info(
        f"{record.action} by {record.actor}: {record.from_version or '-'} -> "
        f"{record.to_version or '-'} ({record.reason})"
    )
    # An observation puts the action on the registered_model page next to its materialisations.
    context.log_event(
        dg.AssetObservation(
            asset_key=REGISTERED_MODEL_KEY,
            metadata={
                "action": dg.MetadataValue.text(record.action),
                "actor": dg.MetadataValue.text(record.actor),
                "from_version": dg.MetadataValue.text(record.from_version or "none"),
                "to_version": dg.MetadataValue.text(record.to_version or "none"),
                "reason": dg.MetadataValue.text(record.reason),
                "stage": dg.MetadataValue.text(info.stage),
                "approval_status": dg.MetadataValue.text(info.approval_status),
                **state,
            },
        )
    )


def _release_action(registry: "ModelRegistry", config: RegistryActionConfig, identity: "Identity"):
    """A blue-green switch or a canary stop; returns the champion's VersionInfo."""
    from keel.serving.release import ReleaseError, stop_canary, switch

    try:
        if config.action == RegistryAction.switch:
            switch(registry, identity, config.reason, to_slot=config.version or None)
        elif stop_canary(registry, identity, config.reason or "stopped by hand") is None:
            raise dg.Failure("no canary is running")
    except ReleaseError as error:
        raise dg.Failure(str(error)) from error
    return registry.info("champion")


@dg.job(tags={"keel/stage": "registry"})
def registry_action() -> None:
    """Approve, reject, promote or roll back a model version (config: action, version, reason)."""
    apply_registry_action()


REGISTRY_ASSETS = [registered_model]
REGISTRY_JOBS = [registry_action]
