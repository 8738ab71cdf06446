"""Evaluation: metrics, bootstrap, fairness, serving cost, gates, report, and the Dagster assets."""

import hashlib
import json
import re
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from keel import schema
from keel.evaluation import (
    Candidate,
    ServingProbe,
    bootstrap_auc_difference,
    choose_threshold,
    evaluate,
    fairness_report,
    html_report,
    markdown_tables,
    quality_metrics,
    weighted_auc,
)
from keel.gates import EvaluationError, GatePolicy
from keel.settings import KeelPaths

# Small but honest: enough rows per group for the fairness bounds to mean something.
PROBE = ServingProbe(single_row_calls=30, warmup_calls=3, batch_rows=2_000, batch_repeats=2)
POLICY = GatePolicy(bootstrap_samples=300)
TENURE_BY_AGE = {"18-25": 250.0, "26-35": 900.0, "36-50": 2000.0, "51-65": 3000.0, "66+": 3500.0}


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def training_frame(rows: int = 12_000, days: int = 28, seed: int = 0) -> pd.DataFrame:
    """A training set with the shared column contract: defaults driven by utilisation and
    missed payments, tenure that differs by age (a proxy a biased model can lean on)."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2026-01-01", tz="UTC")
    events = start + pd.to_timedelta(rng.integers(0, days * 86_400, rows), unit="s")
    age_band = rng.choice(schema.AGE_BANDS, rows, p=[0.2, 0.3, 0.25, 0.17, 0.08])
    frame = pd.DataFrame(
        {
            schema.ENTITY_KEY: np.arange(rows, dtype=np.int64),
            schema.EVENT_TIMESTAMP: events,
            schema.LABEL_TIMESTAMP: events + pd.Timedelta(days=2),
            "age_band": age_band,
            "sex": rng.choice(schema.SEXES, rows),
            "region": rng.choice(schema.REGIONS, rows),
            "product": rng.choice(schema.PRODUCTS, rows, p=[0.6, 0.3, 0.1]),
            "main_channel_30d": rng.choice(schema.CHANNELS, rows),
        }
    )
    for name in schema.NUMERIC_FEATURES:
        frame[name] = rng.gamma(2.0, 50.0, rows)
    frame["utilisation"] = rng.beta(2.0, 4.0, rows)
    frame["missed_payments_30d"] = rng.poisson(0.25, rows).astype(float)
    frame["missed_payments_90d"] = frame["missed_payments_30d"] + rng.poisson(0.3, rows)
    frame["tenure_days"] = np.vectorize(TENURE_BY_AGE.get)(age_band) * rng.lognormal(0, 0.3, rows)
    frame.loc[rng.random(rows) < 0.02, "spend_7d"] = np.nan
    logit = (
        -3.0
        + 4.0 * (frame["utilisation"] - 0.33)
        + 1.0 * frame["missed_payments_30d"]
        + 0.3 * frame["missed_payments_90d"]
    )
    frame[schema.LABEL] = (rng.random(rows) < _sigmoid(logit)).astype(np.int64)
    return frame


def split(frame: pd.DataFrame):
    from keel.training import time_split

    return time_split(frame, validation_days=7, test_days=7)


class FormulaModel:
    """A logistic score over a few features, with the training stage's model interface."""

    family = "formula"

    def __init__(self, weights: dict, intercept: float = -3.0, delay_s: float = 0.0):
        self.weights = weights
        self.intercept = intercept
        self.delay_s = delay_s
        self.feature_names = tuple(weights)

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        if self.delay_s:
            time.sleep(self.delay_s)
        logit = np.full(len(frame), self.intercept)
        for name, weight in self.weights.items():
            values = frame[name].to_numpy(dtype=float)
            logit = logit + weight(values) if callable(weight) else logit + weight * values
        return _sigmoid(np.nan_to_num(logit))


def centred_utilisation(utilisation):
    return 4.0 * (utilisation - 0.33)


def short_tenure(tenure_days):
    return 3.0 * (tenure_days < 500)


GOOD = {
    "utilisation": centred_utilisation,
    "missed_payments_30d": 1.0,
    "missed_payments_90d": 0.3,
}


def good_model(**kwargs) -> FormulaModel:
    return FormulaModel(GOOD, **kwargs)


def worse_model() -> FormulaModel:
    """Ignores missed payments: still useful, clearly worse than the champion."""
    return FormulaModel({"utilisation": centred_utilisation})


def biased_model() -> FormulaModel:
    """Leans on short tenure, a proxy for being young: flags the 18-25 band wholesale."""
    return FormulaModel({**GOOD, "tenure_days": short_tenure})


