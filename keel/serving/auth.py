"""API keys with roles for ``keel serve``: the identity model of `keel.access`, per request.

Keys live hashed in the identity file that the CLI and the registry read as well
(`keel.access.store`). Serving checks three permissions: ``predict`` (score), ``deploy``
(canary, switch, rollback) and ``admin`` (everything); `keel.access.identity` says which
roles carry them. A request without a valid key gets 401; with a key that lacks the role,
403, and the refusal is written to the identity file's access log.

Workers remember a checked key for ``CACHE_SECONDS``, so a revoked key stops working within
that time without a file read per request.
"""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader

from keel.access.identity import Identity as Principal
from keel.access.store import CACHE_SECONDS, ApiKeyError, KeyStore

__all__ = ["CACHE_SECONDS", "ApiKeyError", "KeyStore", "Principal", "authorize", "require_role"]

ROLES = ("predict", "deploy", "admin")
HEADER = "X-API-Key"

_api_key_header = APIKeyHeader(name=HEADER, auto_error=False, description="A Keel API key.")


# When the app runs without auth (local experiments), every caller is this principal.
ANONYMOUS = Principal("anonymous", frozenset({"admin"}), "none")


def require_role(role: str):
    """A FastAPI dependency: the caller's `Principal` if its key carries ``role``; else 401/403."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {ROLES}")

    # async: a plain function would run in the thread pool, a thread hop on every request.
    async def dependency(request: Request, key: str | None = Depends(_api_key_header)) -> Principal:
        return authorize(request, role, key)

    return dependency


def authorize(request: Request, role: str, key: str | None) -> Principal:
    """The caller's `Principal` for ``key`` if it carries ``role``; else HTTP 401 or 403."""
    keys: KeyStore | None = request.app.state.keys
    if keys is None:
        return ANONYMOUS
    principal = keys.check(key) if key else None
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=f"a valid API key is required in the {HEADER} header",
            headers={"WWW-Authenticate": HEADER},
        )
    if not principal.allows(role):
        keys.log_refusal(principal, role, request.url.path, "the key lacks the role")
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"the key of {principal.owner} lacks the {role!r} role",
        )
    return principal
