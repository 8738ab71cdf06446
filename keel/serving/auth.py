"""API keys with roles for ``keel serve``: stored hashed, checked per request.

A key is ``keel_<id>_<secret>`` (32 random bytes of secret), shown once when it is created.
The key file (SQLite, ``$KEEL_HOME/serve/api_keys.db``) keeps only its sha256: the secret is
random, so a fast hash is as strong as a slow one and costs microseconds per request. Roles:
``predict`` (score), ``deploy`` (canary, switch, rollback), ``admin`` (everything). A request
without a valid key gets 401; with a key that lacks the role, 403.

Workers remember a checked key for `CACHE_SECONDS`, so a revoked key stops working within
that time without a file read per request.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader

ROLES = ("predict", "deploy", "admin")
HEADER = "X-API-Key"
CACHE_SECONDS = 5.0
_PREFIX = "keel_"

_api_key_header = APIKeyHeader(name=HEADER, auto_error=False, description="A Keel API key.")


class ApiKeyError(ValueError):
    """A key cannot be created or revoked as asked."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's owner (recorded as the actor) and its roles."""

    owner: str
    roles: frozenset[str]

    def allows(self, role: str) -> bool:
        return role in self.roles or "admin" in self.roles


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The key file: create, list, revoke and check keys."""

    def __init__(self, path: str | Path, cache_seconds: float = CACHE_SECONDS) -> None:
        self.path = Path(path)
        self.cache_seconds = cache_seconds
        self._local = threading.local()
        self._checked: dict[str, tuple[float, Principal | None]] = {}

    def _connect(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=30)
            connection.execute(
                "CREATE TABLE IF NOT EXISTS api_keys (key_hash TEXT PRIMARY KEY, key_id TEXT "
                "UNIQUE NOT NULL, owner TEXT NOT NULL, roles TEXT NOT NULL, created_at TEXT "
                "NOT NULL, revoked_at TEXT)"
            )
            connection.commit()
            self._local.connection = connection
        return connection

    def add(self, owner: str, roles: list[str] | tuple[str, ...]) -> str:
        """Create a key for ``owner`` with ``roles``; returns the key (it is not stored)."""
        owner = owner.strip()
        if not owner:
            raise ApiKeyError("a key needs an owner: the person or service that uses it")
        unknown = sorted(set(roles) - set(ROLES))
        if unknown or not roles:
            raise ApiKeyError(f"roles must be among {', '.join(ROLES)}; got {list(roles)}")
        key_id = secrets.token_hex(4)
        key = f"{_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        connection = self._connect()
        with connection:
            connection.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, NULL)",
                (_hash(key), key_id, owner, ",".join(sorted(set(roles))), _now()),
            )
        return key

    def revoke(self, key_id: str) -> None:
        connection = self._connect()
        with connection:
            changed = connection.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (_now(), key_id),
            ).rowcount
        if not changed:
            raise ApiKeyError(f"no active key with id {key_id}")

    def list(self) -> list[dict[str, str | None]]:
        rows = self._connect().execute(
            "SELECT key_id, owner, roles, created_at, revoked_at FROM api_keys ORDER BY created_at"
        )
        names = ("key_id", "owner", "roles", "created_at", "revoked_at")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def check(self, key: str) -> Principal | None:
        """The key's principal, or None for an unknown or revoked key."""
        now = time.monotonic()
        cached = self._checked.get(key)
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1]
        principal = None
        if key.startswith(_PREFIX):
            row = (
                self._connect()
                .execute(
                    "SELECT owner, roles FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL",
                    (_hash(key),),
                )
                .fetchone()
            )
            if row is not None:
                principal = Principal(owner=row[0], roles=frozenset(row[1].split(",")))
        if len(self._checked) > 10_000:  # bounded: random bad keys must not grow memory
            self._checked.clear()
        self._checked[key] = (now, principal)
        return principal


def _now() -> str:
    return datetime.now(UTC).isoformat()


# When the app runs without auth (local experiments), every caller is this principal.
ANONYMOUS = Principal(owner="anonymous", roles=frozenset(ROLES))


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
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"the key of {principal.owner} lacks the {role!r} role",
        )
    return principal
