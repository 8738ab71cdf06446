"""The team warehouse: a DuckLake, its catalog in Postgres, its tables as Parquet files.

Every worker on every machine opens its own in-memory DuckDB, attaches the same lake and makes
it the default catalog, so code written for the DuckDB file (``raw.<table>``) works
unchanged. The catalog (a Postgres database) holds the tables' schemas, snapshots and file
lists; the data path (a folder every machine mounts, or ``s3://bucket/prefix``) holds the
Parquet files. DuckLake commits each transaction as one snapshot, so a partition replaced in
one transaction is seen whole or not at all. Writers of different partitions of one table
commit side by side: DuckLake retries a commit that merely lost the race, and
``in_transaction`` runs again a replacement that DuckLake refused as a conflict.

The DuckDB extensions come from the ``duckdb-extension-*`` packages installed with Keel: each
package carries the extension file, which is installed into a folder of ours and loaded; no
extension is ever downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from keel.sql import quote_literal

if TYPE_CHECKING:
    import duckdb

T = TypeVar("T")

# The name the lake is attached under; it becomes the connection's default catalog.
LAKE_ALIAS = "lake"
CATALOG_ENV = "KEEL_LAKE_CATALOG"
DATA_PATH_ENV = "KEEL_LAKE_DATA_PATH"
DEFAULT_CATALOG = "postgresql://postgres@127.0.0.1:5432/keel_lake"
# Object stores DuckDB reaches through httpfs.
REMOTE_SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "r2://", "http://", "https://")
# A commit that lost the race to another worker's is retried by DuckLake this many times.
MAX_COMMIT_RETRIES = 50
# A transaction DuckLake refused for a real conflict is run again this many times in all.
CONFLICT = "Transaction conflict"
CONFLICT_ATTEMPTS = 10
# The advisory lock that serialises the creation of a new catalog ("keel lake" in ASCII).
CATALOG_LOCK_KEY = 0x6B65656C6C616B65
POSTGRES_HINT = (
    "Start Postgres, or point {env} at a reachable one. On Debian: "
    "`sudo apt-get install postgresql` then `sudo systemctl start postgresql` "
    "(or `sudo pg_ctlcluster <version> main start`)."
)


class LakeError(RuntimeError):
    """The lake cannot be opened: catalog unreachable, extension missing, paths disagree."""


def lake_catalog() -> str:
    """The catalog's Postgres connection string: ``KEEL_LAKE_CATALOG`` or this machine's."""
    return os.environ.get(CATALOG_ENV, "").strip() or DEFAULT_CATALOG


def default_extension_dir() -> Path:
    """Where extensions are installed when no folder is given: this user's temp folder."""
    return Path(tempfile.gettempdir()) / f"keel-duckdb-extensions-{os.getuid()}"


def lake_data_path(home: Path) -> str:
    """Where the lake's Parquet files live: ``KEEL_LAKE_DATA_PATH`` or ``<home>/lake``."""
    return os.environ.get(DATA_PATH_ENV, "").strip() or str(home / "lake")


def is_remote(data_path: str) -> bool:
    """Whether ``data_path`` is an object store URL rather than a folder."""
    return data_path.lower().startswith(REMOTE_SCHEMES)


def data_location(data_path: str) -> str:
    """``data_path`` as the catalog records it, with a trailing slash.

    A URL stays as given; a folder becomes absolute (and is created). Every machine must give
    the same location for the same catalog.
    """
    if not data_path:
        raise LakeError(f"the lake has no data path: set {DATA_PATH_ENV} to a folder or s3:// URL")
    if not is_remote(data_path):
        folder = Path(data_path).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        data_path = str(folder)
    return data_path.rstrip("/") + "/"


def needed_extensions(data_path: str) -> tuple[str, ...]:
    """The extensions a lake on ``data_path`` needs, in load order."""
    return ("postgres", "ducklake", *(("httpfs",) if is_remote(data_path) else ()))


def in_lake(connection: duckdb.DuckDBPyConnection) -> bool:
    """Whether ``connection``'s default catalog is a DuckLake."""
    kind = connection.execute(
        "select type from duckdb_databases() where database_name = current_database()"
    ).fetchone()
    return bool(kind) and kind[0] == "ducklake"


def in_transaction(connection: duckdb.DuckDBPyConnection, write: Callable[[], T]) -> T:
    """Run ``write`` in one transaction, whole or not at all, again if its commit conflicted.

    A single writer of a DuckDB file never conflicts. In a lake, DuckLake refuses to commit a
    transaction that deleted from a table another worker's commit changed meanwhile (even in
    other partitions); the transaction is then rolled back and ``write`` runs again on the
    lake's latest snapshot. ``write`` must therefore replace what it writes (delete, then
    insert), never append.
    """
    import duckdb

    for attempt in range(CONFLICT_ATTEMPTS):
        connection.execute("begin transaction")
        try:
            result = write()
        except BaseException:
            connection.execute("rollback")
            raise
        try:
            connection.execute("commit")  # a failed commit has rolled back already
            return result
        except duckdb.TransactionException as error:
            if CONFLICT not in str(error) or attempt == CONFLICT_ATTEMPTS - 1:
                raise
            logging.getLogger(__name__).info("commit conflicted, writing again: %s", error)
        time.sleep(min(5.0, random.uniform(0.05, 0.2) * 2**attempt))
    raise AssertionError("unreachable")


