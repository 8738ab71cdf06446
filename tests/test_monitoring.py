import json
import math

import numpy as np
import pandas as pd
import pytest
from upath import UPath

from keel import monitoring, schema
from keel.mirrors import evidently_stattests as stattests
from keel.monitoring import (
    DriftResult,
    PerformanceResult,
    ProfileError,
    ReferenceProfile,
    RetrainPolicy,
    build_reference_profile,
    data_drift,
    data_quality,
    performance,
    prediction_drift,
    should_retrain,
)
from keel.monitoring import drift as drift_module

# Evidently's own histograms warn about the infinities the frames hold on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

NUMERIC = ["spend_30d", "utilisation", "transactions_7d", "missed_payments_30d", "credit_limit"]
CATEGORICAL = ["product", "main_channel_30d", "region_flag"]


def make_frame(rows: int, seed: int, shift: float = 0.0, shifted=None) -> pd.DataFrame:
    """Account features; ``shift`` moves the columns in ``shifted`` (all when None)."""
    rng = np.random.default_rng(seed)

    def s(column: str) -> float:
        return shift if shifted is None or column in shifted else 0.0

    frame = pd.DataFrame(
        {
            "spend_30d": rng.lognormal(4.0 + s("spend_30d"), 1.0, rows),
            "utilisation": rng.beta(2.0 + 3 * s("utilisation"), 5.0, rows),
            # Counts: many ties, Wasserstein or K-S.
            "transactions_7d": rng.poisson(6.0 + 5 * s("transactions_7d"), rows).astype(float),
            # At most 4 distinct values: tested on value counts (chi-square / Jensen-Shannon).
            "missed_payments_30d": np.minimum(
                rng.poisson(0.4 + 2 * s("missed_payments_30d"), rows), 3
            ).astype(float),
            # Two values: the Z test on small references.
            "credit_limit": rng.choice(
                [1000.0, 5000.0], rows, p=[0.7 - s("credit_limit"), 0.3 + s("credit_limit")]
            ),
            "product": rng.choice(
                schema.PRODUCTS, rows, p=[0.6 - s("product"), 0.3, 0.1 + s("product")]
            ),
            "main_channel_30d": rng.choice(schema.CHANNELS, rows, p=[0.5, 0.3, 0.15, 0.05]),
            "region_flag": rng.choice(
                ["north", "south"], rows, p=[0.5 + s("region_flag"), 0.5 - s("region_flag")]
            ),
        }
    )
    frame.loc[rng.random(rows) < 0.05, "spend_30d"] = np.nan
    frame.loc[rng.random(rows) < 0.002, "utilisation"] = np.inf
    frame.loc[rng.random(rows) < 0.03, "product"] = None
    return frame


def profile_of(frame: pd.DataFrame, **kwargs) -> ReferenceProfile:
    return build_reference_profile(
        frame, NUMERIC, CATEGORICAL, champion_version="3", training_set_hash="abc", **kwargs
    )


def assert_same_as_evidently(ours: DriftResult, theirs: DriftResult) -> None:
    assert {f.column for f in ours.features} == {f.column for f in theirs.features}
    for feature in ours.features:
        reference = theirs.feature(feature.column)
        assert feature.stattest == reference.stattest, feature.column
        assert feature.threshold == reference.threshold, feature.column
        assert feature.drifted == reference.drifted, feature.column
        assert feature.score == pytest.approx(reference.score, rel=1e-9, abs=1e-12), feature.column
    assert ours.dataset_drift == theirs.dataset_drift
    assert ours.share_of_drifted_features == theirs.share_of_drifted_features


# Small references (at most 1000 non-null rows) get K-S, chi-square and Z tests; larger ones
# Wasserstein and Jensen-Shannon. Each size runs without drift and with a covariate shift.
@pytest.mark.parametrize(
    ("reference_rows", "current_rows", "shift", "expected_tests"),
    [
        (800, 500, 0.0, {"ks", "chisquare", "z"}),
        (800, 500, 0.15, {"ks", "chisquare", "z"}),
        (900, 4000, 0.05, {"ks", "chisquare", "z"}),
        (6000, 3000, 0.0, {"wasserstein", "jensenshannon"}),
        (6000, 3000, 0.15, {"wasserstein", "jensenshannon"}),
        (20000, 20000, 0.03, {"wasserstein", "jensenshannon"}),
    ],
)
def test_verdicts_and_statistics_equal_evidentlys(
    reference_rows, current_rows, shift, expected_tests
):
    reference = make_frame(reference_rows, seed=1)
    current = make_frame(current_rows, seed=2, shift=shift)

    ours = data_drift(profile_of(reference), current)
    theirs = monitoring.evidently_data_drift(reference, current, NUMERIC, CATEGORICAL)

    assert_same_as_evidently(ours, theirs)
    assert {f.stattest for f in ours.features} == expected_tests
    if shift == 0.0:
        assert not ours.dataset_drift
    if shift == 0.15:
        assert ours.dataset_drift


