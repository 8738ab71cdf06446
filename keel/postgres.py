"""Postgres databases the shared profiles need, created on first use."""

from __future__ import annotations


def ensure_database(params: dict[str, str]) -> bool:
    """Create the database ``params["dbname"]`` names unless it exists; True if this call did.

    ``params`` are libpq connection parameters (``psycopg2.extensions.parse_dsn`` of a URL or
    a ``key=value`` string). Several machines may start at once: a concurrent creator's
    DuplicateDatabase (or the catalog's unique violation) means the database is there. An
    unreachable server raises ``psycopg2.OperationalError``.
    """
    import psycopg2
    import psycopg2.errors

    try:
        psycopg2.connect(**params, connect_timeout=10).close()
        return False
    except psycopg2.OperationalError as error:
        if f'"{params["dbname"]}" does not exist' not in str(error):
            raise
    maintenance = psycopg2.connect(**{**params, "dbname": "postgres"}, connect_timeout=10)
    try:
        maintenance.autocommit = True
        with maintenance.cursor() as cursor:
            cursor.execute(f'create database "{params["dbname"]}"')
    except (psycopg2.errors.DuplicateDatabase, psycopg2.errors.UniqueViolation):
        return False
    finally:
        maintenance.close()
    return True
