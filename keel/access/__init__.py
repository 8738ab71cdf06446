"""One identity model for the CLI, the registry, Dagster jobs and serving (see `identity`)."""

from keel.access.identity import (
    ALL_ROLES,
    PERMISSIONS,
    ROLES,
    AccessDenied,
    AccessError,
    AuthenticationError,
    Identity,
    identities_required,
)
from keel.access.store import (
    ApiKeyError,
    KeyStore,
    acting_name,
    authenticate,
    default_store_path,
    os_user,
)

__all__ = [
    "ALL_ROLES",
    "PERMISSIONS",
    "ROLES",
    "AccessDenied",
    "AccessError",
    "ApiKeyError",
    "AuthenticationError",
    "Identity",
    "KeyStore",
    "acting_name",
    "authenticate",
    "default_store_path",
    "identities_required",
    "os_user",
]
