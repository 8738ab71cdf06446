"""The training set: its column contract, the time-based split and the class weight."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from keel.schema import (
    ENTITY_KEY,
    EVENT_TIMESTAMP,
    LABEL,
    LABEL_TIMESTAMP,
    MODEL_FEATURES,
)
from keel.training.options import TrainingDataError

REQUIRED_COLUMNS = (ENTITY_KEY, EVENT_TIMESTAMP, LABEL_TIMESTAMP, LABEL, *MODEL_FEATURES)


def load_training_set(path: str | Path) -> pd.DataFrame:
    """Read the point-in-time training set (Parquet) and check it against the column contract."""
    try:
        frame = pd.read_parquet(path, columns=list(REQUIRED_COLUMNS))
    except FileNotFoundError as error:
        raise TrainingDataError(
            f"training set {path} does not exist; materialise the `training_set` asset first"
        ) from error
    except (KeyError, ValueError) as error:
        # pyarrow names the first missing column; list them all for the reader.
        import pyarrow.parquet as pq

        present = set(pq.read_schema(path).names)
        missing = [name for name in REQUIRED_COLUMNS if name not in present]
        if not missing:
            raise
        raise TrainingDataError(
            f"training set {path} lacks columns {', '.join(missing)}"
        ) from error
    check_training_frame(frame)
    return frame


def check_training_frame(frame: pd.DataFrame) -> None:
    """Raise `TrainingDataError` unless ``frame`` holds labelled, UTC-stamped training rows."""
    missing = [name for name in REQUIRED_COLUMNS if name not in frame.columns]
    if missing:
        raise TrainingDataError(f"training frame lacks columns {', '.join(missing)}")
    if frame.empty:
        raise TrainingDataError("training frame has no rows")
    for column in (EVENT_TIMESTAMP, LABEL_TIMESTAMP):
        dtype = frame[column].dtype
        if not isinstance(dtype, pd.DatetimeTZDtype):
            raise TrainingDataError(
                f"column {column!r} must be a timezone-aware UTC timestamp, got {dtype}"
            )
        if frame[column].isna().any():
            raise TrainingDataError(f"column {column!r} holds {frame[column].isna().sum()} nulls")
    labels = frame[LABEL]
    if labels.isna().any():
        raise TrainingDataError(f"label column {LABEL!r} holds {labels.isna().sum()} nulls")
    unexpected = sorted(set(pd.unique(labels)) - {0, 1})
    if unexpected:
        raise TrainingDataError(f"label column {LABEL!r} must be 0/1, found {unexpected[:5]}")


# --------------------------------------------------------------------------- time split


class SplitCutoffs(NamedTuple):
    """Window boundaries: train < validation_start <= validation < test_start <= test < end."""

    validation_start: pd.Timestamp
    test_start: pd.Timestamp
    end: pd.Timestamp


class TimeSplit(NamedTuple):
    """The three time windows, each sorted by event time."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame


def split_cutoffs(frame: pd.DataFrame, validation_days: int, test_days: int) -> SplitCutoffs:
    """Day-aligned window boundaries, counted back from the day after the latest event."""
    if validation_days < 1 or test_days < 1:
        raise TrainingDataError(
            f"validation_days and test_days must be at least 1, got {validation_days}, {test_days}"
        )
    end = frame[EVENT_TIMESTAMP].max().floor("D") + pd.Timedelta(days=1)
    test_start = end - pd.Timedelta(days=test_days)
    validation_start = test_start - pd.Timedelta(days=validation_days)
    return SplitCutoffs(validation_start, test_start, end)


