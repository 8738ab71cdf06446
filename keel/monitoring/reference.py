"""Drift, data quality and model performance monitoring: Evidently's verdicts, computed fast.

Evidently's ``DataDriftPreset`` re-reads the whole reference window for every report: it
re-sorts it for every Wasserstein distance and re-counts it for every Jensen-Shannon distance.
Here the reference window is reduced once per champion to a :class:`ReferenceProfile` (for a
numeric column its exact sorted distinct values with their counts, for a categorical column its
category counts), so a daily report only sorts and counts the current day. The tests, their
selection rules and their thresholds are the ones Evidently 0.7 picks by default
(``evidently/legacy/calculations/stattests/registry.py``), and the statistics are computed the
same way, so the verdicts and the numbers equal Evidently's own on the same data.

HTML artefacts are real Evidently reports rendered on bounded, seeded samples, with the
verdicts of the full-data fast path written into the same page.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import pandas as pd

from keel import schema

SCORE = "score"
PROFILE_FORMAT = 1
PROFILE_FILE = "profile.json"
VALUES_STEM = "reference_values"
SAMPLE_STEM = "reference_sample"

# Evidently's default test selection: up to this many non-null reference rows it uses classical
# two-sample tests (K-S, chi-square, Z), above it distances (Wasserstein, Jensen-Shannon).
SMALL_REFERENCE_ROWS = 1000
# Numeric columns with at most this many distinct values (reference and current together)
# are tested like categorical ones.
FEW_DISTINCT_VALUES = 5
DEFAULT_DRIFT_SHARE = 0.5
# Evidently divides the Wasserstein distance by the reference std, floored here.
MIN_WASSERSTEIN_NORM = 0.001
# Below this product of row counts the Wasserstein CDF gaps are summed as exact integers
# (they stay below 2**53, so they convert to floats exactly); above it, as floats.
EXACT_CDF_LIMIT = 2**53

ColumnKind = Literal["numerical", "categorical"]


@dataclass(frozen=True)
class StatTest:
    """One of the drift tests Evidently picks by default, with its default threshold."""

    name: str
    display_name: str
    threshold: float
    score_kind: Literal["distance", "p_value"]
    # How Evidently compares the score with the threshold; it differs between tests.
    drifted_when: Literal[">=", "<=", "<"]

    def is_drift(self, score: float, threshold: float) -> bool:
        if self.drifted_when == ">=":
            return bool(score >= threshold)
        if self.drifted_when == "<=":
            return bool(score <= threshold)
        return bool(score < threshold)


STATTESTS = {
    test.name: test
    for test in (
        StatTest("wasserstein", "Wasserstein distance (normed)", 0.1, "distance", ">="),
        StatTest("jensenshannon", "Jensen-Shannon distance", 0.1, "distance", ">="),
        StatTest("ks", "K-S p_value", 0.05, "p_value", "<="),
        StatTest("chisquare", "chi-square p_value", 0.05, "p_value", "<"),
        StatTest("z", "Z-test p_value", 0.05, "p_value", "<"),
    )
}
_STATTEST_BY_DISPLAY_NAME = {test.display_name: test for test in STATTESTS.values()}


class ProfileError(ValueError):
    """A reference profile that is missing, unreadable or belongs to another champion."""


# --------------------------------------------------------------------------------------------
# Reference profile: everything the daily tests need, computed once per champion
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Data drift
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureDrift:
    """The drift test of one column, as Evidently's ``ValueDrift`` reports it."""

    column: str
    kind: ColumnKind
    stattest: str
    score: float
    threshold: float
    drifted: bool
    reference_rows: int
    current_rows: int

    @property
    def display_name(self) -> str:
        return STATTESTS[self.stattest].display_name

    @property
    def score_kind(self) -> str:
        return STATTESTS[self.stattest].score_kind

    @property
    def severity(self) -> float:
        """How far past its threshold the score is (above 1: drifted), comparable across tests."""
        if self.score_kind == "distance":
            return self.score / self.threshold
        return self.threshold / max(self.score, 1e-300)


