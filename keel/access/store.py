"""The identity file: API keys (stored hashed), role grants of OS users, and an access log.

A key is ``keel_<id>_<secret>`` (32 random bytes of secret), shown once when it is created;
the file (SQLite) keeps only its sha256: the secret is random, so a fast hash is as strong as
a slow one and costs microseconds per check. Checked keys are remembered for
``cache_seconds``, so a revoked key stops working within that time without a file read per
request.

In the local profile a process without a key acts as its operating-system user. Until the
first grant, that user holds every role (the local profile is one person's machine); after
it, an OS user has the roles granted to it, and none otherwise.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from keel.access.identity import (
    AuthenticationError,
    Identity,
    check_roles,
)

CACHE_SECONDS = 5.0
KEY_ENV = "KEEL_API_KEY"
STORE_ENV = "KEEL_ACCESS_FILE"
_PREFIX = "keel_"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS api_keys (key_hash TEXT PRIMARY KEY, key_id TEXT UNIQUE NOT "
    "NULL, owner TEXT NOT NULL, roles TEXT NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT)",
    "CREATE TABLE IF NOT EXISTS os_user_grants (user TEXT PRIMARY KEY, roles TEXT NOT NULL, "
    "granted_by TEXT NOT NULL, granted_at TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS access_log (id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT "
    "NULL, actor TEXT NOT NULL, method TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT "
    "NULL, allowed INTEGER NOT NULL, detail TEXT NOT NULL)",
)


class ApiKeyError(ValueError):
    """A key or grant cannot be created or revoked as asked."""


def default_store_path() -> Path:
    """``KEEL_ACCESS_FILE``, else ``$KEEL_HOME/serve/api_keys.db`` (the file keel serve reads)."""
    from keel.settings import KeelPaths

    raw = os.environ.get(STORE_ENV, "").strip()
    return Path(raw) if raw else KeelPaths.current().home / "serve" / "api_keys.db"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat()


def os_user() -> str:
    """The process's real user, from its uid (``$USER`` can say anything)."""
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


