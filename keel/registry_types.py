"""The registry's names, errors and settings, shared by keel.registry and its release steps."""

from __future__ import annotations

from dataclasses import dataclass, field

from keel.settings import KeelPaths
from keel.training import REGISTERED_MODEL_NAME

# Where training logs the pyfunc model inside its run (keel.tracking.MODEL_ARTIFACT).
MODEL_ARTIFACT_PATH = "model"

CHALLENGER = "challenger"
CHAMPION = "champion"
STAGING, PRODUCTION, ARCHIVED = "Staging", "Production", "Archived"
PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"
AUTO_APPROVER = "policy:auto-approve"
ACTIONS = ("register", "approve", "reject", "promote", "rollback")
# Releases of keel serve (keel.serving.release): canary, shadow and blue-green slots.
DEPLOY_ACTIONS = (
    "canary_start",
    "canary_stop",
    "canary_rollback",
    "canary_pass",
    "shadow_set",
    "shadow_clear",
    "slot_set",
    "switch",
)


class RegistryError(RuntimeError):
    """A registry action that cannot be carried out as asked."""


class ApprovalError(RegistryError):
    """An approval, promotion or rejection that the workflow forbids."""


@dataclass(frozen=True)
class RegistryConfig:
    """Where the registry and its audit log live.

    Attributes:
        tracking_uri: MLflow tracking store (runs and their lineage tags).
        registry_uri: MLflow model registry store.
        lock_file: File lock that serialises registry writes; empty means next to the SQLite
            audit database, or none for Postgres (which takes an advisory lock instead).
        audit_uri: SQLAlchemy URL of the audit database; empty means the registry's own
            database (must then be ``sqlite:`` or ``postgresql:``).
        model_name: The registered model.
        lock_timeout_s: How long a writer waits for the lock before giving up with an error.
        audit_key: The secret that chains the audit log (shared profiles: an env var).
        audit_key_file: A file holding it, created with mode 0600 on first use; empty means
            ``registry-audit.key`` next to a SQLite audit database. A Postgres audit log
            needs one of the two.
        require_identity: Take no free-text actor: every change acts as an authenticated
            `keel.access.Identity` carrying its role (a name given as text becomes the
            process's identity). None follows the profile (on in team and production,
            `keel.access.identity.IDENTITY_REQUIRED`).
    """

    tracking_uri: str
    registry_uri: str
    lock_file: str = ""
    audit_uri: str = ""
    model_name: str = REGISTERED_MODEL_NAME
    lock_timeout_s: float = 300.0
    audit_key: str = field(default="", repr=False)
    audit_key_file: str = ""
    require_identity: bool | None = None

    @classmethod
    def local(cls, paths: KeelPaths | None = None) -> RegistryConfig:
        """The embedded profile's layout: MLflow on SQLite inside the data folder."""
        paths = paths or KeelPaths.current()
        database = f"sqlite:///{paths.mlflow / 'mlflow.db'}"
        return cls(
            tracking_uri=database,
            registry_uri=database,
            lock_file=str(paths.mlflow / "registry.lock"),
        )

    def resolved_audit_uri(self) -> str:
        uri = self.audit_uri or self.registry_uri
        if not uri.startswith(("sqlite:", "postgresql")):
            raise RegistryError(
                f"the registry at {self.registry_uri!r} is not a SQL database, so the audit log "
                "needs its own: set audit_uri to a sqlite:/// or postgresql:// URL"
            )
        return uri


@dataclass(frozen=True)
class VersionInfo:
    """A registered version as the workflow sees it."""

    version: str
    stage: str
    approval_status: str
    aliases: tuple[str, ...]
    trained_by: str
    dataset_version: str
    model_family: str
    created: bool = False


def require_actor(actor: str) -> None:
    """Refuse an action that names no actor."""
    if not actor or not actor.strip():
        raise ApprovalError("every registry action needs an actor (who is doing this)")