def create_partitioned(
    connection: duckdb.DuckDBPyConnection, table: str, create_sql: str, column: str
) -> None:
    """Run ``create_sql`` (a ``create table if not exists``), partitioned by ``column`` in a lake.

    A table created in a lake keeps each value of ``column`` in files of its own.
    DuckLake refuses to commit two transactions that delete from the same file, so workers
    replacing different partitions at once must never share one. The table is created and
    partitioned in one transaction; a table that exists already is left as it is.
    """
    schema, _, name = table.rpartition(".")
    exists = connection.execute(
        """select count(*) from information_schema.tables where table_catalog = current_database()
           and table_schema = ? and table_name = ?""",
        [schema or "main", name],
    ).fetchone()[0]
    if exists or not in_lake(connection):
        connection.execute(create_sql)
        return
    connection.execute("begin transaction")
    try:
        connection.execute(create_sql)
        connection.execute(f"alter table {table} set partitioned by ({column})")
    except BaseException:
        connection.execute("rollback")
        raise
    # A failed commit (another worker created the table first) ends the transaction itself.
    connection.execute("commit")


def extension_file(name: str) -> Path:
    """The extension file that the ``duckdb-extension-<name>`` package carries."""
    import duckdb

    package = f"duckdb_extension_{name}"
    spec = importlib.util.find_spec(package)
    wanted = f"duckdb-extension-{name}=={duckdb.__version__}"
    if spec is None or not spec.submodule_search_locations:
        raise LakeError(f"the DuckDB extension {name!r} is not installed: pip install {wanted}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "extensions"
    file = folder / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not file.is_file():
        found = sorted(p.name for p in folder.glob("v*")) if folder.is_dir() else []
        raise LakeError(
            f"the installed {package} carries no extension for DuckDB {duckdb.__version__} "
            f"(it has {', '.join(found) or 'none'}): pip install {wanted}"
        )
    return file


def load_extensions(
    connection: duckdb.DuckDBPyConnection, names: tuple[str, ...], extension_dir: Path
) -> None:
    """Load ``names``, first installing them from their packages into ``extension_dir``."""
    import duckdb

    extension_dir.mkdir(parents=True, exist_ok=True)
    connection.execute(f"set extension_directory = {quote_literal(str(extension_dir))}")
    for name in names:
        try:
            connection.execute(f"load {name}")  # installed here before
        except duckdb.Error:
            connection.execute(f"install {quote_literal(str(extension_file(name)))}")
            connection.execute(f"load {name}")


def _catalog_params(catalog: str) -> dict[str, str]:
    import psycopg2.extensions

    try:
        params = psycopg2.extensions.parse_dsn(catalog)
    except psycopg2.ProgrammingError as error:
        raise LakeError(
            f"lake catalog {catalog!r} is not a Postgres connection string: {error}"
        ) from error
    if not params.get("dbname"):
        raise LakeError(f"lake catalog {catalog!r} names no database (dbname=... or /name)")
    return params


def ensure_catalog_database(catalog: str) -> None:
    """Create the catalog's Postgres database if it is missing; clear errors if unreachable."""
    import psycopg2

    from keel.postgres import ensure_database

    params = _catalog_params(catalog)
    where = f"{params.get('host', 'localhost')}:{params.get('port', '5432')}"
    try:
        ensure_database(params)
    except psycopg2.OperationalError as error:
        raise LakeError(
            f"the lake catalog's Postgres at {where} cannot be reached: "
            f"{str(error).strip()}. {POSTGRES_HINT.format(env=CATALOG_ENV)}"
        ) from error
    except psycopg2.Error as error:
        raise LakeError(
            f"cannot create the lake catalog database {params['dbname']!r} at {where}: "
            f"{str(error).strip()}"
        ) from error


@contextmanager
def catalog_initialisation_lock(catalog: str) -> Iterator[None]:
    """Hold a Postgres advisory lock while the catalog is still new.

    The first attach writes DuckLake's tables into the catalog database; two workers doing it
    at once collide. Once the catalog exists, no lock is taken.
    """
    import psycopg2

    link = psycopg2.connect(**_catalog_params(catalog), connect_timeout=10)
    try:
        link.autocommit = True
        with link.cursor() as cursor:
            cursor.execute("select to_regclass('public.ducklake_metadata') is null")
            new = cursor.fetchone()[0]
            if new:
                cursor.execute("select pg_advisory_lock(%s)", [CATALOG_LOCK_KEY])
        if not new:
            link.close()
        yield
    finally:
        link.close()  # ends the session, and with it the advisory lock


def s3_secret(connection: duckdb.DuckDBPyConnection) -> None:
    """An S3 secret from the standard AWS variables (an endpoint URL for S3-compatible stores)."""
    from urllib.parse import urlsplit

    options = {"type": "s3"}
    for option, variable in (
        ("key_id", "AWS_ACCESS_KEY_ID"),
        ("secret", "AWS_SECRET_ACCESS_KEY"),
        ("session_token", "AWS_SESSION_TOKEN"),
        ("region", "AWS_REGION"),
    ):
        if os.environ.get(variable):
            options[option] = os.environ[variable]
    if "region" not in options and os.environ.get("AWS_DEFAULT_REGION"):
        options["region"] = os.environ["AWS_DEFAULT_REGION"]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint)
        options.update(
            endpoint=parts.netloc or parts.path,
            url_style="path",
            use_ssl="true" if parts.scheme == "https" else "false",
        )
    listed = ", ".join(
        f"{key} {value if key == 'use_ssl' else quote_literal(value)}"
        for key, value in options.items()
    )
    connection.execute(f"create or replace secret keel_lake_s3 ({listed})")


