"""Who may do what: identities, roles and the permission table that everything checks.

The CLI, the registry, Dagster jobs and serving share it. An identity is authenticated, never
typed in: an API key (stored hashed, see `keel.access.store`) or, in the local profile, the
operating-system user of the process (its real uid, not ``$USER``, which anyone can set).
Roles:

- ``viewer``: read the registry, audit trail and costs; score;
- ``trainer``: train and register candidates;
- ``approver``: approve or reject registered versions (never one they trained);
- ``deployer``: promote, roll back and release (canary, shadow, switch, edge bundles);
- ``admin``: everything, including managing keys and grants.

Serving's client keys keep their two narrow roles: ``predict`` (score only) and ``deploy``
(release steps only, no scoring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("viewer", "trainer", "approver", "deployer", "admin")
SERVICE_ROLES = ("predict", "deploy")
ALL_ROLES = ROLES + SERVICE_ROLES

_READERS = frozenset({"viewer", "trainer", "approver", "deployer", "predict", "deploy"})
# Permission -> the roles that carry it; ``admin`` carries every permission.
PERMISSIONS: dict[str, frozenset[str]] = {
    "read": _READERS,
    # Launch a Dagster job that changes data (ingestion, dbt, features, scoring, monitoring).
    "run": frozenset({"trainer", "deployer"}),
    "predict": frozenset({"viewer", "trainer", "approver", "deployer", "predict"}),
    "train": frozenset({"trainer"}),
    "register": frozenset({"trainer"}),
    "approve": frozenset({"approver"}),
    "reject": frozenset({"approver"}),
    "promote": frozenset({"deployer"}),
    # Serving's release key rolls back too (``keel serve``'s /v1/admin/rollback).
    "rollback": frozenset({"deployer", "deploy"}),
    "deploy": frozenset({"deployer", "deploy"}),
    "attach_bundle": frozenset({"deployer"}),
    "admin": frozenset(),
}


# Whether a profile's registry takes only authenticated identities: the one default that
# `keel.registry.RegistryConfig` and the trainer tag follow. The local profile is one person's
# machine and records a name given as text as unverified.
IDENTITY_REQUIRED = {"local": False, "team": True, "production": True}


def identities_required(profile: str | None = None) -> bool:
    """Whether ``profile`` (default: the active one) acts only as authenticated identities."""
    from keel.settings import active_profile

    return IDENTITY_REQUIRED[profile or active_profile()]


class AccessError(RuntimeError):
    """Base of the access errors."""


class AuthenticationError(AccessError):
    """No identity could be established (no key, a wrong or revoked key, no OS user)."""


class AccessDenied(AccessError):
    """An authenticated identity lacks the role an action needs."""


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: its name (recorded as the actor), roles and how it proved it.

    ``method`` is ``os_user`` or ``api_key:<key id>``.
    """

    name: str
    roles: frozenset[str]
    method: str

    @property
    def owner(self) -> str:
        """The name, under the word serving's API keys have always used."""
        return self.name

    def allows(self, permission: str) -> bool:
        if permission not in PERMISSIONS:
            raise ValueError(f"unknown permission {permission!r}; known: {sorted(PERMISSIONS)}")
        return "admin" in self.roles or bool(self.roles & PERMISSIONS[permission])

    def require(self, permission: str, target: str = "") -> None:
        """Raise AccessDenied unless the identity may do ``permission``."""
        if not self.allows(permission):
            raise AccessDenied(denial(self, permission, target))

    def describe(self) -> dict[str, Any]:
        """What the audit trail keeps about the identity."""
        return {"name": self.name, "roles": sorted(self.roles), "method": self.method}


def denial(identity: Identity, permission: str, target: str = "") -> str:
    """The message of a refusal: who, which roles, what was asked, which roles would do."""
    needed = sorted(PERMISSIONS.get(permission, frozenset()) | {"admin"})
    on = f" on {target}" if target else ""
    roles = ", ".join(sorted(identity.roles)) or "none"
    return (
        f"{identity.name} (roles: {roles}) may not {permission}{on}: that needs one of the "
        f"roles {', '.join(needed)}"
    )


def check_roles(roles: list[str] | tuple[str, ...] | frozenset[str]) -> frozenset[str]:
    """The roles as a set, or ValueError naming the unknown ones."""
    unknown = sorted(set(roles) - set(ALL_ROLES))
    if unknown or not roles:
        raise ValueError(f"roles must be among {', '.join(ALL_ROLES)}; got {sorted(roles)}")
    return frozenset(roles)
