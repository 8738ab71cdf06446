"""The registry's access check: a mixin of ``keel.registry.ModelRegistry``.

Every public registry change names its actor. An `Identity` must carry the change's
permission; a refusal is appended to the registry's chained audit log (action ``denied``)
before the error is raised, so attempts are on the record too.

A plain string is not an identity. Where identities are required (the team and production
profiles, `keel.access.identity.IDENTITY_REQUIRED`, or ``RegistryConfig.require_identity``)
it is only a label: the change is checked and recorded as the identity of the process that
makes it (its ``KEEL_API_KEY``, see `keel.access.authenticate`), the label kept beside it;
a process with no identity is refused. Elsewhere (the local profile) the name is recorded as
unverified.
"""

from __future__ import annotations

from typing import Any

from keel.access.identity import (
    AccessDenied,
    AccessError,
    Identity,
    denial,
    identities_required,
)
from keel.registry_types import ApprovalError

DENIED = "denied"


class RegistryAccessDenied(AccessDenied, ApprovalError):
    """A registry change refused for want of a role or of an authenticated identity."""


class AccessSteps:
    """Authorisation of registry changes (mixed into ModelRegistry)."""

    def identities_required(self) -> bool:
        """The registry's setting, else the active profile's default."""
        setting = getattr(self.config, "require_identity", None)
        return identities_required() if setting is None else bool(setting)

    def _authorize(self, actor: Identity | str, permission: str, target: str | None) -> str:
        """The name to record for ``actor`` once it may do ``permission`` on ``target``."""
        acting = self.__dict__.setdefault("_acting", {})
        label = ""
        if not isinstance(actor, Identity):
            label = str(actor or "").strip()
            if not self.identities_required():
                acting[label] = {"name": label, "method": "unverified"}
                return label
            actor = self._process_identity(label, permission, target)
        described = {**actor.describe(), **({"label": label} if label else {})}
        if not actor.allows(permission):
            why = denial(actor, permission, f"version {target}" if target else "")
            self._refuse(actor.name, permission, target, why, described)
        acting[actor.name] = described
        return actor.name

    def _process_identity(self, label: str, permission: str, target: str | None) -> Identity:
        """The identity a change labelled ``label`` acts as: this process's, or a refusal."""
        from keel.access.store import authenticate

        try:
            return authenticate()
        except AccessError as error:
            why = (
                f"{label or 'an unnamed actor'!r} is not an authenticated identity and this "
                f"process has none: {error}"
            )
            self._refuse(label or "-", permission, target, why, {"name": label, "method": "none"})
            raise  # _refuse raises; this line only satisfies the type checker

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
        _log_refusal(name, permission, f"{self.name} {target or ''}".strip(), why, identity)
        raise RegistryAccessDenied(why)

    def _identity_details(self, actor: str) -> dict[str, Any]:
        """What `_authorize` learnt about ``actor``, for its audit record."""
        found = self.__dict__.get("_acting", {}).get(actor)
        return {"identity": found} if found else {}


def _log_refusal(
    name: str, permission: str, target: str, why: str, identity: dict[str, Any]
) -> None:
    """The refusal in the identity file's access log too (``keel access log``), if writable.

    The registry's audit log holds the record that counts; a read-only identity file (a
    service that only checks keys) must not turn a refusal into another error.
    """
    import contextlib
    import sqlite3

    from keel.access.store import KeyStore, default_store_path

    with contextlib.suppress(OSError, sqlite3.Error):
        KeyStore(default_store_path()).log(
            name, permission, target, False, why, str(identity.get("method", "-"))
        )