def candidate(model, uri: str = "test:model") -> Candidate:
    return Candidate(model, uri)


@pytest.fixture(autouse=True)
def isolated_mlflow_uris(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_tracking_uri exports MLFLOW_*_URI: keep one test's store out of the next."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def windows():
    _, validation, test = split(training_frame())
    return validation, test


def gates_of(evaluation) -> dict[str, bool]:
    return {gate["name"]: gate["passed"] for gate in evaluation.summary["gates"]}


# -- maths -------------------------------------------------------------------------------------


def test_weighted_auc_matches_sklearn_with_ties_and_weights():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) + 0.3 * labels, 1)  # many ties
    weights = rng.integers(0, 4, (3, 500)).astype(float)
    expected = [roc_auc_score(labels, scores, sample_weight=w) for w in weights]
    np.testing.assert_allclose(weighted_auc(labels, scores, weights), expected, rtol=1e-12)


def test_paired_bootstrap_interval_covers_the_difference_and_is_zero_for_twins():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 2_000)
    strong = labels + rng.normal(0, 0.8, 2_000)
    weak = labels + rng.normal(0, 1.6, 2_000)
    result = bootstrap_auc_difference(labels, strong, weak, samples=400, confidence=0.95)
    assert result["low"] < result["difference"] < result["high"]
    assert result["low"] > 0 and result["share_challenger_better"] == 1.0
    twins = bootstrap_auc_difference(labels, strong, strong, samples=200, confidence=0.95)
    assert twins["low"] == twins["high"] == twins["difference"] == 0.0


def test_quality_metrics_and_calibration_on_a_known_case():
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 0])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.4, 0.6, 0.9, 0.05])
    metrics = quality_metrics(labels, scores, threshold=0.5)
    assert metrics["confusion"] == {"tp": 2, "fp": 1, "tn": 4, "fn": 1}
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["precision"] == pytest.approx(2 / 3) and metrics["recall"] == pytest.approx(
        2 / 3
    )
    assert metrics["brier_score"] == pytest.approx(np.mean((scores - labels) ** 2))
    assert sum(row["count"] for row in metrics["reliability"]) == len(labels)
    # Perfectly calibrated bins give an ECE of zero.
    calibrated = quality_metrics(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5]), 0.5)
    assert calibrated["expected_calibration_error"] == pytest.approx(0.0)


def test_threshold_maximises_f1_on_validation_and_says_so():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.45, 0.4, 0.7, 0.8])
    chosen = choose_threshold(labels, scores, "max_f1", 0.5)
    assert chosen["value"] == pytest.approx(0.4)
    assert "maximises F1" in chosen["how"] and "validation window" in chosen["how"]
    fixed = choose_threshold(labels, scores, "fixed", 0.35)
    assert fixed["value"] == 0.35 and "fixed" in fixed["how"]


def test_fairness_report_per_group_rates_and_small_groups():
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 0, 0, 1])
    predicted = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1, 1])
    groups = pd.DataFrame({"sex": ["F"] * 4 + ["M"] * 4 + ["X"] * 2})
    report = fairness_report(labels, predicted, groups, min_group_rows=3, min_group_positives=1)
    rows = {row["group"]: row for row in report["sex"]["groups"]}
    assert rows["F"]["selection_rate"] == pytest.approx(0.75) and rows["F"]["tpr"] == 1.0
    assert rows["F"]["fpr"] == pytest.approx(0.5)
    assert rows["M"]["selection_rate"] == 0.0 and not rows["X"]["judged"]
    assert report["sex"]["demographic_parity_difference"] == pytest.approx(0.75)
    assert report["sex"]["equalized_odds_difference"] == pytest.approx(1.0)


def test_bad_inputs_get_clear_errors(windows):
    validation, test = windows
    with pytest.raises(EvaluationError, match="only defaulted=0"):
        evaluate(candidate(good_model()), None, validation, test.assign(defaulted=0), POLICY, PROBE)
    with pytest.raises(EvaluationError, match="lacks protected attributes"):
        evaluate(candidate(good_model()), None, validation, test.drop(columns="sex"), POLICY, PROBE)

    class WrongShape(FormulaModel):
        def predict_proba(self, frame):
            return np.zeros((len(frame), 2))

    with pytest.raises(EvaluationError, match="returned shape"):
        evaluate(candidate(WrongShape(GOOD)), None, validation, test, POLICY, PROBE)
    with pytest.raises(EvaluationError, match="threshold_strategy"):
        GatePolicy(threshold_strategy="median")