def attach(
    connection: duckdb.DuckDBPyConnection,
    catalog: str,
    data_path: str,
    extension_dir: Path,
    read_only: bool = False,
) -> None:
    """Attach the lake to ``connection`` as ``lake`` and make it the default catalog.

    Args:
        connection: a DuckDB connection (an in-memory one: the lake holds every table).
        catalog: the catalog's Postgres connection string, ``dbname=keel_lake host=...`` or
            ``postgresql://user@host:port/keel_lake``; its database is created if missing.
        data_path: a folder every worker mounts, or an object store URL (``s3://...``).
        extension_dir: where the extensions are installed from their packages.
        read_only: attach the lake read-only.
    """
    load_extensions(connection, needed_extensions(data_path), extension_dir)
    if data_path.lower().startswith(("s3://", "s3a://")):
        s3_secret(connection)
    location = data_location(data_path)
    ensure_catalog_database(catalog)
    options = f"data_path {quote_literal(location)}" + (", read_only" if read_only else "")
    try:
        with catalog_initialisation_lock(catalog):
            connection.execute(
                f"attach if not exists {quote_literal('ducklake:postgres:' + catalog)} "
                f"as {LAKE_ALIAS} ({options})"
            )
    except LakeError:
        raise
    except Exception as error:
        if "does not match existing data path" in str(error):
            raise LakeError(
                f"the lake catalog {catalog!r} keeps its data elsewhere than {location}: "
                f"every machine must use the catalog's data path ({DATA_PATH_ENV}). {error}"
            ) from error
        raise LakeError(f"cannot attach the lake {catalog!r} on {location}: {error}") from error
    connection.execute(f"use {LAKE_ALIAS}")


# One DuckDB instance per lake and process: loading the extensions takes about a second, so
# each ``connect`` opens a new connection (a cursor) on the instance that already holds them.
_INSTANCES: dict[tuple, duckdb.DuckDBPyConnection] = {}
_INSTANCES_LOCK = threading.Lock()


def connect(
    catalog: str,
    data_path: str,
    extension_dir: Path,
    read_only: bool = False,
    memory_limit: str = "2GB",
) -> duckdb.DuckDBPyConnection:
    """A new connection whose default catalog is the lake (see ``attach``).

    Connections of one process share one in-memory DuckDB with the lake attached; each is a
    session of its own (its own transactions, settings and ``USE``), and every transaction
    reads the lake's latest snapshot, so other processes' commits are seen.
    """
    key = (
        os.getpid(),
        catalog,
        data_location(data_path),
        str(extension_dir),
        read_only,
        memory_limit,
    )
    with _INSTANCES_LOCK:
        instance = _INSTANCES.get(key)
        if instance is None:
            instance = _open_instance(catalog, data_path, extension_dir, read_only, memory_limit)
            _INSTANCES[key] = instance
    connection = instance.cursor()
    connection.execute(f"use {LAKE_ALIAS}")
    connection.execute(f"set ducklake_max_retry_count = {MAX_COMMIT_RETRIES}")
    return connection


def _open_instance(
    catalog: str, data_path: str, extension_dir: Path, read_only: bool, memory_limit: str
) -> duckdb.DuckDBPyConnection:
    import duckdb

    instance = duckdb.connect(
        ":memory:",
        config={
            "memory_limit": memory_limit,
            # Never fetch an extension from the network: the packages carry them.
            "autoinstall_known_extensions": False,
            "extension_directory": str(extension_dir),
            # Spilled intermediates go to the system's scratch space, not the working folder.
            "temp_directory": str(Path(tempfile.gettempdir()) / "keel-lake-spill"),
        },
    )
    try:
        attach(instance, catalog, data_path, extension_dir, read_only=read_only)
    except BaseException:
        instance.close()
        raise
    return instance
