"""Reading the newest days of Parquet data without reading the rest.

The newest timestamp comes from the row groups' statistics (no data is read), and the start of
the window is pushed down to the Parquet reader, which skips row groups and files whose
statistics lie before it; memory then grows with the window, not with the history.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as ds


def _dataset(source: str | Path) -> ds.Dataset:
    import pyarrow.dataset as ds

    from keel.storage import is_local, location

    if is_local(source):
        return ds.dataset(str(source), format="parquet")
    # An object store through the same client (and settings) as every other file.
    remote = location(source)
    return ds.dataset(remote.path, format="parquet", filesystem=remote.fs)


def _statistics_max(dataset: ds.Dataset, column: str) -> tuple[object, bool]:
    """The largest ``column`` value the row-group statistics record, and whether all had one."""
    maxima = []
    for fragment in dataset.get_fragments():
        for group in fragment.row_groups:
            value = (group.statistics.get(column) or {}).get("max")
            if value is None:
                return None, False
            maxima.append(value)
    return (max(maxima) if maxima else None), True


def newest_timestamp(source: str | Path, column: str) -> pd.Timestamp | None:
    """The largest value of ``column`` in a Parquet file or folder, as a UTC timestamp.

    Read from the statistics when every row group has them, else from that one column.
    """
    import pandas as pd
    import pyarrow.compute as pc

    dataset = _dataset(source)
    newest, complete = _statistics_max(dataset, column)
    if not complete:
        newest = pc.max(dataset.to_table(columns=[column])[column]).as_py()
    if newest is None:
        return None
    stamp = pd.Timestamp(newest)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def read_since(
    source: str | Path, column: str, start: pd.Timestamp, columns: list[str] | None = None
) -> pa.Table:
    """The rows whose ``column`` is at or after ``start``; earlier row groups are not read."""
    import pyarrow.dataset as ds

    return _dataset(source).to_table(columns=columns, filter=ds.field(column) >= start)


def window_start(newest: pd.Timestamp, days: int) -> pd.Timestamp:
    """The first instant of the ``days`` calendar days that end with ``newest``'s day."""
    return newest.floor("D") + timedelta(days=1) - timedelta(days=days)
