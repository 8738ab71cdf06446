"""batch_predictions, drift_report and performance_report through `dg.materialize`, small data.

One small world for the module: stationary daily feature marts for 300 accounts, a training set
built by Feast from them, a LightGBM champion trained, logged and registered by Keel's own code.
Then two days run the three assets: a quiet day, and a day whose features drift and whose
arriving labels are about the quiet day's accounts.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keel import schema
from keel.settings import KeelPaths

ACCOUNTS = 300
FIRST = date(2026, 2, 1)
TRAINING_DAYS = 28
QUIET = FIRST + timedelta(days=TRAINING_DAYS + 1)
DRIFTED = QUIET + timedelta(days=1)
SHIFTED = ("spend_7d", "spend_30d", "spend_90d", "payments_7d", "payments_30d", "payments_90d",
           "transactions_7d", "transactions_30d", "active_days_30d", "balance", "utilisation",
           "avg_utilisation_30d")  # fmt: skip


def day_end(day: date) -> datetime:
    return datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC)


def feature_day(rng: np.random.Generator, day: date, shift: float = 0.0) -> pd.DataFrame:
    """One day of the features mart: the same distribution every day unless ``shift``."""
    n = ACCOUNTS
    moved = {name: (1.0 + shift if name in SHIFTED else 1.0) for name in schema.DAILY_FEATURES}
    spend_7d = rng.gamma(2.0, 60.0 * moved["spend_7d"], n)
    spend_30d = spend_7d * 4 * rng.lognormal(0.0, 0.2, n) * moved["spend_30d"]
    credit_limit = rng.choice([1_000.0, 2_500.0, 5_000.0], n)
    utilisation = np.clip(rng.beta(2.0, 4.0, n) * moved["utilisation"], 0, 1.5)
    frame = pd.DataFrame(
        {
            schema.ENTITY_KEY: np.arange(1, n + 1, dtype=np.int64),
            schema.EVENT_TIMESTAMP: pd.Timestamp(day_end(day)),
            schema.CREATED_TIMESTAMP: pd.Timestamp(day_end(day) + timedelta(hours=1)),
            "spend_7d": spend_7d,
            "spend_30d": spend_30d,
            "spend_90d": spend_30d * 3 * rng.lognormal(0.0, 0.1, n) * moved["spend_90d"],
            "payments_7d": spend_7d * rng.beta(5, 2, n) * moved["payments_7d"],
            "payments_30d": spend_30d * rng.beta(5, 2, n) * moved["payments_30d"],
            "payments_90d": spend_30d * 3 * rng.beta(5, 2, n) * moved["payments_90d"],
            "transactions_7d": rng.poisson(6 * moved["transactions_7d"], n).astype(float),
            "transactions_30d": rng.poisson(25 * moved["transactions_30d"], n).astype(float),
            "active_days_30d": np.minimum(30, rng.poisson(15 * moved["active_days_30d"], n)).astype(
                float
            ),
            "balance": utilisation * credit_limit * moved["balance"],
            "utilisation": utilisation,
            "avg_utilisation_30d": np.clip(utilisation + rng.normal(0, 0.05, n), 0, 1.5)
            * moved["avg_utilisation_30d"],
            "max_utilisation_90d": utilisation + 0.05,
            "missed_payments_30d": rng.poisson(0.3 + utilisation).astype(float),
            "missed_payments_90d": rng.poisson(0.9 + utilisation).astype(float),
            "credit_limit": credit_limit,
            "tenure_days": rng.integers(30, 3_000, n).astype(float),
            "product": rng.choice(schema.PRODUCTS, n),
            "main_channel_30d": rng.choice(schema.CHANNELS, n),
        }
    )
    return frame


def write_day(marts, frame: pd.DataFrame, day: date) -> None:
    folder = marts / schema.FEATURES_MART
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), folder / f"{day}.parquet")


def labels_for(features: pd.DataFrame, rng: np.random.Generator, arrival: date) -> pd.DataFrame:
    """Default outcomes that follow missed payments and utilisation, arriving on ``arrival``."""
    logit = -3.0 + 0.9 * features["missed_payments_30d"] + 2.5 * features["utilisation"]
    n = len(features)
    return pd.DataFrame(
        {
            schema.ENTITY_KEY: features[schema.ENTITY_KEY].to_numpy(),
            schema.EVENT_TIMESTAMP: features[schema.EVENT_TIMESTAMP].to_numpy(),
            schema.LABEL_TIMESTAMP: pd.Timestamp(day_end(arrival)),
            schema.LABEL: (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64),
            "age_band": rng.choice(schema.AGE_BANDS, n),
            "sex": rng.choice(schema.SEXES, n),
            "region": rng.choice(schema.REGIONS, n),
        }
    )


def write_labels(marts, labels: pd.DataFrame, arrival: date) -> None:
    folder = marts / schema.LABELS_MART
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(labels, preserve_index=False)
    pq.write_table(table, folder / f"{arrival}.parquet")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registered LightGBM champion trained on Feast's training set over stationary marts."""
    home = tmp_path_factory.mktemp("scoring") / "keel-home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEEL_HOME", str(home))
        patch.setenv("KEEL_PROFILE", "local")
        patch.delenv("DAGSTER_HOME", raising=False)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            patch.delenv(name, raising=False)
        paths = KeelPaths(home).ensure()
        yield _build_world(paths)


