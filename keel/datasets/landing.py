"""A daily dataset's landing files: one file a day, named by the source's pattern.

``source.path`` of a ``landing`` source is a pattern relative to the profile's landing folder
with ``{day}`` where the file name carries its day (``applications/{day}.csv``). A day's file
loads as that day's partition of the raw table; a missing file is an error naming it, so a
day that has not landed is never taken for a day without rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from keel.datasets.spec import DatasetSpec

DAY = "{day}"


class LandingError(ValueError):
    """A landing pattern or file a daily dataset cannot be loaded from."""


def landing_path(spec: DatasetSpec, landing_dir: str | Path, day: str) -> Path:
    """The file of ``day`` (``YYYY-MM-DD``), refused if the pattern leads outside the folder."""
    pattern = spec.source.path or ""
    if spec.source.kind != "landing" or DAY not in pattern:
        raise LandingError(
            f"dataset {spec.name!r}: a daily landing source needs a path with {DAY} "
            f"(got kind {spec.source.kind!r}, path {pattern!r})"
        )
    folder = Path(landing_dir).resolve()
    path = (folder / pattern.replace(DAY, pd.Timestamp(day).strftime("%Y-%m-%d"))).resolve()
    if folder not in path.parents:
        raise LandingError(f"dataset {spec.name!r}: {path} is outside the landing folder {folder}")
    return path


def landing_files(
    spec: DatasetSpec, landing_dir: str | Path, days: Iterable[str]
) -> dict[str, Path]:
    """Each day's file; every missing one is named before anything loads."""
    files = {day: landing_path(spec, landing_dir, day) for day in days}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise LandingError(f"dataset {spec.name!r}: not landed yet: {', '.join(missing)}")
    return files


def day_rows(spec: DatasetSpec, features: pd.DataFrame, day: str) -> pd.DataFrame:
    """Each entity's newest feature row stamped on ``day`` (UTC): what a day is scored on."""
    stamps = pd.to_datetime(features[spec.event_time], utc=True)
    start = pd.Timestamp(day, tz="UTC")
    rows = features[(stamps >= start) & (stamps < start + pd.Timedelta(days=1))]
    ordered = rows.sort_values([spec.entity_key, spec.event_time])
    return ordered.drop_duplicates(spec.entity_key, keep="last").reset_index(drop=True)