# -- gates -------------------------------------------------------------------------------------


def test_first_model_has_a_defined_path_and_a_good_model_passes_every_gate(windows):
    evaluation = evaluate(candidate(good_model()), None, *windows, POLICY, PROBE)
    assert gates_of(evaluation) == dict.fromkeys(gates_of(evaluation), True)
    assert evaluation.all_gates_passed
    no_regression = next(g for g in evaluation.summary["gates"] if g["name"] == "no_regression")
    assert "first model" in no_regression["detail"]
    assert evaluation.summary["champion"] is None and evaluation.summary["comparison"] is None


def test_good_challenger_against_an_equal_champion_passes(windows):
    evaluation = evaluate(
        candidate(good_model(), "new"), candidate(good_model(), "old"), *windows, POLICY, PROBE
    )
    assert evaluation.all_gates_passed
    assert evaluation.summary["comparison"]["auc"]["difference"] == pytest.approx(0.0)


def test_worse_model_fails_the_regression_gate(windows):
    evaluation = evaluate(
        candidate(worse_model()), candidate(good_model()), *windows, POLICY, PROBE
    )
    gates = gates_of(evaluation)
    assert not gates["no_regression"] and not evaluation.all_gates_passed
    assert gates["fairness"] and gates["latency_sla"]
    auc = evaluation.summary["comparison"]["auc"]
    assert auc["high"] < -POLICY.max_auc_regression  # clearly worse, not noise


def test_useless_model_fails_the_minimum_quality_gate(windows):
    useless = FormulaModel({"spend_30d": 0.001})
    evaluation = evaluate(candidate(useless), None, *windows, POLICY, PROBE)
    assert not gates_of(evaluation)["minimum_quality"]


def test_biased_model_fails_the_fairness_gate(windows):
    evaluation = evaluate(candidate(biased_model()), None, *windows, POLICY, PROBE)
    gates = gates_of(evaluation)
    assert not gates["fairness"] and gates["latency_sla"]
    age = evaluation.summary["challenger"]["fairness"]["age_band"]
    assert age["demographic_parity_difference"] > POLICY.max_demographic_parity_difference
    detail = next(g["detail"] for g in evaluation.summary["gates"] if g["name"] == "fairness")
    assert "age_band" in detail


def test_slow_model_fails_the_latency_sla(windows):
    policy = GatePolicy(bootstrap_samples=300, latency_p99_ms=20.0)
    evaluation = evaluate(candidate(good_model(delay_s=0.025)), None, *windows, policy, PROBE)
    gates = gates_of(evaluation)
    assert not gates["latency_sla"] and gates["minimum_quality"] and gates["fairness"]
    assert evaluation.summary["challenger"]["serving"]["latency_p99_ms"] >= 25.0


# -- PyTorch variants and the report -------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_model():
    from keel.training import train_torch

    train, validation, _ = split(training_frame())
    params = {"hidden_units": 32, "layers": 1, "batch_size": 256}
    return train_torch(train, validation, params, seed=3, max_epochs=3, patience=3).model


def test_fp16_and_int8_variants_report_accuracy_change_and_speedup(windows, torch_model):
    evaluation = evaluate(
        candidate(torch_model), None, *windows, POLICY, PROBE, variants_of=torch_model
    )
    variants = {v["variant"]: v for v in evaluation.summary["variants"]}
    assert set(variants) == {"fp32", "fp16", "int8_dynamic"}
    assert variants["fp32"]["auc_change"] == 0.0 and variants["fp32"]["single_row_speedup"] == 1.0
    for name in ("fp16", "int8_dynamic"):
        assert abs(variants[name]["auc_change"]) < 0.02
        # The speedups are the variant's own timings against fp32's, both measured here.
        variant, fp32 = variants[name], variants["fp32"]
        assert variant["single_row_speedup"] == pytest.approx(
            fp32["latency_p50_ms"] / variant["latency_p50_ms"]
        )
        assert variant["batch_speedup"] == pytest.approx(
            variant["throughput_rows_per_s"] / fp32["throughput_rows_per_s"]
        )
    assert variants["int8_dynamic"]["size_ratio"] < 0.8
    assert variants["fp16"]["size_ratio"] < 0.8