def _build_world(paths: KeelPaths) -> dict:
    from keel import features
    from keel.tracking import CodeVersion, DbtLineage, Lineage, log_training_run
    from keel.training import TrainingOptions, train_family
    from orchestration.profiles import resources_for

    rng = np.random.default_rng(5)
    days = [FIRST + timedelta(days=i) for i in range(TRAINING_DAYS)]
    for day in days:
        frame = feature_day(rng, day)
        write_day(paths.marts, frame, day)
        arrival = day + timedelta(days=1)
        write_labels(paths.marts, labels_for(frame, rng, arrival), arrival)
    resources = resources_for("local")
    store = resources["feature_store"].store()
    features.apply_repo(store)
    labels = features.read_mart(paths.marts / schema.LABELS_MART, "labels")
    built = features.build_training_set(store, labels, paths.artefacts / "training_sets")

    outcome = train_family(
        "lightgbm",
        pd.read_parquet(built.path),
        dataset_version=built.dataset_version,
        options=TrainingOptions(trials=0, max_rounds=40, num_threads=1, seed=1),
        study_storage=str(paths.optuna),
        log=lambda line: None,
    )
    mlflow = resources["mlflow"]
    lineage = Lineage(
        dataset_version=built.dataset_version,
        training_set_path=str(built.path),
        dagster_data_version="test",
        feature_service=schema.FEATURE_SERVICE,
        trained_by="alice",
        code=CodeVersion("0" * 40, dirty=False),
        dbt=DbtLineage("f" * 64, ("fct_account_features_daily",)),
    )
    logged = log_training_run(
        outcome, lineage, experiment_id=mlflow.configure(), settings={"seed": 1}
    )
    registry = resources["governance"].registry(mlflow)
    gates = {"minimum_quality": True, "no_regression": True, "fairness": True, "latency_sla": True}
    registered = registry.register(
        logged.run_id,
        {"roc_auc": 0.8},
        gates,
        actor="pipeline",
        auto_approve=True,
        model_uri=logged.model_uri,
    )
    version = registered.version
    assert registry.champion() == version

    # The quiet day looks like training; the next day drifts, and labels about the quiet
    # day's accounts arrive on it.
    quiet = feature_day(rng, QUIET)
    write_day(paths.marts, quiet, QUIET)
    write_day(paths.marts, feature_day(rng, DRIFTED, shift=1.0), DRIFTED)
    arriving = labels_for(quiet, rng, DRIFTED)
    write_labels(paths.marts, arriving, DRIFTED)

    from assets.inference import batch_predictions
    from assets.monitoring import drift_report, performance_report

    runs = {
        day: dg.materialize(
            [batch_predictions, drift_report, performance_report],
            resources=resources,
            partition_key=day.isoformat(),
            instance=dg.DagsterInstance.ephemeral(),
        )
        for day in (QUIET, DRIFTED)
    }
    return {
        "paths": paths,
        "runs": runs,
        "version": version,
        "quiet": quiet,
        "arriving": arriving,
        "training_set": built,
    }


