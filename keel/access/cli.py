"""``keel access``: who am I, API keys, OS-user grants and the access log.

Managing keys and grants needs the ``admin`` role; in the local profile the OS user holds it
until the first grant.
"""

from __future__ import annotations

import click

from keel.access.identity import ALL_ROLES


def _store():
    from keel.access.store import KeyStore, default_store_path

    return KeyStore(default_store_path())


def _admin(store) -> str:
    """The caller's name once it is an authenticated admin."""
    from keel.access.identity import AccessError
    from keel.access.store import authenticate

    try:
        identity = authenticate(store)
        if not identity.allows("admin"):
            store.log_refusal(identity, "admin", "keel access", "needs the admin role")
        identity.require("admin", "keys and grants")
    except AccessError as error:
        raise click.ClickException(str(error)) from error
    return identity.name


@click.group("access")
def access() -> None:
    """Identities and roles: API keys (stored hashed), OS-user grants, the access log."""


@access.command()
def whoami() -> None:
    """The identity this shell acts as (KEEL_API_KEY, else the OS user) and its roles."""
    from keel.access.identity import AccessError
    from keel.access.store import authenticate

    try:
        identity = authenticate(_store())
    except AccessError as error:
        raise click.ClickException(str(error)) from error
    roles = ", ".join(sorted(identity.roles)) or "none"
    click.echo(f"{identity.name} ({identity.method}): {roles}")


@access.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("add")
@click.option("--owner", required=True, help="Who uses the key; recorded as the actor.")
@click.option("--role", "roles", multiple=True, required=True, type=click.Choice(ALL_ROLES))
def add_key(owner: str, roles: tuple[str, ...]) -> None:
    """Create a key and print it once (only its hash is kept)."""
    from keel.access.store import ApiKeyError

    store = _store()
    by = _admin(store)
    try:
        click.echo(store.add(owner, roles, by=by))
    except ApiKeyError as error:
        raise click.ClickException(str(error)) from error


@keys.command("list")
def list_keys() -> None:
    """Every key's id, owner, roles and state (never the key itself)."""
    store = _store()
    _admin(store)
    for row in store.list():
        state = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
        click.echo(f"{row['key_id']}  {row['owner']:<20} {row['roles']:<24} {state}")


@keys.command("revoke")
@click.argument("key_id")
def revoke_key(key_id: str) -> None:
    """Revoke a key by its id (the 8 hex digits after ``keel_``)."""
    from keel.access.store import ApiKeyError

    store = _store()
    by = _admin(store)
    try:
        store.revoke(key_id, by=by)
    except ApiKeyError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"revoked {key_id}")


@access.command()
@click.argument("user")
@click.option("--role", "roles", multiple=True, required=True, type=click.Choice(ALL_ROLES))
def grant(user: str, roles: tuple[str, ...]) -> None:
    """Give the OS user USER exactly these roles (local profile).

    The first grant ends the bootstrap in which every OS user is an admin; the OS user who
    makes it keeps the admin role.
    """
    from keel.access.store import os_user

    store = _store()
    by = _admin(store)
    if not store.has_grants():
        if user == os_user() and "admin" not in roles:
            raise click.ClickException(
                "the first grant would take the admin role from you: include --role admin"
            )
        if user != os_user():
            store.grant(os_user(), ["admin"], by=by)
    store.grant(user, roles, by=by)
    click.echo(f"{user}: {', '.join(sorted(roles))}")


@access.command("log")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
def access_log(limit: int) -> None:
    """Key and grant changes and every refusal, oldest first."""
    store = _store()
    _admin(store)
    for row in store.access_log(limit):
        verdict = "allowed" if row["allowed"] else "REFUSED"
        click.echo(
            f"{row['at']}  {verdict:<7} {row['actor']} ({row['method']}) {row['action']} "
            f"{row['target']}: {row['detail']}"
        )
