"""Keel's drift verdicts against Evidently's own report, dataset level included.

The Evidently side is a plain ``Report([DataDriftPreset()])``: its ``DriftedColumnsCount``
metric (the count and share of drifted columns, what the legacy ``DatasetDriftMetric``
computes) and that metric's default test (share below ``drift_share``), whose failure is
Evidently's dataset-drift verdict. Nothing on that side goes through Keel's code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from keel.monitoring import build_reference_profile, data_drift

# Evidently's own histograms warn about the infinities the frames hold on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

NUMERIC = ["spend", "balance", "transactions", "missed", "limit_band", "score_bucket"]
CATEGORICAL = ["product", "channel"]


@dataclass(frozen=True)
class EvidentlyVerdicts:
    """What Evidently's report says, read from its snapshot."""

    drifted_columns: dict[str, bool]
    methods: dict[str, str]
    scores: dict[str, float]
    count: int
    share: float
    dataset_drift: bool


def evidently_verdicts(
    reference: pd.DataFrame, current: pd.DataFrame, drift_share: float
) -> EvidentlyVerdicts:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=NUMERIC, categorical_columns=CATEGORICAL)
    snapshot = Report([DataDriftPreset(drift_share=drift_share)], include_tests=True).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    report = snapshot.dict()
    counts = [m for m in report["metrics"] if m["config"]["type"].endswith(":DriftedColumnsCount")]
    drift_metrics = [m for m in report["metrics"] if m["config"]["type"].endswith(":ValueDrift")]
    tests = {t["metric_config"]["metric_id"]: t["status"] for t in report["tests"]}
    (count_metric,) = counts
    return EvidentlyVerdicts(
        drifted_columns={m["config"]["column"]: tests[m["id"]] == "FAIL" for m in drift_metrics},
        methods={m["config"]["column"]: m["config"]["method"] for m in drift_metrics},
        scores={m["config"]["column"]: float(m["value"]) for m in drift_metrics},
        count=int(count_metric["value"]["count"]),
        share=float(count_metric["value"]["share"]),
        # The share test fails when the share reaches drift_share: Evidently's dataset drift.
        dataset_drift=tests[count_metric["id"]] == "FAIL",
    )


def account_frame(rows: int, seed: int, shift: float, shifted: frozenset[str]) -> pd.DataFrame:
    """Features with ties, nulls, infinities and categoricals; ``shifted`` columns move."""
    rng = np.random.default_rng(seed)

    def s(column: str) -> float:
        return shift if column in shifted else 0.0

    frame = pd.DataFrame(
        {
            # Rounded to whole units: many ties in a continuous feature.
            "spend": np.round(rng.lognormal(4.0 + s("spend"), 1.0, rows)),
            "balance": np.round(rng.gamma(2.0, 900.0 * (1 + s("balance")), rows), -1),
            # Counts: ties everywhere.
            "transactions": rng.poisson(6.0 + 5 * s("transactions"), rows).astype(float),
            # At most four distinct values: tested on value counts.
            "missed": np.minimum(rng.poisson(0.4 + 2 * s("missed"), rows), 3).astype(float),
            # Two values: the Z test on small references.
            "limit_band": rng.choice(
                [1000.0, 5000.0], rows, p=[0.7 - s("limit_band"), 0.3 + s("limit_band")]
            ),
            # Integers with a handful of distinct values past the few-values limit.
            "score_bucket": rng.integers(0, 8 + int(10 * s("score_bucket")), rows).astype(float),
            "product": rng.choice(
                ["basic", "gold", "platinum"],
                rows,
                p=[0.6 - s("product"), 0.3, 0.1 + s("product")],
            ),
            "channel": rng.choice(
                ["online", "pos", "atm", "branch"], rows, p=[0.5, 0.3, 0.15, 0.05]
            ),
        }
    )
    frame.loc[rng.random(rows) < 0.05, "spend"] = np.nan
    # Infinities beside nulls (see the last test for infinities alone).
    frame.loc[rng.random(rows) < 0.01, "balance"] = np.inf
    frame.loc[rng.random(rows) < 0.01, "balance"] = np.nan
    frame.loc[rng.random(rows) < 0.03, "product"] = None
    if "channel" in shifted:
        # A category the reference never saw.
        frame.loc[rng.random(rows) < shift, "channel"] = "crypto"
    return frame