def metadata(world, day: date, asset: str) -> dict:
    run = world["runs"][day]
    assert run.success
    return run.asset_materializations_for_node(asset)[0].metadata


def predictions(world, day: date) -> pd.DataFrame:
    path = world["paths"].artefacts / "predictions" / f"{day}.parquet"
    return pd.read_parquet(path)


def test_batch_predictions_score_every_account_of_the_day_with_the_champion(world):
    from keel.training import REGISTERED_MODEL_NAME, load_risk_model

    frame = predictions(world, QUIET)
    written = metadata(world, QUIET, "batch_predictions")

    assert sorted(frame[schema.ENTITY_KEY]) == list(range(1, ACCOUNTS + 1))
    assert written["rows"].value == ACCOUNTS
    assert set(frame["model_version"]) == {world["version"]}
    assert written["model_version"].value == world["version"]
    # The day's features as the mart holds them, scored by the registered model.
    mart = world["quiet"].set_index(schema.ENTITY_KEY)
    scored = frame.set_index(schema.ENTITY_KEY)
    for column in ("balance", "utilisation", "missed_payments_30d", "product"):
        assert scored[column].tolist() == mart.loc[scored.index, column].tolist(), column
    model = load_risk_model(f"models:/{REGISTERED_MODEL_NAME}/{world['version']}")
    expected = model.predict_proba(frame[list(schema.MODEL_FEATURES)])
    np.testing.assert_allclose(frame["score"].to_numpy(), expected, rtol=1e-12)
    assert written["mean_score"].value == pytest.approx(float(expected.mean()))


def test_drift_report_flags_the_drifted_day_and_not_the_quiet_one(world):
    quiet = metadata(world, QUIET, "drift_report")
    drifted = metadata(world, DRIFTED, "drift_report")

    assert quiet["dataset_drift"].value is False
    assert drifted["dataset_drift"].value is True
    assert set(drifted["drifted_features"].value) >= {"spend_7d", "transactions_30d", "balance"}
    assert not set(drifted["drifted_features"].value) & {"credit_limit", "tenure_days", "product"}
    assert quiet["rows"].value == drifted["rows"].value == ACCOUNTS
    assert quiet["champion_version"].value == world["version"]
    assert quiet["reference_built_now"].value is True
    assert drifted["reference_built_now"].value is False
    assert (world["paths"].artefacts / "monitoring" / "drift" / f"{DRIFTED}.html").exists()


def test_performance_report_measures_the_scores_whose_labels_arrived(world):
    from sklearn.metrics import roc_auc_score

    nothing_yet = metadata(world, QUIET, "performance_report")
    assert nothing_yet["labels_arrived"].value == 0
    assert "auc" not in nothing_yet

    measured = metadata(world, DRIFTED, "performance_report")
    arriving = world["arriving"]
    scored = predictions(world, QUIET).merge(
        arriving, on=[schema.ENTITY_KEY, schema.EVENT_TIMESTAMP]
    )
    assert measured["labels_arrived"].value == len(arriving) == ACCOUNTS
    assert measured["labelled_predictions"].value == ACCOUNTS
    assert measured["observation_days"].value == [QUIET.isoformat()]
    assert measured["auc"].value == pytest.approx(
        roc_auc_score(scored[schema.LABEL], scored["score"]), abs=1e-9
    )
    assert measured["auc"].value > 0.6  # the champion ranks the outcomes it was trained on