def test_verdicts_equal_evidentlys_with_a_custom_drift_share_and_thresholds():
    reference = make_frame(5000, seed=3)
    current = make_frame(5000, seed=4, shift=0.1, shifted={"utilisation", "product"})
    ours = data_drift(profile_of(reference), current, drift_share=0.2)
    theirs = monitoring.evidently_data_drift(
        reference, current, NUMERIC, CATEGORICAL, drift_share=0.2
    )
    assert_same_as_evidently(ours, theirs)
    assert ours.drifted_features == ["utilisation", "product"]
    assert ours.dataset_drift  # 2 of 8 features reach a drift share of 0.2
    assert not data_drift(profile_of(reference), current).dataset_drift

    loose = data_drift(profile_of(reference), current, thresholds={"utilisation": 10.0})
    assert loose.feature("utilisation").threshold == 10.0
    assert not loose.feature("utilisation").drifted
    assert data_drift(profile_of(reference), current).feature("utilisation").drifted


@pytest.mark.filterwarnings("error")  # nulls and infinities pass without numpy warnings
def test_a_shifted_feature_is_flagged_and_the_others_are_not():
    reference = make_frame(30000, seed=5)
    current = make_frame(20000, seed=6, shift=0.4, shifted={"spend_30d"})

    result = data_drift(profile_of(reference), current)

    assert result.drifted_features == ["spend_30d"]
    assert result.feature("spend_30d").stattest == "wasserstein"
    assert result.feature("spend_30d").score > 0.1
    assert not result.dataset_drift
    assert result.share_of_drifted_features == pytest.approx(1 / 8)


def test_wasserstein_from_the_profile_equals_scipy_on_ties_nulls_and_infinities():
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(9)
    reference = np.round(rng.normal(50, 10, 40000), 1)
    current = np.round(rng.normal(52, 12, 25000), 1)
    reference[:100] = np.nan
    current[:50] = np.inf
    ref_finite, cur_finite = reference[np.isfinite(reference)], current[np.isfinite(current)]
    expected = wasserstein_distance(ref_finite, cur_finite) / np.std(ref_finite)

    profile = monitoring.NumericReference.from_values(reference, "x")
    result = drift_module._numeric_drift("x", profile, current, None)

    assert profile.values.size < ref_finite.size  # ties collapsed into counts
    assert result.stattest == "wasserstein"
    assert result.score == pytest.approx(expected, rel=1e-12)
    assert (result.reference_rows, result.current_rows) == (ref_finite.size, cur_finite.size)


def test_wasserstein_float_path_for_huge_row_counts_equals_scipy(monkeypatch):
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(10)
    reference, current = rng.poisson(20, 30000).astype(float), rng.normal(21, 5, 20000)
    profile = monitoring.NumericReference.from_values(reference, "x")
    exact = stattests._wasserstein(profile, current)
    monkeypatch.setattr(stattests, "EXACT_CDF_LIMIT", 0)

    approximate = stattests._wasserstein(profile, current)

    assert approximate == pytest.approx(wasserstein_distance(reference, current), rel=1e-9)
    assert approximate == pytest.approx(exact, rel=1e-9)


