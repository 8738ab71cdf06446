"""One storage layer for the files that are not tables: a local folder or an object store.

Artefacts, marts, training sets, predictions and reports live under roots that are either a
folder (a laptop's data folder, or a mount every machine shares) or an object-store URL such
as ``s3://bucket/prefix``; code addresses both as ``UPath``. Writes are whole or nothing:

- a local file is written under a scratch name of its own beside the target, fsynced and
  renamed over it (``keel.files``), so two writers never share a scratch name;
- an object is one PUT, or a multipart upload that the store shows only once it completes, so
  a writer killed half-way leaves the previous object (or none), never part of the new one.

Credentials and the endpoint of an object store come from the standard AWS variables
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` or
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for an S3-compatible server): s3fs reads them
itself, and ``duckdb_object_store`` hands them to DuckDB's httpfs as the lake does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from keel.files import LOCAL_PROTOCOLS, atomic_write, replace_durably

if TYPE_CHECKING:
    import duckdb
    from upath import UPath

POINTER = "latest.json"
# Parts of a multipart upload (s3fs uploads a file of under two parts in one PUT).
UPLOAD_PART_BYTES = 50 * 2**20
# The marts' folder or URL in the production profile, read by dbt's export and Feast alike.
MARTS_ENV = "KEEL_MARTS_DIR"


class StorageError(RuntimeError):
    """A location that cannot be used, or a file that is not where a pointer says."""


def location(root: str | os.PathLike[str], *parts: str) -> UPath:
    """``root`` joined with ``parts``: a local path or an object-store URL, as a ``UPath``."""
    from upath import UPath

    text = os.fspath(root)
    if not text.strip():
        raise StorageError("an empty storage location: set the folder or the s3:// URL")
    return UPath(text).joinpath(*parts)


def marts_location(profile: str | None = None) -> str:
    """Where the Parquet marts are: ``KEEL_MARTS_DIR`` in production, else the data folder's.

    dbt's export writes there and Feast's sources read there, so both take it from here.
    """
    from keel.settings import KeelPaths, SettingsError, active_profile

    if (profile or active_profile()) != "production":
        return str(KeelPaths.current().marts)
    value = os.environ.get(MARTS_ENV, "").strip()
    if not value:
        raise SettingsError(
            f"KEEL_PROFILE=production keeps the marts on shared storage: set {MARTS_ENV} to "
            "their folder or URL (e.g. s3://bucket/keel/marts)."
        )
    return value.rstrip("/")


def is_local(path: Any) -> bool:
    """Whether ``path`` (a ``Path``, a ``UPath`` or a string) is on the local file system."""
    protocol = getattr(path, "protocol", None)
    if protocol is not None:
        return protocol in LOCAL_PROTOCOLS
    text = os.fspath(path)
    return "://" not in text or text.startswith("file://")


def local_path(path: Any) -> Path:
    """The ``Path`` of a local ``UPath`` (or path); an object-store URL is refused."""
    if not is_local(path):
        raise StorageError(f"{path} is on an object store, not a local path")
    return Path(getattr(path, "path", path))


def store_of(path: Any) -> str:
    """The store a location is on: ``local`` for the file system, else ``scheme://bucket``.

    Parts of one deployment that must see each other's files have to be on the same store.
    """
    if is_local(path):
        return "local"
    parts = urlsplit(str(path))
    return f"{parts.scheme}://{parts.netloc}"


def publish(scratch: Path, target: Any) -> Any:
    """Put a finished local ``scratch`` file at ``target``, atomically, and remove the scratch.

    Locally: fsync and rename (``scratch`` must be on the target's file system). On an object
    store: one upload, which the store shows only once it is complete.
    """
    if is_local(target):
        # A dataset's marts land in a folder of their own, new on a fresh data folder.
        local_path(target).parent.mkdir(parents=True, exist_ok=True)
        replace_durably(Path(scratch), local_path(target))
        return target
    try:
        target.fs.put_file(str(scratch), target.path, chunksize=UPLOAD_PART_BYTES)
    finally:
        Path(scratch).unlink(missing_ok=True)
    return target


@contextmanager
def scratch_folder(target_folder: Any) -> Iterator[Path]:
    """A local folder of this writer's own for files that ``publish`` then moves into place.

    Beside a local target (a hidden, uniquely named folder on the same file system, so the
    final rename is atomic); in the machine's temporary folder for an object store.
    """
    if is_local(target_folder):
        folder = local_path(target_folder)
        folder.mkdir(parents=True, exist_ok=True)
        scratch = folder / f".scratch-{uuid.uuid4().hex}"
        scratch.mkdir()
    else:
        scratch = Path(tempfile.mkdtemp(prefix="keel-upload-"))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def local_copy(path: Any) -> Iterator[Path]:
    """A local file with the content of ``path``: the file itself, or a download removed after."""
    if is_local(path):
        yield local_path(path)
        return
    if not path.exists():
        raise StorageError(f"{path} does not exist")
    folder = Path(tempfile.mkdtemp(prefix="keel-download-"))
    try:
        copy = folder / path.name
        path.fs.get_file(path.path, str(copy))
        yield copy
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def list_files(folder: Any, suffix: str = "") -> list[UPath]:
    """Files directly in ``folder`` whose names end in ``suffix``, by name; hidden ones skipped.

    A folder that does not exist holds no files.
    """
    folder = folder if hasattr(folder, "protocol") else location(folder)
    if not folder.exists():
        return []
    return sorted(
        (
            entry
            for entry in folder.iterdir()
            if not entry.name.startswith(".") and entry.name.endswith(suffix) and entry.is_file()
        ),
        key=lambda entry: entry.name,
    )


def file_signature(path: Any) -> str:
    """A text that changes whenever the file at ``path`` is rewritten.

    Locally its modification time (ns) and size; on an object store its ETag and size.
    """
    if is_local(path):
        stat = local_path(path).stat()
        return f"{stat.st_mtime_ns}:{stat.st_size}"
    info = path.fs.info(path.path)
    tag = info.get("ETag") or info.get("LastModified") or ""
    return f"{str(tag).strip(chr(34))}:{info.get('size')}"


def write_pointer(folder: Any, record: Mapping[str, Any], name: str = POINTER) -> Any:
    """Point readers at the newest version: ``folder/latest.json`` holds ``record``, atomically.

    Write the version it names first; a reader then never follows a pointer to a missing file.
    """
    folder = folder if hasattr(folder, "protocol") else location(folder)
    return atomic_write(folder / name, json.dumps(dict(record), indent=2, default=str) + "\n")


def read_pointer(folder: Any, name: str = POINTER) -> dict[str, Any]:
    """The record of ``folder/latest.json``; a clear error when nothing was written yet."""
    folder = folder if hasattr(folder, "protocol") else location(folder)
    pointer = folder / name
    if not pointer.exists():
        raise StorageError(f"{pointer} does not exist: nothing was written to {folder} yet")
    try:
        return json.loads(pointer.read_text())
    except json.JSONDecodeError as error:
        raise StorageError(f"{pointer} is not JSON: {error}") from error


def duckdb_parquet_source(path: str) -> str:
    """What DuckDB's ``read_parquet`` takes for a Parquet file or folder at ``path``.

    A local folder reads as it is; an object store has no folders, so there it is a glob.
    """
    if is_local(path) or path.endswith(".parquet") or "*" in path:
        return path
    return f"{path.rstrip('/')}/*.parquet"


def duckdb_object_store(connection: duckdb.DuckDBPyConnection) -> None:
    """Let ``connection`` read and write ``s3://`` with this environment's AWS settings.

    httpfs is installed from its package into Keel's extension folder and loaded (never
    downloaded), and the secret is the lake's (``keel.lake``): one reading of the variables.
    """
    from keel.lake import default_extension_dir, load_extensions, s3_secret

    load_extensions(connection, ("httpfs",), default_extension_dir())
    s3_secret(connection)