def time_split(frame: pd.DataFrame, validation_days: int, test_days: int) -> TimeSplit:
    """Split by ``event_timestamp`` into train, validation and test windows, latest last.

    A training row needs its label known at the training cut-off (``label_timestamp <=
    validation_start``): a model fitted at that moment could not have seen later labels.
    Validation and test rows are scored after the fact and are all kept.

    Args:
        frame: The training set (see `check_training_frame`).
        validation_days: Length of the validation window, in days.
        test_days: Length of the test window (the last days of the data), in days.

    Returns:
        The train, validation and test frames, each sorted by event time and account.
    """
    check_training_frame(frame)
    cutoffs = split_cutoffs(frame, validation_days, test_days)
    # One stable sort of the whole frame, then one copy per window: frames can be millions
    # of rows wide enough that every extra copy shows.
    events = frame[EVENT_TIMESTAMP].to_numpy(dtype="datetime64[ns]")  # UTC, naive
    order = np.lexsort((frame[ENTITY_KEY].to_numpy(), events))
    events = events[order]
    labels_known = frame[LABEL_TIMESTAMP].to_numpy(dtype="datetime64[ns]")[order]
    validation_start = cutoffs.validation_start.tz_convert("UTC").tz_localize(None).to_datetime64()
    test_start = cutoffs.test_start.tz_convert("UTC").tz_localize(None).to_datetime64()
    windows = {
        "train": (events < validation_start) & (labels_known <= validation_start),
        "validation": (events >= validation_start) & (events < test_start),
        "test": events >= test_start,
    }
    parts = {}
    for name, mask in windows.items():
        part = frame.take(order[mask])
        part.index = pd.RangeIndex(len(part))
        parts[name] = part
    for name in ("train", "validation"):
        part = parts[name]
        if part.empty or part[LABEL].nunique() < 2:
            raise TrainingDataError(
                f"the {name} window ({_describe_windows(cutoffs)}) has {len(part)} rows with "
                f"labels {sorted(part[LABEL].unique().tolist())}: it needs both classes; use "
                "more days of data or shorter validation/test windows"
            )
    if parts["test"].empty:
        raise TrainingDataError(f"the test window ({_describe_windows(cutoffs)}) has no rows")
    return TimeSplit(parts["train"], parts["validation"], parts["test"])


def _describe_windows(cutoffs: SplitCutoffs) -> str:
    return (
        f"validation from {cutoffs.validation_start:%Y-%m-%d}, "
        f"test from {cutoffs.test_start:%Y-%m-%d} to {cutoffs.end:%Y-%m-%d}"
    )


def positive_weight(labels: Iterable[int]) -> float:
    """Weight of a positive example that balances the classes: negatives / positives."""
    values = np.asarray(labels)
    positives = int((values == 1).sum())
    if positives == 0 or positives == len(values):
        raise TrainingDataError("the training window needs both classes")
    return (len(values) - positives) / positives


def read_held_out_windows(
    path: str | Path, validation_days: int, test_days: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The validation and test windows of a training-set file, as `time_split` cuts them.

    Only their rows are read: the newest event comes from the Parquet statistics and the
    validation start is pushed down to the reader, so memory grows with the two windows,
    not with the training set.
    """
    from keel.windows import newest_timestamp, read_since

    if validation_days < 1 or test_days < 1:
        raise TrainingDataError(
            f"validation_days and test_days must be at least 1, got {validation_days}, {test_days}"
        )
    newest = newest_timestamp(path, EVENT_TIMESTAMP)
    if newest is None:
        raise TrainingDataError(f"training set {path} has no rows")
    end = newest.floor("D") + pd.Timedelta(days=1)
    cutoffs = SplitCutoffs(
        end - pd.Timedelta(days=test_days + validation_days),
        end - pd.Timedelta(days=test_days),
        end,
    )
    frame = read_since(path, EVENT_TIMESTAMP, cutoffs.validation_start).to_pandas()
    check_training_frame(frame)
    events = frame[EVENT_TIMESTAMP].to_numpy(dtype="datetime64[ns]")
    order = np.lexsort((frame[ENTITY_KEY].to_numpy(), events))
    test_start = cutoffs.test_start.tz_convert("UTC").tz_localize(None).to_datetime64()
    windows = []
    for mask in (events[order] < test_start, events[order] >= test_start):
        part = frame.take(order[mask])
        part.index = pd.RangeIndex(len(part))
        windows.append(part)
    validation, test = windows
    if validation.empty or validation[LABEL].nunique() < 2:
        raise TrainingDataError(
            f"the validation window ({_describe_windows(cutoffs)}) has {len(validation)} rows "
            "without both classes: use more days of data or a longer validation window"
        )
    if test.empty:
        raise TrainingDataError(f"the test window ({_describe_windows(cutoffs)}) has no rows")
    return validation, test