def test_profile_round_trips_through_its_files(keel_home):
    reference = make_frame(3000, seed=7)
    scores = np.random.default_rng(7).beta(2, 8, len(reference))
    profile = profile_of(reference, reference_scores=scores, sample_rows=400)
    folder = keel_home.artefacts / "monitoring" / "reference" / "3"

    profile.save(folder)
    loaded = ReferenceProfile.load(folder, champion_version="3", training_set_hash="abc")

    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 3 and monitoring.PROFILE_FILE in names
    assert (loaded.champion_version, loaded.training_set_hash) == ("3", "abc")
    assert loaded.created_at == profile.created_at
    assert loaded.features == profile.features
    for column, ref in profile.numeric.items():
        np.testing.assert_array_equal(loaded.numeric[column].values, ref.values)
        np.testing.assert_array_equal(loaded.numeric[column].counts, ref.counts)
        assert loaded.numeric[column].std == ref.std
        assert loaded.numeric[column].total_rows == ref.total_rows
    assert loaded.categorical == profile.categorical
    np.testing.assert_array_equal(loaded.scores.values, profile.scores.values)
    pd.testing.assert_frame_equal(loaded.sample, profile.sample)
    assert len(loaded.sample) == 400
    current = make_frame(2000, seed=8, shift=0.1)
    assert data_drift(loaded, current) == data_drift(profile, current)


def test_profile_round_trips_through_an_object_store_path():
    profile = profile_of(make_frame(1500, seed=10), sample_rows=50)
    folder = UPath("memory://keel-test/reference/3")
    profile.save(folder)
    loaded = ReferenceProfile.load(folder)
    current = make_frame(1000, seed=11)
    assert data_drift(loaded, current) == data_drift(profile, current)


def test_loading_refuses_a_missing_or_foreign_profile(keel_home):
    folder = keel_home.artefacts / "profile"
    with pytest.raises(ProfileError, match="No reference profile"):
        ReferenceProfile.load(folder)
    profile_of(make_frame(1200, seed=12)).save(folder)
    with pytest.raises(ProfileError, match="champion_version='3', not '4'"):
        ReferenceProfile.load(folder, champion_version="4")
    with pytest.raises(ProfileError, match="training_set_hash"):
        ReferenceProfile.load(folder, training_set_hash="other")


def test_ensure_reference_profile_builds_once_per_champion(keel_home):
    reference = make_frame(1500, seed=13)
    builds = []

    def build(version: str):
        def run():
            builds.append(version)
            return build_reference_profile(
                reference, NUMERIC, CATEGORICAL, champion_version=version, training_set_hash="h"
            )

        return run

    folder = keel_home.artefacts / "reference"
    first, built = monitoring.ensure_reference_profile(
        folder, champion_version="1", training_set_hash="h", build=build("1")
    )
    again, built_again = monitoring.ensure_reference_profile(
        folder, champion_version="1", training_set_hash="h", build=build("1")
    )
    _, built_newer = monitoring.ensure_reference_profile(
        folder, champion_version="2", training_set_hash="h", build=build("2")
    )
    assert (built, built_again, built_newer) == (True, False, True)
    assert builds == ["1", "2"]
    assert again.created_at == first.created_at
    assert ReferenceProfile.load(folder).champion_version == "2"
    # The first champion's data files are gone: one profile per folder.
    assert len(list(folder.iterdir())) == 3


def test_bad_inputs_get_clear_errors():
    reference = make_frame(1500, seed=14)
    profile = profile_of(reference)
    with pytest.raises(ValueError, match=r"current frame lacks columns \['product'\]"):
        data_drift(profile, reference.drop(columns="product"))
    with pytest.raises(ValueError, match="'utilisation' in the current frame should hold numbers"):
        data_drift(profile, reference.assign(utilisation="high"))
    with pytest.raises(ValueError, match="'spend_30d' has no non-null values"):
        data_drift(profile, reference.assign(spend_30d=np.nan))
    with pytest.raises(ValueError, match="not profiled"):
        data_drift(profile, reference, thresholds={"age": 0.2})
    with pytest.raises(ValueError, match="reference frame has no rows"):
        profile_of(reference.iloc[:0])
    with pytest.raises(ValueError, match="only nulls"):
        profile_of(reference.assign(product=None))
    with pytest.raises(ValueError, match="one score per row"):
        profile_of(reference, reference_scores=np.full(10, 0.5))