def test_html_report_is_self_contained_with_plots_tables_and_the_threshold(windows):
    evaluation = evaluate(
        candidate(good_model(), "runs:/new/model"),
        candidate(worse_model(), "models:/keel-default-risk/1"),
        *windows,
        POLICY,
        PROBE,
    )
    images = evaluation.images()
    assert set(images) == {"curves", "reliability", "fairness"}
    assert all(png.startswith(b"\x89PNG") for png in images.values())
    page = html_report(evaluation.summary, images)
    assert page.count('src="data:image/png;base64,') == 3
    assert not re.search(r"""(src|href)=["']?https?:""", page)
    for text in ("maximises F1", "paired bootstrap", "demographic parity", "p99 ms", "PASS"):
        assert text in page
    tables = markdown_tables(evaluation.summary)
    assert {"gates", "quality", "fairness", "serving"} <= set(tables)
    assert "| no_regression | PASS |" in tables["gates"]
    json.dumps(evaluation.summary)  # the summary is kept as JSON


# -- the Dagster assets, end to end ----------------------------------------------------------------


@pytest.fixture
def trained_runs(keel_home: KeelPaths):
    """A LightGBM and a PyTorch model trained and logged by the training stage's own code."""
    from keel.tracking import CodeVersion, DbtLineage, Lineage, log_training_run
    from keel.training import TrainingOptions, train_family
    from orchestration.resources import MlflowResource

    frame = training_frame(rows=8_000)
    path = keel_home.artefacts / "training_sets" / "set.parquet"
    path.parent.mkdir(parents=True)
    frame.to_parquet(path)
    dataset_version = hashlib.sha256(path.read_bytes()).hexdigest()
    mlflow_resource = MlflowResource(
        tracking_uri=f"sqlite:///{keel_home.mlflow / 'mlflow.db'}",
        registry_uri=f"sqlite:///{keel_home.mlflow / 'mlflow.db'}",
        artifact_location=str(keel_home.mlflow / "artifacts"),
        lock_file=str(keel_home.mlflow / "registry.lock"),
    )
    experiment_id = mlflow_resource.configure()
    lineage = Lineage(
        dataset_version=dataset_version,
        training_set_path=str(path),
        dagster_data_version="test",
        feature_service=schema.FEATURE_SERVICE,
        trained_by="alice",
        code=CodeVersion("0" * 40, dirty=False),
        dbt=DbtLineage("f" * 64, ("stg_accounts", "fct_account_features_daily")),
    )
    options = TrainingOptions(trials=0, max_rounds=60, max_epochs=2, patience=2, seed=1)
    uris = {}
    for family in ("lightgbm", "torch"):
        outcome = train_family(
            family,
            frame,
            dataset_version=dataset_version,
            options=options,
            study_storage=str(keel_home.optuna),
            log=lambda line: None,
        )
        logged = log_training_run(
            outcome,
            lineage,
            experiment_id=experiment_id,
            settings={"validation_days": 7, "test_days": 7},
        )
        uris[family] = logged.model_uri
    return mlflow_resource, uris


def _run_config(challenger_uri: str, torch_uri: str) -> dict:
    config = {
        "challenger_uri": challenger_uri,
        "torch_model_uri": torch_uri,
        "single_row_calls": 20,
        "batch_rows": 1_000,
    }
    return {"ops": {"challenger_evaluation": {"config": config}}}


def _checks(result) -> dict[str, bool]:
    return {
        evaluation.check_name: evaluation.passed
        for evaluation in result.get_asset_check_evaluations()
    }


