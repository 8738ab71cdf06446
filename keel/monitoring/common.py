"""Column checks, sampling, formatting and atomic writes shared by the monitoring modules."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd

SCORE = "score"


def _write_file(target: Path | Any, write: Callable[[BinaryIO], object]) -> None:
    """Write a file through ``write(handle)`` so that readers never see half of it."""
    if not isinstance(target, Path):
        with target.open("wb") as out:  # object stores publish an object once it is complete
            write(out)
        return
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("wb") as out:
            write(out)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _as_path(path: Path | str | Any) -> Path | Any:
    """A str becomes a local Path; a Path or UPath (object store) is kept as it is."""
    return Path(path) if isinstance(path, str) else path


def _require_columns(frame: pd.DataFrame, columns: Iterable[str], which: str) -> None:
    if missing := [c for c in columns if c not in frame.columns]:
        raise ValueError(f"The {which} frame lacks columns {missing}.")


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _numeric_column(frame: pd.DataFrame, column: str, which: str) -> np.ndarray:
    series = frame[column]
    if not _is_numeric(series):
        raise ValueError(
            f"Column {column!r} in the {which} frame should hold numbers, "
            f"found dtype {series.dtype}."
        )
    if series.dtype == np.float64:
        return series.to_numpy()
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


def _category_counts(series: pd.Series) -> dict[str, int]:
    counts = series.value_counts(dropna=True, sort=False)
    return {str(k): int(v) for k, v in counts.items() if v > 0}


def _scores_array(scores: Sequence[float] | np.ndarray | pd.Series, which: str) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"The {which} must be one-dimensional, got shape {array.shape}.")
    finite = array[~np.isnan(array)]
    if finite.size and ((finite < 0).any() or (finite > 1).any()):
        raise ValueError(f"The {which} must be probabilities in [0, 1].")
    return array


def _sample(frame: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    if len(frame) <= rows:
        return frame.reset_index(drop=True)
    return frame.sample(n=rows, random_state=seed).sort_index().reset_index(drop=True)


def _format_score(score: float) -> str:
    if score == 0 or math.isnan(score):
        return f"{score:g}"
    return f"{score:.4f}" if abs(score) >= 1e-3 else f"{score:.3e}"
