"""The registry's access check: a mixin of ``keel.registry.ModelRegistry``.

Every public registry change names its actor. An `Identity` must carry the change's
permission; a refusal is appended to the registry's chained audit log (action ``denied``)
before the error is raised, so attempts are on the record too. A plain string is free text:
refused when the registry requires identities, else recorded as unverified.
"""

from __future__ import annotations

from typing import Any

from keel.access.identity import AccessDenied, Identity, denial
from keel.registry_types import ApprovalError

DENIED = "denied"


class RegistryAccessDenied(AccessDenied, ApprovalError):
    """A registry change refused for want of a role or of an authenticated identity."""


class AccessSteps:
    """Authorisation of registry changes (mixed into ModelRegistry)."""

    def _authorize(self, actor: Identity | str, permission: str, target: str | None) -> str:
        """The name to record for ``actor`` once it may do ``permission`` on ``target``."""
        acting = self.__dict__.setdefault("_acting", {})
        if isinstance(actor, Identity):
            if not actor.allows(permission):
                why = denial(actor, permission, f"version {target}" if target else "")
                self._refuse(actor.name, permission, target, why, actor.describe())
            acting[actor.name] = actor.describe()
            return actor.name
        name = str(actor or "").strip()
        if getattr(self.config, "require_identity", False):
            why = (
                f"{name or 'an unnamed actor'!r} is not an authenticated identity: act with an "
                "API key (KEEL_API_KEY) or as your OS user in the local profile"
            )
            self._refuse(name or "-", permission, target, why, {"name": name, "method": "none"})
        acting[name] = {"name": name, "method": "unverified"}
        return name

    def _refuse(
        self, name: str, permission: str, target: str | None, why: str, identity: dict[str, Any]
    ) -> None:
        from mlflow.exceptions import MlflowException

        details = {"permission": permission, "identity": identity}
        with self._serialised():
            try:  # the registered model keeps the audit head, even before a first version
                self.client.create_registered_model(self.name)
            except MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            version = str(target) if target and str(target).isdigit() else None
            self._append(DENIED, name, None, version, why, details)
        raise RegistryAccessDenied(why)

    def _identity_details(self, actor: str) -> dict[str, Any]:
        """What `_authorize` learnt about ``actor``, for its audit record."""
        found = self.__dict__.get("_acting", {}).get(actor)
        return {"identity": found} if found else {}
