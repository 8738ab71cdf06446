import numpy as np
import pandas as pd
import pytest

from keel.evaluation.fairness import resampled_disparities
from keel.evaluation.metrics import bootstrap_counts

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


def decisions(rows: int, seed: int, groups=("a", "b", "c")) -> tuple[np.ndarray, ...]:
    """Labels, decisions and groups whose TPR and FPR gaps are both a few points wide."""
    rng = np.random.default_rng(seed)
    g = rng.choice(groups, rows)
    y = (rng.random(rows) < 0.3).astype(int)
    shift = np.where(g == groups[0], 0.0, 0.06)
    p = (rng.random(rows) < np.where(y == 1, 0.6 + shift, 0.2 + shift)).astype(int)
    return y, p, g


def test_each_resample_is_fairlearns_statistic_on_the_resampled_rows():
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

    y, p, g = decisions(600, seed=0)
    # A small group that some resamples leave without defaults: its TPR is undefined there.
    y[g == "c"] = 0
    y[np.flatnonzero(g == "c")[:2]] = 1
    counts = next(bootstrap_counts(len(y), 5, seed=5))
    parity, odds = resampled_disparities(y, p, g, counts)

    for i, draws in enumerate(counts.astype(int)):
        rows = np.repeat(np.arange(len(y)), draws)
        yr, pr, gr = y[rows], p[rows], g[rows]
        assert parity[i] == pytest.approx(
            demographic_parity_difference(yr, pr, sensitive_features=gr)
        )
        # Groups without defaults in the resample have no TPR: the TPR gap is over the others.
        judged = np.isin(gr, np.unique(gr[yr == 1]))
        tpr_gap = equalized_odds_difference(yr[judged], pr[judged], sensitive_features=gr[judged])
        fpr_gap = equalized_odds_difference(
            yr[yr == 0], pr[yr == 0], sensitive_features=gr[yr == 0]
        )
        assert odds[i] == pytest.approx(max(tpr_gap, fpr_gap))


@pytest.mark.slow
def test_fairlearns_own_bootstrap_understates_the_equalized_odds_lower_bound():
    """Why Keel keeps its own resampling: fairlearn's MetricFrame bootstraps each metric's
    difference on its own, and the equalized odds difference (the larger of the TPR and FPR
    differences within a resample) has no interval there. The nearest one can build from it,
    the larger of the two lower quantiles, sits well below the real lower quantile."""
    from fairlearn.metrics import (
        MetricFrame,
        equalized_odds_difference,
        false_positive_rate,
        true_positive_rate,
    )

    y, p, g = decisions(2_000, seed=1, groups=("a", "b"))
    boots, seed = 50, 3
    frame = MetricFrame(
        metrics={"tpr": true_positive_rate, "fpr": false_positive_rate},
        y_true=y,
        y_pred=p,
        sensitive_features=pd.Series(g, name="group"),
        n_boot=boots,
        ci_quantiles=[0.025, 0.975],
        random_state=seed,
    )
    from_fairlearn = max(frame.difference_ci()[0])
    # The very resamples MetricFrame drew (fairlearn seeds each one from one generator).
    data = pd.DataFrame({"y": y, "p": p, "g": g})
    seeds = np.random.default_rng(seed).integers(0, np.iinfo(np.uint32).max, boots, np.uint32)
    values = []
    for state in seeds:
        rows = data.sample(frac=1, replace=True, random_state=state, ignore_index=True)
        values.append(equalized_odds_difference(rows.y, rows.p, sensitive_features=rows.g))
    real_lower = float(np.quantile(values, 0.025))

    assert max(frame.difference_ci()[1]) == pytest.approx(np.quantile(values, 0.975))
    assert real_lower > from_fairlearn * 1.5
