"""Data quality of one day: missing values, out-of-range values, new categories."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from keel.mirrors.evidently_stattests import ColumnKind
from keel.monitoring.common import _category_counts, _is_numeric
from keel.monitoring.reference import ReferenceProfile
from keel.reporting import markdown_table


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
        return markdown_table(*self.table())


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
