"""Upkeep of the lake: DuckLake's own maintenance functions, one run of them at a time.

Every daily load replaces a partition in one transaction, so the lake gathers snapshots, files
only old snapshots read, small files, files part-deleted, and small writes kept inline in the
catalog; a loader killed mid-write leaves Parquet files no snapshot lists. ``maintain`` runs
what DuckLake's ``CHECKPOINT`` runs: flush inlined rows to Parquet, rewrite part-deleted
files, merge small files, expire old snapshots, delete the files no snapshot reads any more,
delete orphaned files. Unlike ``CHECKPOINT`` it compacts before it expires, so the files a
compaction replaced are freed by the same run. DuckLake only schedules freed files; they are
deleted a grace period later, as are orphans, since a reader may still scan the first and a
running load may still be writing the second.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from keel.lake import LAKE_ALIAS, LakeError, in_lake, in_transaction
from keel.sql import quote_literal

if TYPE_CHECKING:
    import duckdb

# Snapshots younger than this stay, to time-travel to and for readers that started on them.
SNAPSHOT_RETENTION = "7d"
# A file is deleted only this long after it was scheduled for deletion or, for an orphan,
# last written: longer than any query reads an old snapshot or any load writes its files.
FILE_GRACE = "1d"
# A data file whose rows are deleted in at least this share is rewritten without them.
REWRITE_DELETED_SHARE = 0.5

_AGE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True)
class MaintenanceSummary:
    """What one run did (or, in a dry run, would delete)."""

    dry_run: bool
    rows_flushed: int = 0
    files_compacted: int = 0  # data files merged or rewritten into ...
    files_written: int = 0  # ... these new ones
    snapshots_expired: int = 0
    files_deleted: int = 0  # files scheduled for deletion, deleted
    orphans_deleted: int = 0
    bytes_deleted: int = 0  # of both kinds of deleted file
    live_files_before: int = 0  # data and delete files the latest snapshot reads
    live_files_after: int = 0

    def as_dict(self) -> dict[str, int | bool]:
        return asdict(self)


def parse_age(text: str) -> timedelta:
    """``30s``, ``15m``, ``12h``, ``7d`` or ``2w`` (``0`` for none) as a ``timedelta``."""
    value = text.strip().lower()
    if value == "0":
        return timedelta(0)
    match = _AGE.match(value)
    if not match:
        raise ValueError(f"an age is a number and a unit (s, m, h, d, w), e.g. 7d: not {text!r}")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


def maintain(
    connection: duckdb.DuckDBPyConnection,
    older_than: str = SNAPSHOT_RETENTION,
    grace: str = FILE_GRACE,
    dry_run: bool = False,
) -> MaintenanceSummary:
    """Run the lake's maintenance on ``connection``, whose default catalog is the lake.

    Args:
        connection: a writable lake connection (``keel.lake.connect``).
        older_than: snapshots older than this expire (see ``parse_age``).
        grace: scheduled and orphaned files older than this are deleted.
        dry_run: change nothing; count the snapshots and files that would be deleted now.
    """
    if not in_lake(connection):
        raise LakeError("lake maintenance needs a DuckLake connection; this warehouse is a file")
    retention, grace_period = parse_age(older_than), parse_age(grace)
    lake = quote_literal(LAKE_ALIAS)
    dry = ", dry_run => true" if dry_run else ""
    live_before = _live_files(connection)

    flushed = compacted = written = 0
    if not dry_run:
        flushed = sum(
            row[2] for row in _write(connection, f"call ducklake_flush_inlined_data({lake})")
        )
    compactions = (
        (
            f"call ducklake_rewrite_data_files({lake}, delete_threshold => ?)",
            [REWRITE_DELETED_SHARE],
        ),
        (f"call ducklake_merge_adjacent_files({lake})", []),
    )
    for call, params in () if dry_run else compactions:
        for _schema, _table, processed, created in _write(connection, call, params):
            compacted += processed
            written += created
    expired = _write(
        connection,
        f"call ducklake_expire_snapshots({lake}, older_than => ?::timestamptz{dry})",
        [datetime.now(UTC) - retention],
    )
    # Counted from now, so that a grace of 0 deletes what this run freed too. Deleting files
    # cannot be taken back, so neither call runs again on a conflict.
    delete_before = datetime.now(UTC) - grace_period
    sizes = _stored_sizes(connection)
    deleted = _paths(
        connection,
        f"call ducklake_cleanup_old_files({lake}, older_than => ?::timestamptz{dry})",
        [delete_before],
    )
    orphans = _paths(
        connection,
        f"call ducklake_delete_orphaned_files({lake}, older_than => ?::timestamptz{dry})",
        [delete_before],
    )
    return MaintenanceSummary(
        dry_run=dry_run,
        rows_flushed=int(flushed),
        files_compacted=compacted,
        files_written=written,
        snapshots_expired=len(expired),
        files_deleted=len(deleted),
        orphans_deleted=len(orphans),
        bytes_deleted=sum(sizes.get(path, 0) for path in deleted | orphans),
        live_files_before=live_before,
        live_files_after=_live_files(connection),
    )


def _write(connection: duckdb.DuckDBPyConnection, sql: str, params=()) -> list[tuple]:
    """Run a catalog-changing call as a transaction of its own, again if it conflicted."""
    return in_transaction(connection, lambda: connection.execute(sql, params).fetchall())


def _paths(connection: duckdb.DuckDBPyConnection, sql: str, params) -> set[str]:
    return {path for (path,) in connection.execute(sql, params).fetchall()}


def _stored_sizes(connection: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Every file under the lake's data path and its size, read before any is deleted."""
    (data_path,) = connection.execute(
        "select value from ducklake_options(?) where option_name = 'data_path'", [LAKE_ALIAS]
    ).fetchone()
    # read_blob reads no file's content when only the name and size are asked for.
    rows = connection.execute(
        "select filename, size from read_blob(?)", [data_path.rstrip("/") + "/**"]
    ).fetchall()
    return dict(rows)


def _live_files(connection: duckdb.DuckDBPyConnection) -> int:
    (count,) = connection.execute(
        "select coalesce(sum(file_count + delete_file_count), 0) from ducklake_table_info(?)",
        [LAKE_ALIAS],
    ).fetchone()
    return int(count)
