"""The registry steps that keel serve and keel.edge use: serving aliases and edge bundles.

A mixin of ``keel.registry.ModelRegistry``: each step runs under the registry's lock and is
written to the audit log before any alias or tag moves, like every other registry action.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from keel.registry_audit import AuditRecord
from keel.registry_types import (
    CHAMPION,
    DEPLOY_ACTIONS,
    ApprovalError,
    RegistryError,
    require_actor,
)


class ReleaseSteps:
    """Serving-alias and bundle steps of the model registry (mixed into ModelRegistry)."""

    # -- edge bundles: ONNX exports that passed their parity check (keel.edge) ---------------------

    def attach_bundle(
        self, version: str, actor: Any, tags: Mapping[str, str], details: Mapping[str, Any]
    ) -> AuditRecord:
        """Record a verified edge bundle on a version: ``keel.bundle.*`` tags and an audit line."""
        actor = self._authorize(actor, "attach_bundle", version)
        require_actor(actor)
        foreign = sorted(key for key in tags if not key.startswith("keel.bundle."))
        if foreign:
            raise RegistryError(f"attach_bundle only sets keel.bundle.* tags, not {foreign}")
        with self._serialised():
            number = self.resolve(version)
            record = self._append(
                "attach_bundle", actor, None, number, "passed its parity check", details
            )
            self._set_tags(number, tags)
        return record

    # -- deployments: the serving aliases that keel.serving follows --------------------------------

    def deployment_state(self) -> tuple[dict[str, str], dict[str, str]]:
        """Every alias of the registered model and its tags (the release settings)."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(self.name)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}, {}
            raise
        return {k: str(v) for k, v in model.aliases.items()}, dict(model.tags)

    def _require_serving_approval(self, number: str) -> None:
        problem = self._approval_problem(number)
        if problem:
            raise ApprovalError(
                f"version {number} of {self.name} is not approved: {problem}. A version answers "
                f"clients only once approved (`keel registry approve {number}`)"
            )

    def deploy(
        self,
        action: str,
        actor: Any,
        reason: str,
        *,
        from_version: str | None = None,
        to_version: str | None = None,
        aliases: Mapping[str, str | None] | None = None,
        tags: Mapping[str, str | None] | None = None,
        expect: Mapping[str, str | None] | None = None,
        approved: tuple[str, ...] = (),
        promote: str | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> AuditRecord | None:
        """Move serving aliases and release tags in one locked step, audited before they move.

        Returns None and changes nothing when an alias in ``expect`` no longer has the expected
        version (another watcher acted first), so evaluating a release twice is harmless. The
        record carries the changes, so a writer dying half-way leaves them for the next one.

        Args:
            action: One of `DEPLOY_ACTIONS`.
            actor: Who acts: an `keel.access.Identity` with the ``deploy`` permission, or free
                text (an API key's owner, a watcher) unless the registry requires identities.
            reason: Why, for the audit trail.
            from_version: The version losing traffic, for the audit trail.
            to_version: The version gaining traffic, for the audit trail.
            aliases: Alias -> version to set, or None to remove.
            tags: Registered-model tag -> value to set, or None to remove.
            expect: Alias -> version (None: absent) that must hold for the step to happen.
            approved: Versions that must be approved first (they will answer clients).
            promote: A version to make the champion in the same step (a switch, a canary pass).
            details: Evidence kept with the audit record.
        """
        actor = self._authorize(actor, "deploy", to_version)
        require_actor(actor)
        if action not in DEPLOY_ACTIONS:
            raise RegistryError(
                f"{action!r} is not a deployment action ({', '.join(DEPLOY_ACTIONS)})"
            )
        with self._serialised():
            current, _ = self.deployment_state()
            if any(current.get(alias) != version for alias, version in (expect or {}).items()):
                return None
            for number in (*approved, *([promote] if promote else [])):
                self._require_serving_approval(number)
            if promote and current.get(CHAMPION) == promote:
                raise ApprovalError(f"version {promote} is already the champion")
            for version in (aliases or {}).values():
                if version is not None:
                    self._version(version)
            changes = {"aliases": dict(aliases or {}), "tags": dict(tags or {}), "promote": promote}
            record = self._append(
                action,
                actor,
                from_version,
                to_version,
                reason,
                {**(details or {}), "changes": changes},
                replay=True,
            )
            self._apply_deployment(record)
            self._log.settle(record.id)
        return record

    def _apply_deployment(self, record: AuditRecord) -> None:
        """Make the changes a deployment record holds; doing it twice changes nothing."""
        changes = record.details.get("changes") or {}
        target = changes.get("promote")
        if target and self.champion() != target:
            self._promote(target, record.actor, record.reason)
        current, current_tags = self.deployment_state()
        for alias, version in (changes.get("aliases") or {}).items():
            if version is not None:
                self.client.set_registered_model_alias(self.name, alias, version)
            elif alias in current:
                self.client.delete_registered_model_alias(self.name, alias)
        for key, value in (changes.get("tags") or {}).items():
            if value is not None:
                self.client.set_registered_model_tag(self.name, key, value)
            elif key in current_tags:
                self.client.delete_registered_model_tag(self.name, key)
