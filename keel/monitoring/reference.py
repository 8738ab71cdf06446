"""Reference profile: everything the daily tests need, computed once per champion."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel import schema
from keel.monitoring.common import (
    SCORE,
    _category_counts,
    _numeric_column,
    _require_columns,
    _scores_array,
    _write_file,
)

PROFILE_FORMAT = 1
PROFILE_FILE = "profile.json"
VALUES_STEM = "reference_values"
SAMPLE_STEM = "reference_sample"


class ProfileError(ValueError):
    """A reference profile that is missing, unreadable or belongs to another champion."""


@dataclass(frozen=True)
class NumericReference:
    """A numeric reference column: its exact distribution as sorted distinct values and counts."""

    values: np.ndarray
    counts: np.ndarray
    total_rows: int
    mean: float
    std: float

    @classmethod
    def from_values(cls, raw: np.ndarray, column: str) -> NumericReference:
        finite = raw[np.isfinite(raw)]
        if finite.size == 0:
            raise ValueError(
                f"Reference column {column!r} has no finite values; a drift test needs some."
            )
        values, counts = np.unique(finite, return_counts=True)
        # np.std over the values in their original order, exactly as Evidently normalises.
        return cls(
            values=values,
            counts=counts.astype(np.int64),
            total_rows=int(raw.size),
            mean=float(np.mean(finite)),
            std=float(np.std(finite)),
        )

    @property
    def rows(self) -> int:
        """Non-null, finite rows: the ones Evidently tests."""
        return int(self.counts.sum())

    @property
    def missing_share(self) -> float:
        return 1.0 - self.rows / self.total_rows

    @property
    def minimum(self) -> float:
        return float(self.values[0])

    @property
    def maximum(self) -> float:
        return float(self.values[-1])

    def quantile(self, q: float) -> float:
        """The smallest reference value with at least a share ``q`` of rows at or below it."""
        position = np.searchsorted(np.cumsum(self.counts), q * self.rows, side="left")
        return float(self.values[min(position, self.values.size - 1)])


@dataclass(frozen=True)
class CategoricalReference:
    """A categorical reference column: how often each category occurs."""

    counts: dict[str, int]
    total_rows: int

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    @property
    def missing_share(self) -> float:
        return 1.0 - self.rows / self.total_rows


@dataclass(frozen=True)
class ReferenceProfile:
    """The reference window of one champion, reduced to what the daily reports need.

    Attributes:
        champion_version: Registry version of the champion the window belongs to.
        training_set_hash: Hash of the champion's training set the window was taken from.
        created_at: When the profile was built (UTC, ISO 8601).
        numeric: Per numeric feature, its exact distribution.
        categorical: Per categorical feature, its category counts.
        scores: The champion's scores on the reference window, for prediction drift.
        sample: A bounded, seeded sample of reference rows for the HTML reports.
    """

    champion_version: str
    training_set_hash: str
    created_at: str
    numeric: dict[str, NumericReference]
    categorical: dict[str, CategoricalReference]
    scores: NumericReference | None
    sample: pd.DataFrame = field(repr=False)

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    @property
    def reference_rows(self) -> int:
        """Rows in the reference window, nulls included."""
        first = next(iter({**self.numeric, **self.categorical}.values()))
        return first.total_rows

    def save(self, folder: Path | Any) -> Path | Any:
        """Write the profile into ``folder`` (a local path or a UPath); returns the JSON file.

        The data files carry a fresh token in their names and the JSON file, written last,
        names them: a reader sees the previous complete profile or the new one, never a mix.
        """
        arrays: dict[str, np.ndarray] = {}
        numeric_meta: dict[str, dict] = {}
        for index, (column, ref) in enumerate(self.numeric.items()):
            numeric_meta[column] = _numeric_meta(ref, f"numeric_{index}", arrays)
        scores_meta = _numeric_meta(self.scores, "scores", arrays) if self.scores else None
        meta = {
            "format": PROFILE_FORMAT,
            "champion_version": self.champion_version,
            "training_set_hash": self.training_set_hash,
            "created_at": self.created_at,
            "numeric": numeric_meta,
            "categorical": {
                column: {"counts": ref.counts, "total_rows": ref.total_rows}
                for column, ref in self.categorical.items()
            },
            "scores": scores_meta,
        }
        token = uuid.uuid4().hex[:12]
        meta["values_file"] = f"{VALUES_STEM}-{token}.npz"
        meta["sample_file"] = f"{SAMPLE_STEM}-{token}.parquet"
        folder.mkdir(parents=True, exist_ok=True)
        _write_file(folder / meta["values_file"], lambda out: np.savez(out, **arrays))
        _write_file(
            folder / meta["sample_file"], lambda out: self.sample.to_parquet(out, index=False)
        )
        target = folder / PROFILE_FILE
        _write_file(target, lambda out: out.write(json.dumps(meta, indent=1).encode()))
        for stale in folder.iterdir():
            if stale.name.startswith((VALUES_STEM, SAMPLE_STEM)) and stale.name not in (
                meta["values_file"],
                meta["sample_file"],
            ):
                stale.unlink()
        return target

    @classmethod
    def load(
        cls,
        folder: Path | Any,
        *,
        champion_version: str | None = None,
        training_set_hash: str | None = None,
    ) -> ReferenceProfile:
        """Read a profile saved by :meth:`save`, optionally checking whose it is.

        Raises:
            ProfileError: No complete profile in ``folder``, an unknown format, or one built
                for another champion version or training set than the ones given.
        """
        meta_file = folder / PROFILE_FILE
        if not meta_file.exists():
            raise ProfileError(
                f"No reference profile in {folder}: build one with build_reference_profile() "
                "and save it there."
            )
        meta = json.loads(meta_file.read_bytes())
        if meta.get("format") != PROFILE_FORMAT:
            raise ProfileError(
                f"Reference profile in {folder} has format {meta.get('format')!r}; this Keel "
                f"reads format {PROFILE_FORMAT}. Rebuild it."
            )
        for name, expected in (
            ("champion_version", champion_version),
            ("training_set_hash", training_set_hash),
        ):
            if expected is not None and meta[name] != expected:
                raise ProfileError(
                    f"Reference profile in {folder} belongs to {name}={meta[name]!r}, "
                    f"not {expected!r}; build a profile for the current champion."
                )
        values_file = folder / meta["values_file"]
        source = (
            values_file if isinstance(values_file, Path) else io.BytesIO(values_file.read_bytes())
        )
        with np.load(source, allow_pickle=False) as arrays:
            numeric = {
                column: _numeric_from_meta(m, arrays) for column, m in meta["numeric"].items()
            }
            scores = _numeric_from_meta(meta["scores"], arrays) if meta["scores"] else None
        sample = pd.read_parquet(io.BytesIO((folder / meta["sample_file"]).read_bytes()))
        return cls(
            champion_version=meta["champion_version"],
            training_set_hash=meta["training_set_hash"],
            created_at=meta["created_at"],
            numeric=numeric,
            categorical={
                column: CategoricalReference(counts=m["counts"], total_rows=m["total_rows"])
                for column, m in meta["categorical"].items()
            },
            scores=scores,
            sample=sample,
        )


def _numeric_meta(ref: NumericReference, key: str, arrays: dict[str, np.ndarray]) -> dict:
    arrays[f"{key}_values"] = ref.values
    arrays[f"{key}_counts"] = ref.counts
    return {"key": key, "total_rows": ref.total_rows, "mean": ref.mean, "std": ref.std}


def _numeric_from_meta(meta: dict, arrays: Any) -> NumericReference:
    return NumericReference(
        values=arrays[f"{meta['key']}_values"],
        counts=arrays[f"{meta['key']}_counts"],
        total_rows=meta["total_rows"],
        mean=meta["mean"],
        std=meta["std"],
    )


def build_reference_profile(
    reference_frame: pd.DataFrame,
    numeric: Sequence[str] = schema.NUMERIC_FEATURES,
    categorical: Sequence[str] = schema.CATEGORICAL_FEATURES,
    *,
    champion_version: str,
    training_set_hash: str,
    reference_scores: Sequence[float] | np.ndarray | pd.Series | None = None,
    sample_rows: int = 5000,
    seed: int = 0,
) -> ReferenceProfile:
    """Reduce the champion's reference window to what the daily drift and quality tests need.

    Args:
        reference_frame: The reference window, taken from the champion's training set.
        numeric: Numeric feature columns.
        categorical: Categorical feature columns (strings).
        champion_version: Registry version of the champion; recorded in the profile.
        training_set_hash: Hash of the champion's training set; recorded in the profile.
        reference_scores: The champion's scores on the reference rows, in the same order;
            needed for :func:`prediction_drift`.
        sample_rows: How many reference rows to keep for the HTML reports.
        seed: Seed of that sample.

    Raises:
        ValueError: Missing or non-numeric columns, an empty window, or scores whose length
            differs from the window's.
    """
    columns = [*numeric, *categorical]
    _require_columns(reference_frame, columns, "reference")
    if len(reference_frame) == 0:
        raise ValueError("The reference frame has no rows; a profile needs a reference window.")
    if overlap := set(numeric) & set(categorical):
        raise ValueError(f"Columns listed as both numeric and categorical: {sorted(overlap)}.")
    numeric_refs = {
        column: NumericReference.from_values(
            _numeric_column(reference_frame, column, "reference"), column
        )
        for column in numeric
    }
    categorical_refs = {}
    for column in categorical:
        counts = _category_counts(reference_frame[column])
        if not counts:
            raise ValueError(f"Reference column {column!r} has only nulls; it cannot be tested.")
        categorical_refs[column] = CategoricalReference(
            counts=counts, total_rows=len(reference_frame)
        )
    sample = reference_frame[columns]
    scores_ref = None
    if reference_scores is not None:
        scores = _scores_array(reference_scores, "reference scores")
        if scores.size != len(reference_frame):
            raise ValueError(
                f"{scores.size} reference scores for {len(reference_frame)} reference rows; "
                "pass one score per row."
            )
        scores_ref = NumericReference.from_values(scores, SCORE)
        sample = sample.assign(**{SCORE: scores})
    if len(sample) > sample_rows:
        sample = sample.sample(n=sample_rows, random_state=seed).sort_index()
    return ReferenceProfile(
        champion_version=champion_version,
        training_set_hash=training_set_hash,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        numeric=numeric_refs,
        categorical=categorical_refs,
        scores=scores_ref,
        sample=sample.reset_index(drop=True),
    )


def ensure_reference_profile(
    folder: Path | Any,
    *,
    champion_version: str,
    training_set_hash: str,
    build: Callable[[], ReferenceProfile],
) -> tuple[ReferenceProfile, bool]:
    """Load the champion's saved profile, or build and save it the first time.

    Returns:
        The profile and whether it was built now (False: loaded from ``folder``).
    """
    try:
        return (
            ReferenceProfile.load(
                folder, champion_version=champion_version, training_set_hash=training_set_hash
            ),
            False,
        )
    except ProfileError:
        pass
    profile = build()
    if (profile.champion_version, profile.training_set_hash) != (
        champion_version,
        training_set_hash,
    ):
        raise ProfileError(
            f"build() made a profile for {profile.champion_version!r} / "
            f"{profile.training_set_hash!r}, expected {champion_version!r} / "
            f"{training_set_hash!r}."
        )
    profile.save(folder)
    return profile, True


def read_reference_window(
    training_set: Path | str,
    numeric: Sequence[str] = schema.NUMERIC_FEATURES,
    categorical: Sequence[str] = schema.CATEGORICAL_FEATURES,
    *,
    days: int | None = None,
    max_rows: int | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Read the reference window from the champion's training set (Parquet).

    Args:
        training_set: The training set file, with the feature columns and ``event_timestamp``.
        numeric: Numeric feature columns to read.
        categorical: Categorical feature columns to read.
        days: Keep only the last ``days`` days of the training set (all of it when None).
        max_rows: Keep a seeded sample of at most this many rows (all when None).
        seed: Seed of that sample.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    columns = [*numeric, *categorical, schema.EVENT_TIMESTAMP]
    available = pq.read_schema(training_set).names
    if missing := [c for c in columns if c not in available]:
        raise ValueError(f"Training set {training_set} lacks columns {missing}.")
    table = pq.read_table(training_set, columns=columns)
    if days is not None:
        if days < 1:
            raise ValueError(f"days must be at least 1, got {days}.")
        latest = pc.max(table[schema.EVENT_TIMESTAMP]).as_py()
        if latest is None:
            raise ValueError(f"Training set {training_set} has no event timestamps.")
        cutoff = pd.Timestamp(latest) - pd.Timedelta(days=days)
        table = table.filter(pc.greater(table[schema.EVENT_TIMESTAMP], cutoff.to_pydatetime()))
    frame = table.to_pandas()
    if max_rows is not None and len(frame) > max_rows:
        frame = frame.sample(n=max_rows, random_state=seed).sort_index().reset_index(drop=True)
    return frame