@dataclass(frozen=True)
class DriftResult:
    """Per-feature drift tests and Evidently's dataset-level verdict."""

    features: tuple[FeatureDrift, ...]
    drift_share: float
    rows: int
    champion_version: str = ""
    training_set_hash: str = ""

    @property
    def drifted_features(self) -> list[str]:
        return [f.column for f in self.features if f.drifted]

    @property
    def number_of_drifted_features(self) -> int:
        return len(self.drifted_features)

    @property
    def share_of_drifted_features(self) -> float:
        return self.number_of_drifted_features / len(self.features)

    @property
    def dataset_drift(self) -> bool:
        """Evidently's rule: the share of drifted columns reaches ``drift_share``."""
        return self.share_of_drifted_features >= self.drift_share

    def feature(self, column: str) -> FeatureDrift:
        for feature in self.features:
            if feature.column == column:
                return feature
        raise KeyError(f"No drift test for column {column!r}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready form (for run metadata and the sensor)."""
        return {
            "features": [asdict(f) for f in self.features],
            "drift_share": self.drift_share,
            "rows": self.rows,
            "champion_version": self.champion_version,
            "training_set_hash": self.training_set_hash,
            "dataset_drift": self.dataset_drift,
            "share_of_drifted_features": self.share_of_drifted_features,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftResult:
        return cls(
            features=tuple(FeatureDrift(**f) for f in data["features"]),
            drift_share=data["drift_share"],
            rows=data["rows"],
            champion_version=data.get("champion_version", ""),
            training_set_hash=data.get("training_set_hash", ""),
        )

    def summary(self) -> dict[str, Any]:
        """The numbers a person checks first."""
        return {
            "dataset_drift": self.dataset_drift,
            "share_of_drifted_features": round(self.share_of_drifted_features, 4),
            "number_of_drifted_features": self.number_of_drifted_features,
            "number_of_features": len(self.features),
            "drifted_features": ", ".join(self.drifted_features) or "none",
            "rows": self.rows,
            "champion_version": self.champion_version,
        }

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the per-feature table, most drifted first."""
        header = ["feature", "type", "test", "statistic", "threshold", "drifted"]
        rows = [
            [
                f.column,
                f.kind,
                f.display_name,
                _format_score(f.score),
                f"{f.threshold:g}",
                "yes" if f.drifted else "no",
            ]
            for f in sorted(self.features, key=lambda f: -f.severity)
        ]
        return header, rows

    def to_markdown(self) -> str:
        return _markdown_table(*self.table())


def data_drift(
    profile: ReferenceProfile,
    current_frame: pd.DataFrame,
    *,
    drift_share: float = DEFAULT_DRIFT_SHARE,
    thresholds: Mapping[str, float] | None = None,
) -> DriftResult:
    """Test every profiled feature of ``current_frame`` for drift against the reference.

    Picks, per column, the test Evidently's ``DataDriftPreset`` picks by default and computes
    its statistic the same way, from the precomputed reference.

    Args:
        profile: The champion's reference profile.
        current_frame: The day's rows; extra columns are ignored.
        drift_share: Share of drifted features at which the dataset counts as drifted
            (Evidently's ``drift_share``).
        thresholds: Per-column thresholds replacing the test's default
            (Evidently's ``per_column_threshold``).

    Raises:
        ValueError: Missing or non-numeric columns, or a column with no non-null values.
    """
    _require_columns(current_frame, profile.features, "current")
    thresholds = dict(thresholds or {})
    if unknown := set(thresholds) - set(profile.features):
        raise ValueError(f"Thresholds given for columns that are not profiled: {sorted(unknown)}.")
    features = [
        _numeric_drift(
            column, ref, _numeric_column(current_frame, column, "current"), thresholds.get(column)
        )
        for column, ref in profile.numeric.items()
    ]
    features += [
        _categorical_drift(column, ref, current_frame[column], thresholds.get(column))
        for column, ref in profile.categorical.items()
    ]
    return DriftResult(
        features=tuple(features),
        drift_share=drift_share,
        rows=len(current_frame),
        champion_version=profile.champion_version,
        training_set_hash=profile.training_set_hash,
    )


def _numeric_drift(
    column: str, ref: NumericReference, current: np.ndarray, threshold: float | None
) -> FeatureDrift:
    finite = current[np.isfinite(current)]
    if finite.size == 0:
        raise ValueError(
            f"Column {column!r} has no non-null values in the current frame; "
            "it cannot be tested for drift."
        )
    few_values = ref.values.size <= FEW_DISTINCT_VALUES
    if few_values:
        current_values, current_counts = np.unique(finite, return_counts=True)
        few_values = np.union1d(ref.values, current_values).size <= FEW_DISTINCT_VALUES
    small = ref.rows <= SMALL_REFERENCE_ROWS
    if few_values:
        ref_counts = dict(zip(ref.values.tolist(), ref.counts.tolist(), strict=True))
        cur_counts = dict(zip(current_values.tolist(), current_counts.tolist(), strict=True))
        name, score = _count_test(ref_counts, cur_counts, small)
    elif small:
        from scipy.stats import ks_2samp

        name = "ks"
        score = float(ks_2samp(np.repeat(ref.values, ref.counts), finite).pvalue)
    else:
        name = "wasserstein"
        score = _wasserstein(ref, finite) / max(ref.std, MIN_WASSERSTEIN_NORM)
    return _feature_drift(column, "numerical", name, score, threshold, ref.rows, finite.size)


def _categorical_drift(
    column: str, ref: CategoricalReference, current: pd.Series, threshold: float | None
) -> FeatureDrift:
    cur_counts = _category_counts(current)
    if not cur_counts:
        raise ValueError(
            f"Column {column!r} has no non-null values in the current frame; "
            "it cannot be tested for drift."
        )
    name, score = _count_test(ref.counts, cur_counts, ref.rows <= SMALL_REFERENCE_ROWS)
    return _feature_drift(
        column, "categorical", name, score, threshold, ref.rows, sum(cur_counts.values())
    )


def _feature_drift(
    column: str,
    kind: ColumnKind,
    name: str,
    score: float,
    threshold: float | None,
    reference_rows: int,
    current_rows: int,
) -> FeatureDrift:
    test = STATTESTS[name]
    threshold = test.threshold if threshold is None else float(threshold)
    return FeatureDrift(
        column=column,
        kind=kind,
        stattest=name,
        score=float(score),
        threshold=threshold,
        drifted=test.is_drift(score, threshold),
        reference_rows=int(reference_rows),
        current_rows=int(current_rows),
    )


def _count_test(
    ref_counts: Mapping, cur_counts: Mapping, small_reference: bool
) -> tuple[str, float]:
    """Chi-square, Z or Jensen-Shannon on value counts, picked and computed as Evidently does."""
    keys = sorted(set(ref_counts) | set(cur_counts))
    ref = np.array([ref_counts.get(k, 0) for k in keys], dtype=np.float64)
    cur = np.array([cur_counts.get(k, 0) for k in keys], dtype=np.float64)
    n_ref, n_cur = ref.sum(), cur.sum()
    if not small_reference:
        from scipy.spatial import distance

        return "jensenshannon", float(distance.jensenshannon(ref / n_ref, cur / n_cur))
    if len(keys) > 2:
        from scipy.stats import chisquare

        # A value absent from the reference has an expected count of zero: p-value 0, as
        # in Evidently, without scipy's divide-by-zero warning.
        with np.errstate(divide="ignore", invalid="ignore"):
            return "chisquare", float(chisquare(cur, ref * (n_cur / n_ref))[1])
    return "z", _z_test(ref, cur, n_ref, n_cur)


def _z_test(ref: np.ndarray, cur: np.ndarray, n_ref: float, n_cur: float) -> float:
    """Evidently's two-proportion Z test: the share of rows not equal to the first value."""
    from scipy.stats import norm

    if len(ref) == 1:  # one value on both sides: nothing moved
        return 1.0
    p_ref = (n_ref - ref[0]) / n_ref
    p_cur = (n_cur - cur[0]) / n_cur
    pooled = (p_ref * n_ref + p_cur * n_cur) / (n_ref + n_cur)
    z = (p_ref - p_cur) / np.sqrt(pooled * (1 - pooled) * (1.0 / n_ref + 1.0 / n_cur))
    return float(2 * (1 - norm.cdf(np.abs(z))))


def _wasserstein(ref: NumericReference, current: np.ndarray) -> float:
    """First Wasserstein distance between the reference and ``current`` (scipy's definition).

    The integral of |F_ref - F_cur| over the merged support. The reference is already sorted
    and deduplicated, so only the current values are sorted; merging two sorted runs with a
    stable sort (timsort) costs linear time.
    """
    current = np.sort(current)
    n_ref, n_cur = ref.rows, current.size
    values = np.concatenate((ref.values, current))
    order = np.argsort(values, kind="stable")
    values = values[order]
    if n_ref * n_cur < EXACT_CDF_LIMIT:
        # CDF gaps scaled by n_ref * n_cur are integers: exact cumulative sums.
        steps = np.concatenate((ref.counts * n_cur, np.full(n_cur, -n_ref, dtype=np.int64)))
        np.cumsum(steps[order], out=steps)
        gaps = np.abs(steps[:-1]).astype(np.float64)
        return float(np.dot(gaps, np.diff(values))) / (n_ref * n_cur)
    steps_f = np.concatenate((ref.counts / n_ref, np.full(n_cur, -1.0 / n_cur)))[order]
    return float(np.dot(np.abs(np.cumsum(steps_f)[:-1]), np.diff(values)))


def prediction_drift(
    profile: ReferenceProfile,
    current_scores: Sequence[float] | np.ndarray | pd.Series,
    *,
    threshold: float | None = None,
) -> PredictionDrift:
    """Test the day's scores for drift against the champion's scores on the reference window.

    Raises:
        ProfileError: The profile was built without reference scores.
        ValueError: Scores that are not numbers in [0, 1], or none at all.
    """
    if profile.scores is None:
        raise ProfileError(
            "The reference profile has no scores; build it with reference_scores= "
            "(the champion's scores on the reference window)."
        )
    scores = _scores_array(current_scores, "current scores")
    drift = _numeric_drift(SCORE, profile.scores, scores, threshold)
    return PredictionDrift(
        drift=drift,
        reference_mean=profile.scores.mean,
        current_mean=float(np.nanmean(scores)),
        rows=int(scores.size),
    )


@dataclass(frozen=True)
class PredictionDrift:
    """Drift of the model's scores, with the mean score before and now."""

    drift: FeatureDrift
    reference_mean: float
    current_mean: float
    rows: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drifted": self.drift.drifted}


# --------------------------------------------------------------------------------------------
# Data quality
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnQuality:
    """Quality figures of one feature on the day, next to the reference's."""

    column: str
    kind: ColumnKind
    missing_share: float
    reference_missing_share: float
    out_of_range_share: float | None = None
    new_categories: dict[str, int] = field(default_factory=dict)
    new_category_share: float | None = None


@dataclass(frozen=True)
class QualityResult:
    """Row count, per-column quality figures and the issues found."""

    rows: int
    columns: tuple[ColumnQuality, ...]
    missing_columns: tuple[str, ...]
    issues: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.issues

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def table(self) -> tuple[list[str], list[list[str]]]:
        header = ["feature", "missing", "reference missing", "out of range", "new categories"]
        rows = [
            [
                c.column,
                f"{c.missing_share:.2%}",
                f"{c.reference_missing_share:.2%}",
                "" if c.out_of_range_share is None else f"{c.out_of_range_share:.2%}",
                ", ".join(f"{k} ({v})" for k, v in c.new_categories.items()),
            ]
            for c in self.columns
        ]
        return header, rows

    def to_markdown(self) -> str:
        return _markdown_table(*self.table())


def data_quality(
    current_frame: pd.DataFrame,
    profile: ReferenceProfile,
    *,
    max_missing_increase: float = 0.05,
    max_out_of_range_share: float = 0.01,
    max_new_category_share: float = 0.0,
    min_rows: int = 1,
) -> QualityResult:
    """Null shares, values outside the reference range, new categories and the row count.

    Missing is null or infinite (what Evidently drops). Out of range is a finite value below
    the reference minimum or above its maximum. Schema breaks (a missing column, a numeric
    column that is not numeric) are reported as issues, not raised, since finding them is
    this check's job.

    Args:
        current_frame: The day's rows.
        profile: The champion's reference profile.
        max_missing_increase: Issue when a column's missing share exceeds the reference's by
            more than this.
        max_out_of_range_share: Issue when more rows than this share fall outside the range.
        max_new_category_share: Issue when more rows than this share hold unseen categories.
        min_rows: Issue when the day has fewer rows.
    """
    rows = len(current_frame)
    issues: list[str] = []
    if rows < min_rows:
        issues.append(f"{rows} rows, fewer than the {min_rows} expected")
    missing_columns = tuple(c for c in profile.features if c not in current_frame.columns)
    issues += [f"{c}: column missing" for c in missing_columns]
    columns: list[ColumnQuality] = []
    denominator = max(rows, 1)
    for column, ref in profile.numeric.items():
        if column in missing_columns:
            continue
        if not _is_numeric(current_frame[column]):
            issues.append(f"{column}: not numeric (dtype {current_frame[column].dtype})")
            continue
        values = current_frame[column].to_numpy(dtype=np.float64, na_value=np.nan)
        finite = np.isfinite(values)
        in_range_values = values[finite]
        outside = np.count_nonzero(
            (in_range_values < ref.minimum) | (in_range_values > ref.maximum)
        )
        quality = ColumnQuality(
            column=column,
            kind="numerical",
            missing_share=float((rows - np.count_nonzero(finite)) / denominator),
            reference_missing_share=ref.missing_share,
            out_of_range_share=float(outside / denominator),
        )
        columns.append(quality)
        if quality.out_of_range_share > max_out_of_range_share:
            issues.append(
                f"{column}: {quality.out_of_range_share:.2%} of rows outside the reference "
                f"range [{ref.minimum:g}, {ref.maximum:g}]"
            )
        _check_missing(quality, max_missing_increase, issues)
    for column, ref in profile.categorical.items():
        if column in missing_columns:
            continue
        counts = _category_counts(current_frame[column])
        new = {k: v for k, v in sorted(counts.items()) if k not in ref.counts}
        quality = ColumnQuality(
            column=column,
            kind="categorical",
            missing_share=float((rows - sum(counts.values())) / denominator),
            reference_missing_share=ref.missing_share,
            new_categories=new,
            new_category_share=float(sum(new.values()) / denominator),
        )
        columns.append(quality)
        if quality.new_category_share > max_new_category_share:
            issues.append(f"{column}: categories unseen in the reference: {sorted(new)}")
        _check_missing(quality, max_missing_increase, issues)
    return QualityResult(
        rows=rows,
        columns=tuple(columns),
        missing_columns=missing_columns,
        issues=tuple(issues),
    )


def _check_missing(quality: ColumnQuality, max_increase: float, issues: list[str]) -> None:
    if quality.missing_share - quality.reference_missing_share > max_increase:
        issues.append(
            f"{quality.column}: {quality.missing_share:.2%} missing, reference "
            f"{quality.reference_missing_share:.2%}"
        )


# --------------------------------------------------------------------------------------------
# Performance, once the late labels have arrived
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of the reliability table: predicted versus observed default rate."""

    lower: float
    upper: float
    rows: int
    mean_score: float | None
    observed_rate: float | None


@dataclass(frozen=True)
class PerformanceResult:
    """Discrimination and calibration of the day's scores against the arrived labels.

    ``auc`` is None when the day has a single class, ``precision`` when no row scores above
    the threshold and ``recall`` when there are no positives: undefined, not zero.
    """

    rows: int
    positives: int
    threshold: float
    auc: float | None
    precision: float | None
    recall: float | None
    brier: float
    expected_calibration_error: float
    calibration: tuple[CalibrationBin, ...]

    @property
    def prevalence(self) -> float:
        return self.positives / self.rows

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prevalence": self.prevalence}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerformanceResult:
        fields = {k: v for k, v in data.items() if k != "prevalence"}
        fields["calibration"] = tuple(CalibrationBin(**b) for b in data["calibration"])
        return cls(**fields)

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "positives": self.positives,
            "auc": self.auc,
            "precision": self.precision,
            "recall": self.recall,
            "brier": round(self.brier, 6),
            "expected_calibration_error": round(self.expected_calibration_error, 6),
        }

    def calibration_table(self) -> tuple[list[str], list[list[str]]]:
        header = ["scores", "rows", "mean score", "observed rate"]
        rows = [
            [
                f"{b.lower:.2f}-{b.upper:.2f}",
                str(b.rows),
                "" if b.mean_score is None else f"{b.mean_score:.3f}",
                "" if b.observed_rate is None else f"{b.observed_rate:.3f}",
            ]
            for b in self.calibration
        ]
        return header, rows

    def calibration_markdown(self) -> str:
        return _markdown_table(*self.calibration_table())


def performance(
    scores: Sequence[float] | np.ndarray | pd.Series,
    labels: Sequence[int] | np.ndarray | pd.Series,
    *,
    threshold: float = 0.5,
    bins: int = 10,
) -> PerformanceResult:
    """AUC, precision and recall at ``threshold``, Brier score and a reliability table.

    A row is predicted positive when its score is at least ``threshold``. The reliability
    table has ``bins`` equal-width bins over [0, 1], assigned as scikit-learn's
    ``calibration_curve`` assigns them.

    Raises:
        ValueError: Lengths that differ, no rows, scores outside [0, 1] or null, labels
            other than 0 and 1.
    """
    from scipy.stats import rankdata

    score_array = _scores_array(scores, "scores")
    label_array = np.asarray(labels)
    if score_array.size != label_array.size:
        raise ValueError(f"{score_array.size} scores but {label_array.size} labels.")
    if score_array.size == 0:
        raise ValueError("No rows with labels; performance needs at least one.")
    if np.isnan(score_array).any():
        raise ValueError("Scores contain nulls; score every labelled row.")
    if not np.isin(label_array, (0, 1)).all():
        raise ValueError(f"Labels must be 0 or 1, found {sorted(set(label_array.tolist()))}.")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}.")
    positive = label_array.astype(bool)
    rows, positives = int(score_array.size), int(positive.sum())
    negatives = rows - positives
    auc = None
    if positives and negatives:
        # Mann-Whitney U with average ranks for ties: the area under the ROC curve.
        rank_sum = float(rankdata(score_array)[positive].sum())
        auc = (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)
    predicted = score_array >= threshold
    true_positives = int(np.count_nonzero(predicted & positive))
    predicted_positives = int(np.count_nonzero(predicted))
    edges = np.linspace(0.0, 1.0, bins + 1)
    bin_ids = np.searchsorted(edges[1:-1], score_array)
    counts = np.bincount(bin_ids, minlength=bins)
    score_sums = np.bincount(bin_ids, weights=score_array, minlength=bins)
    label_sums = np.bincount(bin_ids, weights=positive, minlength=bins)
    calibration = tuple(
        CalibrationBin(
            lower=float(edges[i]),
            upper=float(edges[i + 1]),
            rows=int(counts[i]),
            mean_score=float(score_sums[i] / counts[i]) if counts[i] else None,
            observed_rate=float(label_sums[i] / counts[i]) if counts[i] else None,
        )
        for i in range(bins)
    )
    return PerformanceResult(
        rows=rows,
        positives=positives,
        threshold=float(threshold),
        auc=auc,
        precision=true_positives / predicted_positives if predicted_positives else None,
        recall=true_positives / positives if positives else None,
        brier=float(np.mean((score_array - positive) ** 2)),
        expected_calibration_error=float(np.abs(score_sums - label_sums).sum() / rows),
        calibration=calibration,
    )


# --------------------------------------------------------------------------------------------
# Retraining decision (called by the drift and performance sensors)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainPolicy:
    """When a day's monitoring result calls for retraining.

    Attributes:
        drift_share: Retrain when at least this share of features drifted; None uses
            Evidently's dataset-level verdict (the result's own ``drift_share``).
        critical_features: Features whose drift alone calls for retraining.
        min_rows: Days with fewer rows never trigger: their tests are too noisy.
        min_auc: Retrain when the measured AUC falls below this; None ignores performance.
    """

    drift_share: float | None = None
    critical_features: tuple[str, ...] = ()
    min_rows: int = 1000
    min_auc: float | None = None


@dataclass(frozen=True)
class RetrainDecision:
    """Whether to retrain, and why (for the sensor's log and the run tags)."""

    retrain: bool
    reason: str


def should_retrain(
    result: DriftResult | PerformanceResult, policy: RetrainPolicy | None = None
) -> RetrainDecision:
    """Decide whether a day's drift or performance result calls for retraining."""
    policy = policy or RetrainPolicy()
    if result.rows < policy.min_rows:
        return RetrainDecision(False, f"{result.rows} rows, fewer than {policy.min_rows}")
    if isinstance(result, PerformanceResult):
        if policy.min_auc is None:
            return RetrainDecision(False, "the policy does not watch performance")
        if result.auc is None:
            return RetrainDecision(False, "AUC undefined: the labelled rows hold one class")
        if result.auc < policy.min_auc:
            return RetrainDecision(True, f"AUC {result.auc:.4f} below {policy.min_auc}")
        return RetrainDecision(False, f"AUC {result.auc:.4f} at or above {policy.min_auc}")
    if critical := [c for c in policy.critical_features if c in result.drifted_features]:
        return RetrainDecision(True, f"critical features drifted: {', '.join(critical)}")
    share = result.share_of_drifted_features
    limit = result.drift_share if policy.drift_share is None else policy.drift_share
    drifted = ", ".join(result.drifted_features) or "none"
    reason = f"{share:.0%} of features drifted (limit {limit:.0%}): {drifted}"
    return RetrainDecision(share >= limit, reason)


# --------------------------------------------------------------------------------------------
# Evidently itself: the reference implementation, and the HTML artefacts
# --------------------------------------------------------------------------------------------


def evidently_data_drift(
    reference_frame: pd.DataFrame,
    current_frame: pd.DataFrame,
    numeric: Sequence[str],
    categorical: Sequence[str],
    *,
    drift_share: float = DEFAULT_DRIFT_SHARE,
) -> DriftResult:
    """Run a fresh Evidently ``Report([DataDriftPreset()])`` and read its verdicts.

    This is Evidently's default use, kept to check the fast path and to benchmark against it.
    """
    snapshot = _run_evidently_drift(
        reference_frame, current_frame, numeric, categorical, drift_share=drift_share
    )
    return drift_result_from_snapshot(
        snapshot, numeric, drift_share=drift_share, rows=len(current_frame)
    )


def _run_evidently_drift(
    reference_frame: pd.DataFrame,
    current_frame: pd.DataFrame,
    numeric: Sequence[str],
    categorical: Sequence[str],
    *,
    drift_share: float = DEFAULT_DRIFT_SHARE,
    summary: bool = False,
) -> Any:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset, DataSummaryPreset

    definition = DataDefinition(
        numerical_columns=list(numeric), categorical_columns=list(categorical)
    )
    columns = [*numeric, *categorical]
    metrics: list[Any] = [DataDriftPreset(drift_share=drift_share)]
    if summary:
        metrics.append(DataSummaryPreset())
    return Report(metrics, include_tests=True).run(
        Dataset.from_pandas(current_frame[columns], data_definition=definition),
        Dataset.from_pandas(reference_frame[columns], data_definition=definition),
    )


def drift_result_from_snapshot(
    snapshot: Any, numeric: Iterable[str], *, drift_share: float, rows: int
) -> DriftResult:
    """Per-column verdicts of an Evidently snapshot run with ``include_tests=True``."""
    numeric = set(numeric)
    report = snapshot.dict()
    scores: dict[str, tuple[str, float, float]] = {}
    for metric in report["metrics"]:
        config = metric["config"]
        if config.get("type") == "evidently:metric_v2:ValueDrift":
            test = _STATTEST_BY_DISPLAY_NAME[config["method"]]
            scores[config["column"]] = (test.name, float(metric["value"]), config["threshold"])
    drifted: dict[str, bool] = {}
    for test in report["tests"]:
        params = test["metric_config"]["params"]
        if params.get("type") == "evidently:metric_v2:ValueDrift":
            drifted[params["column"]] = test["status"] == "FAIL"
    if set(drifted) != set(scores):
        raise ValueError(
            "The Evidently snapshot lacks drift tests; run it with include_tests=True."
        )
    return DriftResult(
        features=tuple(
            FeatureDrift(
                column=column,
                kind="numerical" if column in numeric else "categorical",
                stattest=name,
                score=score,
                threshold=threshold,
                drifted=drifted[column],
                reference_rows=0,
                current_rows=0,
            )
            for column, (name, score, threshold) in scores.items()
        ),
        drift_share=drift_share,
        rows=rows,
    )


def write_drift_report(
    path: Path | str | Any,
    profile: ReferenceProfile,
    current_frame: pd.DataFrame,
    drift: DriftResult,
    *,
    prediction: PredictionDrift | None = None,
    quality: QualityResult | None = None,
    title: str = "Keel drift and data quality report",
    sample_rows: int = 5000,
    seed: int = 0,
) -> Path | Any:
    """Write an Evidently drift + data summary report as HTML, with the full-data verdicts.

    Evidently runs on the profile's reference sample and a seeded sample of at most
    ``sample_rows`` current rows, so the page stays fast to make at any size; the verdicts on
    every row (``drift``, and ``prediction`` and ``quality`` when given) head the page.
    """
    numeric = list(profile.numeric)
    if SCORE in profile.sample and SCORE in current_frame and SCORE not in numeric:
        numeric.append(SCORE)
    current_sample = _sample(current_frame[[*numeric, *profile.categorical]], sample_rows, seed)
    snapshot = _run_evidently_drift(
        profile.sample,
        current_sample,
        numeric,
        list(profile.categorical),
        drift_share=drift.drift_share,
        summary=True,
    )
    sample_verdicts = drift_result_from_snapshot(
        snapshot, numeric, drift_share=drift.drift_share, rows=len(current_sample)
    )
    agreement = sum(sample_verdicts.feature(f.column).drifted == f.drifted for f in drift.features)
    parts = [
        f"<h2>{html.escape(title)}</h2>",
        _html_facts(
            {
                "champion version": profile.champion_version,
                "training set": profile.training_set_hash,
                "rows tested": drift.rows,
                "dataset drift": "yes" if drift.dataset_drift else "no",
                "drifted features": f"{drift.number_of_drifted_features} of "
                f"{len(drift.features)} ({drift.share_of_drifted_features:.0%}; "
                f"dataset drift from {drift.drift_share:.0%})",
            }
        ),
        "<h3>Drift on every row</h3>",
        _html_table(*drift.table()),
    ]
    if prediction is not None:
        d = prediction.drift
        parts += [
            "<h3>Prediction drift</h3>",
            _html_facts(
                {
                    "test": d.display_name,
                    "statistic": _format_score(d.score),
                    "threshold": f"{d.threshold:g}",
                    "drifted": "yes" if d.drifted else "no",
                    "mean score": f"{prediction.current_mean:.4f} "
                    f"(reference {prediction.reference_mean:.4f})",
                }
            ),
        ]
    if quality is not None:
        parts += [
            "<h3>Data quality</h3>",
            _html_facts({"rows": quality.rows, "issues": "; ".join(quality.issues) or "none"}),
            _html_table(*quality.table()),
        ]
    parts.append(
        f"<p>The Evidently report below is computed on samples ({len(profile.sample)} "
        f"reference rows, {len(current_sample)} current rows, seed {seed}); its per-feature "
        f"verdicts agree with the full-data ones above on {agreement} of "
        f"{len(drift.features)} features.</p>"
    )
    return _save_with_section(snapshot, _as_path(path), "\n".join(parts))


def write_performance_report(
    path: Path | str | Any,
    scores: Sequence[float] | np.ndarray | pd.Series,
    labels: Sequence[int] | np.ndarray | pd.Series,
    result: PerformanceResult,
    *,
    title: str = "Keel model performance report",
    sample_rows: int = 20000,
    seed: int = 0,
) -> Path | Any:
    """Write an Evidently classification report as HTML, headed by the full-data figures."""
    from evidently import BinaryClassification, DataDefinition, Dataset, Report
    from evidently.presets import ClassificationPreset

    frame = pd.DataFrame(
        {SCORE: _scores_array(scores, "scores"), schema.LABEL: np.asarray(labels).astype(int)}
    )
    sample = _sample(frame, sample_rows, seed)
    figures = {k: ("undefined" if v is None else v) for k, v in result.summary().items()}
    header = [
        f"<h2>{html.escape(title)}</h2>",
        _html_facts({**figures, "threshold": result.threshold}),
        "<h3>Reliability (all rows)</h3>",
        _html_table(*result.calibration_table()),
    ]
    if sample[schema.LABEL].nunique() < 2:
        # Evidently's classification metrics need both classes; a day whose few labels are all
        # one class still gets its page, with the figures that are defined.
        page = "\n".join(
            [
                f"<html><head><meta charset='utf-8'><style>{_SECTION_CSS}</style></head><body>",
                '<section class="keel-verdicts">',
                *header,
                "<p>Every labelled row holds the same class: no classification report.</p>",
                "</section></body></html>",
            ]
        )
        target = _as_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_file(target, lambda out: out.write(page.encode()))
        return target
    definition = DataDefinition(
        classification=[
            BinaryClassification(target=schema.LABEL, prediction_probas=SCORE, pos_label=1)
        ],
        numerical_columns=[SCORE],
        categorical_columns=[schema.LABEL],
    )
    snapshot = Report([ClassificationPreset(probas_threshold=result.threshold)]).run(
        Dataset.from_pandas(sample, data_definition=definition), None
    )
    section = "\n".join(
        [
            *header,
            f"<p>The Evidently report below is computed on {len(sample)} of {len(frame)} "
            f"rows (seed {seed}).</p>",
        ]
    )
    return _save_with_section(snapshot, _as_path(path), section)


def _save_with_section(snapshot: Any, path: Path | Any, section: str) -> Path | Any:
    """Save the Evidently page with ``section`` above its dashboard."""
    page = snapshot.get_html_str(as_iframe=False)
    marker = '<div id="root_'
    if marker not in page:
        raise RuntimeError("Evidently's HTML layout changed: no dashboard root to insert before.")
    block = f'<style>{_SECTION_CSS}</style><section class="keel-verdicts">{section}</section>\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    page = page.replace(marker, block + marker, 1)
    _write_file(path, lambda out: out.write(page.encode()))
    return path


_SECTION_CSS = (
    ".keel-verdicts{font-family:sans-serif;margin:16px 24px;max-width:1100px}"
    ".keel-verdicts table{border-collapse:collapse}"
    ".keel-verdicts td,.keel-verdicts th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
)


def _html_facts(facts: Mapping[str, Any]) -> str:
    items = "".join(
        f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in facts.items()
    )
    return f"<ul>{items}</ul>"


def _markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def plot_drift(
    path: Path | str | Any,
    profile: ReferenceProfile,
    current_frame: pd.DataFrame,
    drift: DriftResult,
    *,
    top: int = 4,
) -> Path | Any:
    """Draw reference versus current distributions of the most drifted features as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ranked = sorted(drift.features, key=lambda f: -f.severity)[: max(top, 1)]
    figure = Figure(figsize=(4.2 * len(ranked), 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(ranked), squeeze=False)[0]
    for axis, feature in zip(axes, ranked, strict=True):
        if feature.kind == "numerical":
            ref = profile.numeric[feature.column]
            current = _numeric_column(current_frame, feature.column, "current")
            current = current[np.isfinite(current)]
            # The central 99% of both sides: long tails would squash the shapes into one bin.
            low, high = ref.quantile(0.005), ref.quantile(0.995)
            if current.size:
                current_low, current_high = np.quantile(current, [0.005, 0.995])
                low, high = min(low, float(current_low)), max(high, float(current_high))
            edges = np.linspace(low, high if high > low else low + 1.0, 41)
            axis.stairs(
                np.histogram(ref.values, edges, weights=ref.counts)[0] / ref.rows,
                edges,
                label="reference",
            )
            axis.stairs(
                np.histogram(current, edges)[0] / max(current.size, 1), edges, label="current"
            )
            axis.set_xlabel("central 99% of values", fontsize=8)
        else:
            ref = profile.categorical[feature.column]
            current_counts = _category_counts(current_frame[feature.column])
            keys = sorted(set(ref.counts) | set(current_counts))
            positions = np.arange(len(keys))
            current_rows = max(sum(current_counts.values()), 1)
            axis.bar(
                positions - 0.2,
                [ref.counts.get(k, 0) / ref.rows for k in keys],
                0.4,
                label="reference",
            )
            axis.bar(
                positions + 0.2,
                [current_counts.get(k, 0) / current_rows for k in keys],
                0.4,
                label="current",
            )
            axis.set_xticks(positions, keys, rotation=30)
        verdict = "drifted" if feature.drifted else "no drift"
        axis.set_title(
            f"{feature.column}\n{feature.stattest} {_format_score(feature.score)} ({verdict})",
            fontsize=9,
        )
        axis.set_ylabel("share of rows")
        axis.legend(fontsize=8)
    path = _as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_file(path, lambda out: figure.savefig(out, format="png", dpi=90))
    return path


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


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