def test_prediction_drift_matches_evidently_and_flags_shifted_scores():
    rng = np.random.default_rng(15)
    reference = make_frame(4000, seed=15)
    reference_scores = rng.beta(2, 8, len(reference))
    profile = profile_of(reference, reference_scores=reference_scores)
    same = rng.beta(2, 8, 3000)
    higher = rng.beta(3, 6, 3000)

    steady, shifted = prediction_drift(profile, same), prediction_drift(profile, higher)

    for scores, result in ((same, steady), (higher, shifted)):
        theirs = monitoring.evidently_data_drift(
            pd.DataFrame({"score": reference_scores}),
            pd.DataFrame({"score": scores}),
            ["score"],
            [],
        ).feature("score")
        assert result.drift.stattest == theirs.stattest == "wasserstein"
        assert result.drift.score == pytest.approx(theirs.score, rel=1e-9)
        assert result.drift.drifted == theirs.drifted
    assert not steady.drift.drifted
    assert shifted.drift.drifted
    assert shifted.current_mean == pytest.approx(higher.mean())
    assert shifted.reference_mean == pytest.approx(reference_scores.mean())
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        prediction_drift(profile, same + 1)
    with pytest.raises(ProfileError, match="no scores"):
        prediction_drift(profile_of(reference), same)


def test_data_quality_figures_match_hand_counts():
    reference = pd.DataFrame(
        {
            "spend_30d": [10.0, 20.0, 30.0, np.nan],
            "utilisation": [0.1, 0.2, 0.5, 0.9],
            "transactions_7d": [1.0, 2.0, 3.0, 4.0],
            "missed_payments_30d": [0.0, 0.0, 1.0, 2.0],
            "credit_limit": [1000.0, 1000.0, 5000.0, 5000.0],
            "product": ["classic", "gold", "gold", None],
            "main_channel_30d": ["online", "pos", "atm", "branch"],
            "region_flag": ["north", "south", "north", "south"],
        }
    )
    profile = profile_of(reference)
    current = pd.DataFrame(
        {
            # 2 of 5 missing (one null, one infinite), 1 above the reference maximum of 30.
            "spend_30d": [15.0, np.nan, np.inf, 45.0, 20.0],
            "utilisation": [0.1, 0.2, 0.3, 0.4, 0.05],  # 1 below the minimum of 0.1
            "transactions_7d": ["1", "2", "3", "4", "5"],  # schema break: text
            "missed_payments_30d": [0.0, 0.0, 1.0, 2.0, 2.0],
            "credit_limit": [1000.0, 5000.0, 5000.0, 1000.0, 1000.0],
            "product": ["classic", "diamond", "diamond", "gold", "titanium"],
            "main_channel_30d": ["online", "pos", "atm", "branch", None],
        }
    )

    result = data_quality(current, profile)
    by_column = {c.column: c for c in result.columns}

    assert result.rows == 5
    assert result.missing_columns == ("region_flag",)
    assert by_column["spend_30d"].missing_share == pytest.approx(2 / 5)
    assert by_column["spend_30d"].reference_missing_share == pytest.approx(1 / 4)
    assert by_column["spend_30d"].out_of_range_share == pytest.approx(1 / 5)
    assert by_column["utilisation"].out_of_range_share == pytest.approx(1 / 5)
    assert by_column["missed_payments_30d"].out_of_range_share == 0.0
    assert by_column["product"].new_categories == {"diamond": 2, "titanium": 1}
    assert by_column["product"].new_category_share == pytest.approx(3 / 5)
    assert by_column["product"].reference_missing_share == pytest.approx(1 / 4)
    assert by_column["main_channel_30d"].missing_share == pytest.approx(1 / 5)
    assert "transactions_7d" not in by_column
    assert not result.ok
    issues = "\n".join(result.issues)
    for expected in (
        "region_flag: column missing",
        "transactions_7d: not numeric",
        "spend_30d: 20.00% of rows outside the reference range [10, 30]",
        "utilisation: 20.00% of rows outside",
        "product: categories unseen in the reference: ['diamond', 'titanium']",
        "spend_30d: 40.00% missing, reference 25.00%",
        "main_channel_30d: 20.00% missing, reference 0.00%",
    ):
        assert expected in issues
    assert "missed_payments_30d" not in issues
    assert "| product | 0.00% | 25.00% |  | diamond (2), titanium (1) |" in result.to_markdown()
    assert data_quality(reference, profile).ok
    empty = data_quality(reference.iloc[:0], profile)
    assert empty.issues[0] == "0 rows, fewer than the 1 expected"