def assert_same_verdicts(reference, current, drift_share=0.5):
    profile = build_reference_profile(
        reference, NUMERIC, CATEGORICAL, champion_version="1", training_set_hash="parity"
    )
    ours = data_drift(profile, current, drift_share=drift_share)
    theirs = evidently_verdicts(reference, current, drift_share)

    assert {f.column: f.drifted for f in ours.features} == theirs.drifted_columns
    assert {f.column: f.display_name for f in ours.features} == theirs.methods
    for feature in ours.features:
        assert feature.score == pytest.approx(theirs.scores[feature.column], rel=1e-9, abs=1e-12)
    assert ours.number_of_drifted_features == theirs.count
    assert ours.share_of_drifted_features == pytest.approx(theirs.share, rel=1e-12)
    assert ours.dataset_drift == theirs.dataset_drift
    return ours


# Small references (at most 1000 non-null rows) take K-S, chi-square and Z; larger ones
# Wasserstein and Jensen-Shannon. Seeds vary the data; the shifted sets put the share of drifted
# columns below, at and above the default drift share of 0.5 (4 of 8 columns is exactly 0.5).
# Seeds and sizes: in `make test-all`; the fast suite keeps the boundary and the difference.
SLOW = pytest.mark.slow
CASES = [
    pytest.param(700, 600, 11, 0.0, frozenset(), marks=SLOW),
    pytest.param(
        700, 600, 12, 0.2, frozenset({"spend", "missed", "limit_band", "product"}), marks=SLOW
    ),
    pytest.param(900, 3000, 13, 0.1, frozenset({"transactions", "channel"}), marks=SLOW),
    pytest.param(4000, 3000, 14, 0.0, frozenset(), marks=SLOW),
    pytest.param(
        4000, 3000, 15, 0.3, frozenset({"spend", "balance", "product", "channel"}), marks=SLOW
    ),
    pytest.param(
        5000, 2000, 17, 0.05, frozenset({"spend", "balance", "transactions", "missed"}), marks=SLOW
    ),
]


@pytest.mark.parametrize(("reference_rows", "current_rows", "seed", "shift", "shifted"), CASES)
def test_dataset_verdict_equals_evidentlys_drifted_columns_count(
    reference_rows, current_rows, seed, shift, shifted
):
    reference = account_frame(reference_rows, seed, 0.0, frozenset())
    current = account_frame(current_rows, seed + 100, shift, shifted)
    ours = assert_same_verdicts(reference, current)
    if not shifted:
        assert not ours.dataset_drift


@SLOW
def test_a_share_exactly_at_the_limit_is_drift_on_both_sides():
    reference = account_frame(4000, 21, 0.0, frozenset())
    current = account_frame(
        3000, 22, 0.4, frozenset({"spend", "balance", "transactions", "product"})
    )
    ours = assert_same_verdicts(reference, current)
    assert ours.share_of_drifted_features == 0.5 and ours.dataset_drift
    above = assert_same_verdicts(reference, current, drift_share=0.51)
    assert not above.dataset_drift


def test_infinities_without_nulls_are_the_one_documented_difference():
    """Evidently 0.7.23 drops infinities only from a column that also holds nulls.

    Its ``DriftedColumnsCount`` runs the legacy ``DatasetDriftMetric``, which cleans a column
    when ``isna().any()``: a column with infinities and no nulls keeps them, its normed
    Wasserstein distance is NaN and the column never counts as drifted. The ``ValueDrift``
    metric of the same report drops infinities always and flags the column. Keel follows
    ``ValueDrift`` in the per-column verdicts and counts those, so here its dataset verdict
    is drift and Evidently's is not.
    """
    reference = account_frame(4000, 15, 0.0, frozenset())
    current = account_frame(3000, 115, 0.3, frozenset({"spend", "balance", "product", "channel"}))
    for frame in (reference, current):
        frame["balance"] = frame["balance"].fillna(np.inf)  # infinities, and no null left
    profile = build_reference_profile(
        reference, NUMERIC, CATEGORICAL, champion_version="1", training_set_hash="parity"
    )
    ours = data_drift(profile, current)
    theirs = evidently_verdicts(reference, current, 0.5)

    assert theirs.drifted_columns["balance"] and ours.feature("balance").drifted
    assert {f.column: f.drifted for f in ours.features} == theirs.drifted_columns
    assert (ours.number_of_drifted_features, theirs.count) == (4, 3)
    assert ours.dataset_drift and not theirs.dataset_drift

    # One null beside the infinities and Evidently's two metrics agree again, with Keel.
    reference.loc[0, "balance"] = current.loc[0, "balance"] = np.nan
    assert assert_same_verdicts(reference, current).dataset_drift
