"""Checks on a dataset's training set as a whole: leakage, label timing, stable composition.

Row rules catch a bad row; these catch a bad dataset. A declared leakage column among the
features, or a feature value stamped after the moment the label's outcome started, makes every
score optimistic. A source that silently changed what it keeps (only defaulters after some
date, say) passes every row rule but moves the label rate or a key feature's mean out of its
declared bounds for that period.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from keel.datasets.spec import DatasetSpec

FEATURE_TIME = "__feature_time"


@dataclass(frozen=True)
class GuardResult:
    """What the guards found: each failure in words, and the figures per period."""

    failures: list[str] = field(default_factory=list)
    periods: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def leakage_failures(
    spec: DatasetSpec,
    training: pd.DataFrame,
    features: list[str],
    feature_times: pd.DataFrame | None = None,
) -> list[str]:
    """Declared leakage columns among ``features``; feature rows stamped after the outcome began.

    Args:
        spec: the dataset.
        training: the training set (entity key, event time, label columns, features).
        features: the columns the model will read.
        feature_times: the features mart's ``(entity key, event time)`` rows; when given, each
            training row's feature row is found as the point-in-time join found it (the newest
            at or before the row's event time) and must not be later than the label's
            observation time (retrospective labels) or its event time (stream labels).
    """
    failures = []
    leaked = sorted(set(features) & (set(spec.leakage) | {spec.label.column}))
    if leaked:
        failures.append(f"declared leakage among the features: {', '.join(leaked)}")
    if feature_times is None or training.empty:
        return failures
    limit = spec.label.observed_at if spec.label.timing == "retrospective" else spec.event_time
    key, time = spec.entity_key, spec.event_time
    rows = training[list(dict.fromkeys([key, time, limit]))].copy()
    stamps = feature_times[[key, time]].rename(columns={time: FEATURE_TIME})
    # Parquet and pandas disagree on units (s, us, ns): one unit for the join's time columns.
    rows[time] = pd.to_datetime(rows[time], utc=True).astype("datetime64[ns, UTC]")
    rows[limit] = pd.to_datetime(rows[limit], utc=True).astype("datetime64[ns, UTC]")
    stamps[FEATURE_TIME] = pd.to_datetime(stamps[FEATURE_TIME], utc=True).astype(
        "datetime64[ns, UTC]"
    )
    stamps[key] = stamps[key].astype(rows[key].dtype)
    joined = pd.merge_asof(
        rows.sort_values(time),
        stamps.sort_values(FEATURE_TIME),
        left_on=time,
        right_on=FEATURE_TIME,
        by=key,
        direction="backward",
    )
    late = joined[joined[FEATURE_TIME] > joined[limit]]
    if len(late):
        first = late.iloc[0]
        failures.append(
            f"{len(late)} of {len(joined)} rows read features stamped after {limit} "
            f"(e.g. {key}={first[key]}: feature row {first[FEATURE_TIME]}, {limit} {first[limit]})"
        )
    return failures


def complete_outcomes(spec: DatasetSpec, labels: pd.DataFrame, now: pd.Timestamp) -> pd.DataFrame:
    """The label rows whose outcome is known at ``now``; the others are left out, not negatives.

    Retrospective labels need their whole outcome window (observation + window) before ``now``;
    stream labels need to have arrived (``known_at`` at or before ``now``).
    """
    label = spec.label
    if label.timing == "retrospective":
        closes = labels[label.observed_at] + pd.Timedelta(days=label.outcome_window_days)
    else:
        closes = labels[label.known_at]
    return labels[closes <= now]


def _periods(spec: DatasetSpec, frame: pd.DataFrame) -> pd.Series:
    checks = spec.dataset_checks
    if checks.period == "snapshot":
        return pd.Series("snapshot", index=frame.index)
    stamps = pd.to_datetime(frame[checks.period_column], utc=True)
    if checks.period == "month":
        return stamps.dt.strftime("%Y-%m")
    return stamps.dt.strftime("%Y-%m-%d")


def composition_failures(spec: DatasetSpec, frame: pd.DataFrame) -> GuardResult:
    """Rows, label rate and key feature means per period, against the spec's bounds."""
    checks = spec.dataset_checks
    failures, periods = [], []
    if frame.empty:
        return GuardResult([f"no rows (needs at least {checks.min_rows} per period)"], [])
    for period, rows in frame.groupby(_periods(spec, frame), sort=True):
        figures = {"period": period, "rows": len(rows)}
        if len(rows) < checks.min_rows:
            failures.append(f"{period}: {len(rows)} rows, fewer than {checks.min_rows}")
        if checks.label_rate is not None:
            rate = float(rows[spec.label.column].mean())
            figures["label_rate"] = rate
            low, high = checks.label_rate
            if not low <= rate <= high:
                failures.append(f"{period}: label rate {rate:.3f} outside [{low}, {high}]")
        for feature, (low, high) in checks.feature_means.items():
            mean = float(rows[feature].mean())
            figures[f"mean_{feature}"] = mean
            if not low <= mean <= high:
                failures.append(f"{period}: mean {feature} {mean:.4g} outside [{low}, {high}]")
        periods.append(figures)
    return GuardResult(failures, periods)


def guard_training_set(
    spec: DatasetSpec,
    training: pd.DataFrame,
    features: list[str],
    feature_times: pd.DataFrame | None = None,
) -> GuardResult:
    """Every dataset-level check of a training set: leakage first, then its composition."""
    composition = composition_failures(spec, training)
    leakage = leakage_failures(spec, training, features, feature_times)
    return GuardResult(leakage + composition.failures, composition.periods)