def test_performance_matches_sklearn():
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss, precision_score, recall_score, roc_auc_score

    rng = np.random.default_rng(16)
    labels = rng.random(5000) < 0.2
    # Rounded scores: ties, which AUC must average like sklearn does.
    scores = np.round(np.clip(rng.normal(0.25 + 0.3 * labels, 0.15), 0, 1), 2)

    result = performance(scores, labels.astype(int), threshold=0.4)

    assert result.rows == 5000
    assert result.positives == labels.sum()
    assert result.auc == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    assert result.precision == pytest.approx(precision_score(labels, scores >= 0.4))
    assert result.recall == pytest.approx(recall_score(labels, scores >= 0.4))
    assert result.brier == pytest.approx(brier_score_loss(labels, scores))
    observed, predicted = calibration_curve(labels, scores, n_bins=10)
    filled = [b for b in result.calibration if b.rows]
    np.testing.assert_allclose([b.observed_rate for b in filled], observed)
    np.testing.assert_allclose([b.mean_score for b in filled], predicted)
    assert sum(b.rows for b in result.calibration) == 5000
    expected_ece = sum(b.rows * abs(b.mean_score - b.observed_rate) for b in filled) / 5000
    assert result.expected_calibration_error == pytest.approx(expected_ece)
    assert PerformanceResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_performance_hand_computed_and_undefined_cases():
    result = performance([0.9, 0.8, 0.3, 0.6, 0.1], [1, 0, 1, 0, 0], threshold=0.5)
    # Positives 0.9 and 0.3 against negatives 0.8, 0.6, 0.1: 4 of 6 pairs ordered right.
    assert result.auc == pytest.approx(4 / 6)
    assert result.precision == pytest.approx(1 / 3)
    assert result.recall == pytest.approx(1 / 2)
    assert result.brier == pytest.approx((0.01 + 0.64 + 0.49 + 0.36 + 0.01) / 5)

    one_class = performance([0.2, 0.7], [0, 0])
    assert one_class.auc is None and one_class.recall is None
    assert performance([0.2, 0.3], [1, 0]).precision is None
    with pytest.raises(ValueError, match="2 scores but 3 labels"):
        performance([0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match=r"Labels must be 0 or 1, found \[0, 2\]"):
        performance([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="nulls"):
        performance([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="No rows"):
        performance([], [])


def test_should_retrain_follows_the_policy():
    reference = make_frame(6000, seed=17)
    drifted = data_drift(profile_of(reference), make_frame(3000, seed=18, shift=0.15))
    one_feature = data_drift(
        profile_of(reference), make_frame(3000, seed=19, shift=0.4, shifted={"spend_30d"})
    )
    assert drifted.dataset_drift and not one_feature.dataset_drift

    assert should_retrain(drifted).retrain
    assert not should_retrain(one_feature).retrain
    assert should_retrain(one_feature, RetrainPolicy(drift_share=0.1)).retrain
    critical = should_retrain(one_feature, RetrainPolicy(critical_features=("spend_30d",)))
    assert critical.retrain and "spend_30d" in critical.reason
    small_day = should_retrain(drifted, RetrainPolicy(min_rows=5000))
    assert not small_day.retrain and "fewer than 5000" in small_day.reason
    # The sensor reads the result back from run metadata.
    restored = DriftResult.from_dict(json.loads(json.dumps(drifted.to_dict())))
    assert restored == drifted
    assert should_retrain(restored) == should_retrain(drifted)

    rng = np.random.default_rng(20)
    labels = (rng.random(2000) < 0.3).astype(int)
    weak = performance(np.clip(0.3 + 0.05 * labels + rng.normal(0, 0.2, 2000), 0, 1), labels)
    assert should_retrain(weak, RetrainPolicy(min_auc=0.75)).retrain
    assert not should_retrain(weak, RetrainPolicy(min_auc=0.5)).retrain
    assert not should_retrain(weak).retrain  # performance not watched by default


def test_markdown_summary_lists_the_most_drifted_feature_first():
    reference = make_frame(6000, seed=21)
    result = data_drift(
        profile_of(reference), make_frame(3000, seed=22, shift=0.4, shifted={"spend_30d"})
    )
    lines = result.to_markdown().splitlines()
    assert lines[0] == "| feature | type | test | statistic | threshold | drifted |"
    assert lines[2].startswith("| spend_30d | numerical | Wasserstein distance (normed) |")
    assert lines[2].endswith("| 0.1 | yes |")
    assert len(lines) == 2 + len(NUMERIC) + len(CATEGORICAL)
    summary = result.summary()
    assert summary["drifted_features"] == "spend_30d"
    assert summary["number_of_drifted_features"] == 1


def test_html_reports_and_plot_are_written(tmp_path):
    reference = make_frame(4000, seed=23)
    reference_scores = np.random.default_rng(23).beta(2, 8, len(reference))
    profile = profile_of(reference, reference_scores=reference_scores, sample_rows=600)
    current = make_frame(3000, seed=24, shift=0.4, shifted={"spend_30d"})
    current["score"] = np.random.default_rng(24).beta(2, 8, len(current))
    drift = data_drift(profile, current)
    prediction = prediction_drift(profile, current["score"])
    quality = data_quality(current, profile)

    page = monitoring.write_drift_report(
        tmp_path / "drift.html",
        profile,
        current,
        drift,
        prediction=prediction,
        quality=quality,
        sample_rows=700,
    )
    text = page.read_text()
    assert "<h3>Drift on every row</h3>" in text
    assert "<td>spend_30d</td><td>numerical</td><td>Wasserstein distance (normed)</td>" in text
    assert "<h3>Prediction drift</h3>" in text
    assert "600 reference rows, 700 current rows" in text
    assert "drawDashboard" in text  # Evidently's own dashboard follows
    assert text.index('class="keel-verdicts"') < text.index('<div id="root_')

    labels = (np.random.default_rng(25).random(len(current)) < current["score"]).astype(int)
    result = performance(current["score"], labels)
    page = monitoring.write_performance_report(
        tmp_path / "performance.html", current["score"], labels, result, sample_rows=1000
    )
    text = page.read_text()
    assert f"<b>auc</b>: {result.auc}" in text
    assert "<h3>Reliability (all rows)</h3>" in text
    assert "drawDashboard" in text

    png = monitoring.plot_drift(tmp_path / "drift.png", profile, current, drift, top=3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = monitoring.plot_drift(UPath("memory://keel-test/drift.png"), profile, current, drift)
    assert stored.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reference_window_reads_the_last_days_of_the_training_set(tmp_path):
    rows = 1000
    frame = make_frame(rows, seed=26)
    frame[schema.EVENT_TIMESTAMP] = pd.date_range(
        "2026-01-01", periods=10, freq="D", tz="UTC"
    ).repeat(rows // 10)
    frame[schema.ENTITY_KEY] = np.arange(rows)
    frame[schema.LABEL] = 0
    path = tmp_path / "training_set.parquet"
    frame.to_parquet(path)

    window = monitoring.read_reference_window(path, NUMERIC, CATEGORICAL, days=3)
    assert window[schema.EVENT_TIMESTAMP].min() == pd.Timestamp("2026-01-08", tz="UTC")
    assert len(window) == 300
    assert schema.LABEL not in window
    sampled = monitoring.read_reference_window(path, NUMERIC, CATEGORICAL, max_rows=250, seed=1)
    assert len(sampled) == 250
    assert sampled.equals(
        monitoring.read_reference_window(path, NUMERIC, CATEGORICAL, max_rows=250, seed=1)
    )
    with pytest.raises(ValueError, match=r"lacks columns \['age'\]"):
        monitoring.read_reference_window(path, ["age"], [])


def test_severity_ranks_distances_and_p_values_alike():
    distance = monitoring.FeatureDrift("a", "numerical", "wasserstein", 0.2, 0.1, True, 10, 10)
    p_value = monitoring.FeatureDrift("b", "numerical", "ks", 0.5, 0.05, False, 10, 10)
    assert distance.severity == pytest.approx(2.0)
    assert p_value.severity == pytest.approx(0.1)
    assert math.isfinite(
        monitoring.FeatureDrift("c", "categorical", "chisquare", 0.0, 0.05, True, 1, 1).severity
    )


def test_performance_report_of_a_day_whose_labels_are_all_one_class(tmp_path):
    scores, labels = np.array([0.1, 0.4, 0.7]), np.array([0, 0, 0])
    result = performance(scores, labels)
    page = monitoring.write_performance_report(tmp_path / "day.html", scores, labels, result)
    text = page.read_text()
    assert result.auc is None
    assert "same class" in text and "brier" in text.lower()
