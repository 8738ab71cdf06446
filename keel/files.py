"""Writing files so that a reader sees the old content or the new, never half of either."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

LOCAL_PROTOCOLS = ("", "file", "local")


def _fsync_folder(folder: Path) -> None:
    # The rename lives in the folder's entry table: without this a power cut can undo it.
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike[str] | Any, data: bytes | str, mode: int = 0o644):
    """Write ``data`` to ``path`` through a scratch file of its own, fsynced and renamed.

    Every writer gets a unique scratch name in the target's folder, so two writers of the same
    file never meet; the last rename wins and the file is always one writer's whole content.
    Object stores (a ``UPath`` such as ``s3://...``) take the bytes in one PUT, which is atomic
    there already.

    Args:
        path: A local path or a ``UPath``.
        data: The whole content; text is written as UTF-8.
        mode: Permissions of the new file (e.g. ``0o600`` for a secret).

    Returns:
        ``path``.
    """
    payload = data.encode() if isinstance(data, str) else bytes(data)
    protocol = getattr(path, "protocol", "")
    if protocol not in LOCAL_PROTOCOLS:
        # No folders to create: an object store's "mkdir" would create a misspelt bucket.
        path.write_bytes(payload)
        return path
    target = Path(getattr(path, "path", path))
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = _write_scratch(target, payload, mode)
    try:
        os.replace(scratch, target)
    finally:
        scratch.unlink(missing_ok=True)
    _fsync_folder(target.parent)
    return path


def replace_durably(scratch: Path, target: Path) -> Path:
    """Rename a finished ``scratch`` file (written by another library) onto ``target``, fsynced.

    The file's bytes reach the disk before the rename, and the rename before the return.
    """
    descriptor = os.open(scratch, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(scratch, target)
    _fsync_folder(Path(target).parent)
    return target


def create_exclusive(path: Path, data: bytes | str, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` unless it exists; returns whether this call created it.

    The content is complete before the name appears (a hard link of a fsynced scratch file),
    so a concurrent reader never sees an empty file.
    """
    payload = data.encode() if isinstance(data, str) else bytes(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = _write_scratch(path, payload, mode)
    try:
        try:
            os.link(scratch, path)
        except FileExistsError:
            return False
    finally:
        scratch.unlink(missing_ok=True)
    _fsync_folder(path.parent)
    return True


def _write_scratch(target: Path, payload: bytes, mode: int) -> Path:
    """``payload`` in a fsynced scratch file of this writer's own, beside ``target``."""
    scratch = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    return scratch