class KeyStore:
    """The identity file: create, list, revoke and check keys; grant roles to OS users."""

    def __init__(self, path: str | Path, cache_seconds: float = CACHE_SECONDS) -> None:
        self.path = Path(path)
        self.cache_seconds = cache_seconds
        self._local = threading.local()
        self._checked: dict[str, tuple[float, Identity | None]] = {}

    def _connect(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = sqlite3.connect(self.path, timeout=30)
            for statement in _SCHEMA:
                connection.execute(statement)
            connection.commit()
            self._local.connection = connection
        return connection

    # -- keys --------------------------------------------------------------------------------

    def add(self, owner: str, roles: list[str] | tuple[str, ...], by: str = "") -> str:
        """Create a key for ``owner`` with ``roles``; returns the key (it is not stored)."""
        owner = owner.strip()
        if not owner:
            raise ApiKeyError("a key needs an owner: the person or service that uses it")
        try:
            role_set = check_roles(roles)
        except ValueError as error:
            raise ApiKeyError(str(error)) from error
        key_id = secrets.token_hex(4)
        key = f"{_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        connection = self._connect()
        with connection:
            connection.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, NULL)",
                (_hash(key), key_id, owner, ",".join(sorted(role_set)), _now()),
            )
        self.log(by or "unknown", "add_key", key_id, True, f"{owner}: {','.join(sorted(role_set))}")
        return key

    def revoke(self, key_id: str, by: str = "") -> None:
        connection = self._connect()
        with connection:
            changed = connection.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (_now(), key_id),
            ).rowcount
        if not changed:
            raise ApiKeyError(f"no active key with id {key_id}")
        self.log(by or "unknown", "revoke_key", key_id, True, "")

    def list(self) -> list[dict[str, str | None]]:
        rows = self._connect().execute(
            "SELECT key_id, owner, roles, created_at, revoked_at FROM api_keys ORDER BY created_at"
        )
        names = ("key_id", "owner", "roles", "created_at", "revoked_at")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def check(self, key: str) -> Identity | None:
        """The key's identity, or None for an unknown or revoked key."""
        now = time.monotonic()
        cached = self._checked.get(key)
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1]
        identity = None
        if key.startswith(_PREFIX):
            row = (
                self._connect()
                .execute(
                    "SELECT owner, roles, key_id FROM api_keys "
                    "WHERE key_hash = ? AND revoked_at IS NULL",
                    (_hash(key),),
                )
                .fetchone()
            )
            if row is not None:
                identity = Identity(row[0], frozenset(row[1].split(",")), f"api_key:{row[2]}")
        if len(self._checked) > 10_000:  # bounded: random bad keys must not grow memory
            self._checked.clear()
        self._checked[key] = (now, identity)
        return identity

    # -- OS users (local profile) -------------------------------------------------------------

    def grant(self, user: str, roles: list[str] | tuple[str, ...], by: str) -> None:
        """Give the OS user ``user`` exactly ``roles`` (replacing earlier ones)."""
        try:
            role_set = check_roles(roles)
        except ValueError as error:
            raise ApiKeyError(str(error)) from error
        connection = self._connect()
        with connection:
            connection.execute(
                "INSERT OR REPLACE INTO os_user_grants VALUES (?, ?, ?, ?)",
                (user, ",".join(sorted(role_set)), by, _now()),
            )
        self.log(by, "grant", user, True, ",".join(sorted(role_set)))

    def has_grants(self) -> bool:
        row = self._connect().execute("SELECT 1 FROM os_user_grants LIMIT 1").fetchone()
        return row is not None

    def os_user_identity(self, user: str | None = None) -> Identity:
        """The identity of OS user ``user`` (default: this process's user)."""
        user = user or os_user()
        if not self.has_grants():
            return Identity(user, frozenset({"admin"}), "os_user")
        row = (
            self._connect()
            .execute("SELECT roles FROM os_user_grants WHERE user = ?", (user,))
            .fetchone()
        )
        return Identity(user, frozenset(row[0].split(",")) if row else frozenset(), "os_user")

    # -- the access log -----------------------------------------------------------------------

    def log(
        self,
        actor: str,
        action: str,
        target: str,
        allowed: bool,
        detail: str = "",
        method: str = "-",
    ) -> None:
        """Append one line: key and grant changes, and every refusal."""
        connection = self._connect()
        with connection:
            connection.execute(
                "INSERT INTO access_log (at, actor, method, action, target, allowed, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (_now(), actor, method, action, target, int(allowed), detail),
            )

    def log_refusal(self, identity: Identity, permission: str, target: str, why: str) -> None:
        self.log(identity.name, permission, target, False, why, identity.method)

    def access_log(self, limit: int = 100) -> list[dict[str, object]]:
        rows = self._connect().execute(
            "SELECT id, at, actor, method, action, target, allowed, detail FROM access_log "
            "ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        names = ("id", "at", "actor", "method", "action", "target", "allowed", "detail")
        return [dict(zip(names, row, strict=True)) for row in reversed(rows.fetchall())]


def authenticate(store: KeyStore | None = None, key: str | None = None) -> Identity:
    """This process's identity: an API key, else (local profile only) the OS user.

    The key is the argument or ``KEEL_API_KEY``; the production profile needs one.
    """
    from keel.settings import active_profile

    store = store or KeyStore(default_store_path())
    key = key if key is not None else os.environ.get(KEY_ENV, "").strip()
    if key:
        identity = store.check(key)
        if identity is None:
            raise AuthenticationError(f"{KEY_ENV} is not a valid key (unknown or revoked)")
        return identity
    if active_profile() != "local":
        raise AuthenticationError(
            f"the {active_profile()} profile acts only with an API key: set {KEY_ENV} "
            "(create one with `keel access keys add`)"
        )
    return store.os_user_identity()


def acting_name(claimed: str = "", store: KeyStore | None = None) -> str:
    """The name a step records as its actor (a trainer, a publisher): its identity's.

    Where identities are required (`keel.access.identity.identities_required`) a ``claimed``
    name other than the authenticated identity's is refused: nobody trains or publishes in
    someone else's name, so four-eyes holds. In the local profile a claimed name is kept as
    given (unverified), and an empty one is the authenticated identity's.
    """
    from keel.access.identity import AccessDenied, identities_required

    claimed = claimed.strip()
    if claimed and not identities_required():
        return claimed
    identity = authenticate(store)
    if claimed and claimed != identity.name:
        raise AccessDenied(
            f"{identity.name} ({identity.method}) may not act as {claimed!r}: a step records "
            "the identity that runs it"
        )
    return identity.name