def test_evaluation_gates_registration_and_registry_action_job(
    keel_home, trained_runs, monkeypatch
):
    from assets.evaluation import ModelGovernance, challenger_evaluation
    from assets.registry import registered_model, registry_action
    from keel.registry import ModelRegistry, RegistryConfig
    from orchestration.resources import ArtefactStore

    mlflow_resource, uris = trained_runs
    instance = dg.DagsterInstance.ephemeral()
    # The latency gate has tests of its own; a busy CI machine must not fail this workflow test.
    lenient = {
        "min_roc_auc": 0.6,
        "max_auc_regression": 1.0,
        "bootstrap_samples": 200,
        "latency_p99_ms": 10_000.0,
    }
    resources = {
        "mlflow": mlflow_resource,
        "artefacts": ArtefactStore(root=str(keel_home.artefacts)),
        "governance": ModelGovernance(auto_approve=True, **lenient),
    }
    assets = [challenger_evaluation, registered_model]

    # First model ever: no champion, the gates pass, auto-approve promotes it.
    first = dg.materialize(
        assets,
        resources=resources,
        run_config=_run_config(uris["lightgbm"], uris["torch"]),
        instance=instance,
    )
    assert first.success
    assert _checks(first) == dict.fromkeys(
        ("minimum_quality", "no_regression", "fairness", "latency_sla"), True
    )
    evaluation = first.asset_materializations_for_node("challenger_evaluation")[0].metadata
    report = Path(evaluation["report"].value)
    assert report.is_file() and "data:image/png;base64," in report.read_text()
    assert "| no_regression | PASS |" in evaluation["gates_table"].value
    assert evaluation["curves_plot"].value.startswith("![ROC and PR](data:image/png;base64,")
    assert "int8_dynamic" in evaluation["variants_table"].value
    registered = first.asset_materializations_for_node("registered_model")[0].metadata
    assert registered["version"].value == 1 and registered["aliases"].value == "champion"
    assert len(registered["audit_trail"].value.records) == 3

    # A challenger that misses the quality bar: the blocking check stops registration.
    strict = {
        **resources,
        "governance": ModelGovernance(
            min_roc_auc=0.999, **{k: v for k, v in lenient.items() if k != "min_roc_auc"}
        ),
    }
    blocked = dg.materialize(
        assets,
        resources=strict,
        run_config=_run_config(uris["torch"], uris["torch"]),
        instance=instance,
        raise_on_error=False,
    )
    assert not blocked.success
    assert _checks(blocked)["minimum_quality"] is False
    assert blocked.asset_materializations_for_node("registered_model") == []
    champion_uri = blocked.asset_materializations_for_node("challenger_evaluation")[0].metadata[
        "champion_uri"
    ]
    assert champion_uri.value == "models:/keel-default-risk/1"

    # Without auto-approve the PyTorch challenger waits for a person: approve, promote, roll back.
    manual = {**resources, "governance": ModelGovernance(**lenient)}
    second = dg.materialize(
        assets,
        resources=manual,
        run_config=_run_config(uris["torch"], uris["torch"]),
        instance=instance,
    )
    assert second.success
    registered = second.asset_materializations_for_node("registered_model")[0].metadata
    assert registered["version"].value == 2 and registered["approval_status"].value == "pending"

    # The job acts as the identity of its process: each person's API key in turn.
    from keel.access import KeyStore, default_store_path

    keys = KeyStore(default_store_path())
    roles = {"alice": ["approver"], "bob": ["approver", "deployer"], "carol": ["deployer"]}
    api_keys = {name: keys.add(name, person_roles) for name, person_roles in roles.items()}

    def act(action: str, actor: str, version: str = "", reason: str = "test"):
        config = {"action": action, "version": version, "reason": reason}
        monkeypatch.setenv("KEEL_API_KEY", api_keys[actor])
        return registry_action.execute_in_process(
            run_config={"ops": {"apply_registry_action": {"config": config}}},
            resources=manual,
            instance=instance,
            raise_on_error=False,
        )

    refused = act("approve", "alice", "2")
    assert not refused.success  # alice trained it
    assert act("approve", "bob", "challenger").success
    assert act("promote", "bob", "2").success
    rolled = act("rollback", "carol", reason="canary error rate")
    assert rolled.success
    observations = instance.fetch_observations(dg.AssetKey("registered_model"), limit=10).records
    actions = [r.asset_observation.metadata["action"].value for r in observations]
    assert actions[:3] == ["rollback", "promote", "approve"]
    registry = ModelRegistry(RegistryConfig.local(keel_home))
    assert registry.champion() == "1"
    assert [r.action for r in registry.audit_records()][-3:] == ["approve", "promote", "rollback"]
    lineage = registry.lineage("champion")
    assert Path(lineage["training_set"]["path"]).is_file()
    assert lineage["training_set"]["sha256_matches"] is True
    registry.close()


def test_the_challenger_is_the_candidate_with_the_better_validation_auc():
    from assets.evaluation import EvaluationConfig, _pick_challenger

    instance = dg.DagsterInstance.ephemeral()
    context = dg.build_asset_context(instance=instance)
    with pytest.raises(dg.Failure, match="no candidate model"):
        _pick_challenger(context, EvaluationConfig())
    for key, auc in (("lightgbm_model", 0.71), ("torch_model", 0.74)):
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                key, metadata={"model_uri": f"runs:/{key}/model", "validation_auc": auc}
            )
        )
    picked = _pick_challenger(context, EvaluationConfig())
    assert picked["uri"] == "runs:/torch_model/model"
    assert "torch_model 0.7400 over lightgbm_model 0.7100" in picked["chosen_because"]
    named = _pick_challenger(context, EvaluationConfig(challenger_uri="models:/m-1"))
    assert named["uri"] == "models:/m-1"
