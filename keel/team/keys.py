"""Service identities of the team profile: one API key per long-running service.

The team profile acts only as authenticated identities (`keel.access`), so the services that
act on their own need keys of their own: the Dagster daemon launches runs (its run launcher
checks and tags the identity) and ticks the canary sensor, the Celery workers run the steps
(registration, release steps), and the release watcher of ``keel serve`` promotes or rolls
back a canary. `provision` gives each the narrowest roles that do its job and keeps each key
in a 0600 file of its own under ``KEEL_HOME/team/keys``, which only that service's start
reads: the process it starts gets the key as ``KEEL_API_KEY``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from keel.access.store import KeyStore, default_store_path, os_user
from keel.settings import KeelPaths

DAEMON = "svc-daemon"
WORKERS = "svc-workers"
WATCHER = "svc-watcher"
# No approver anywhere: an approval is a person's four-eyes decision (`keel registry approve`
# with their own key), never a service's.
SERVICE_ROLES: dict[str, tuple[str, ...]] = {
    # Launches the schedules' and sensors' runs (``run``, ``train``), release and rollback
    # runs, and judges the canary in its sensor (``deploy``).
    DAEMON: ("deployer", "trainer"),
    # Runs those runs' steps: registers candidates, moves release aliases, attaches bundles.
    WORKERS: ("deployer", "trainer"),
    # Only promotes or rolls back a canary: serving's release role, no scoring, no training.
    WATCHER: ("deploy",),
}


@dataclass(frozen=True)
class Provisioned:
    """One service identity after `provision`: its name, roles, key id and whether it is new."""

    name: str
    roles: tuple[str, ...]
    key_id: str
    key_file: Path
    issued: bool


def keys_dir(paths: KeelPaths) -> Path:
    """``KEEL_HOME/team/keys``, readable by its owner only."""
    folder = paths.home / "team" / "keys"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    return folder


def key_file(paths: KeelPaths, service: str) -> Path:
    """Where ``service``'s key is kept."""
    if service not in SERVICE_ROLES:
        raise ValueError(f"unknown service {service!r}; known: {', '.join(SERVICE_ROLES)}")
    return paths.home / "team" / "keys" / f"{service}.key"


def service_key(paths: KeelPaths, service: str) -> str:
    """The service's key as `provision` stored it, or "" when it has none yet."""
    path = key_file(paths, service)
    return path.read_text().strip() if path.exists() else ""


def _write_key(path: Path, key: str) -> None:
    # Created 0600 from the start: the key is never readable by others, not even briefly.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    tmp.replace(path)


def provision(
    paths: KeelPaths, store: KeyStore | None = None, rotate: bool = False
) -> list[Provisioned]:
    """Give every service its identity and key; a second call reuses the keys it finds.

    A service keeps its key while the key file holds an active key of that identity with its
    roles. Otherwise (``rotate``, a lost file, a revoked key, changed roles) the identity's
    active keys are revoked and one new key is issued, so each service has exactly one.
    """
    store = store or KeyStore(default_store_path())
    by = f"keel team up ({os_user()})"
    keys_dir(paths)
    done = []
    for name, roles in SERVICE_ROLES.items():
        path = key_file(paths, name)
        key = service_key(paths, name)
        identity = store.check(key) if key and not rotate else None
        if identity is not None and identity.name == name and identity.roles == set(roles):
            done.append(Provisioned(name, roles, identity.method.split(":")[1], path, False))
            continue
        for row in store.list():
            if row["owner"] == name and row["revoked_at"] is None:
                store.revoke(str(row["key_id"]), by=by)
        key = store.add(name, roles, by=by)
        _write_key(path, key)
        done.append(Provisioned(name, roles, key.split("_")[1], path, True))
    return done


def describe(paths: KeelPaths, store: KeyStore | None = None) -> dict[str, str]:
    """Service -> its identity as the key file proves it (``svc-workers (deployer, trainer)``)."""
    shown = {}
    for name in SERVICE_ROLES:
        key = service_key(paths, name)
        if key and store is None:
            store = KeyStore(default_store_path())
        identity = store.check(key) if key else None
        if not key:
            shown[name] = "no key (keel team up provisions it)"
        elif identity is None:
            shown[name] = "key revoked or unknown (keel team up --rotate-keys)"
        else:
            shown[name] = f"{identity.name} ({', '.join(sorted(identity.roles))})"
    return shown
