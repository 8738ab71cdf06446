"""The drift tests Evidently picks by default, their thresholds and their statistics.

Evidently's ``DataDriftPreset`` picks one test per column (K-S, chi-square or Z on a small
reference, Wasserstein or Jensen-Shannon above it; value counts for numeric columns with few
distinct values) and compares its score with a default threshold. The same rules and
statistics are computed here from a reference profile, so the verdicts and the numbers equal
Evidently's own on the same data.

Mirrors: evidently==0.7.23 (evidently/legacy/calculations/stattests/: registry.py and the tests)
Parity test: test_monitoring.py::test_verdicts_and_statistics_equal_evidentlys
Parity test: test_drift_parity.py::test_dataset_verdict_equals_evidentlys_drifted_columns_count
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from keel.monitoring.reference import NumericReference

# Evidently's default test selection: up to this many non-null reference rows it uses classical
# two-sample tests (K-S, chi-square, Z), above it distances (Wasserstein, Jensen-Shannon).
SMALL_REFERENCE_ROWS = 1000
# Numeric columns with at most this many distinct values (reference and current together)
# are tested like categorical ones.
FEW_DISTINCT_VALUES = 5


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


def numeric_stattest(ref: NumericReference, finite: np.ndarray) -> tuple[str, float]:
    """The test Evidently picks for a numeric column, and its score on the finite current values.

    A column with few distinct values (reference and current together) is tested on its value
    counts like a categorical one; otherwise K-S on a small reference, Wasserstein above it.
    """
    few_values = ref.values.size <= FEW_DISTINCT_VALUES
    if few_values:
        current_values, current_counts = np.unique(finite, return_counts=True)
        few_values = np.union1d(ref.values, current_values).size <= FEW_DISTINCT_VALUES
    small = ref.rows <= SMALL_REFERENCE_ROWS
    if few_values:
        ref_counts = dict(zip(ref.values.tolist(), ref.counts.tolist(), strict=True))
        cur_counts = dict(zip(current_values.tolist(), current_counts.tolist(), strict=True))
        return _count_test(ref_counts, cur_counts, small)
    if small:
        from scipy.stats import ks_2samp

        return "ks", float(ks_2samp(np.repeat(ref.values, ref.counts), finite).pvalue)
    return "wasserstein", _wasserstein(ref, finite) / max(ref.std, MIN_WASSERSTEIN_NORM)


def categorical_stattest(
    ref_counts: Mapping, cur_counts: Mapping, reference_rows: int
) -> tuple[str, float]:
    """The test Evidently picks for a categorical column, and its score on the value counts."""
    return _count_test(ref_counts, cur_counts, reference_rows <= SMALL_REFERENCE_ROWS)


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
