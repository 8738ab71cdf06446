"""Training stage: time split, reproducibility, resume after SIGKILL, Optuna resume, MLflow
lineage, model behaviour and weight integrity."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from keel import schema
from keel.settings import KeelPaths
from keel.training import (
    FAMILIES,
    MONOTONE_INCREASING,
    ModelIntegrityError,
    TrainingDataError,
    TrainingOptions,
    load_model_folder,
    load_risk_model,
    save_risk_model,
    split_cutoffs,
    time_split,
    train_family,
    train_lightgbm,
    train_torch,
)
from tests.conftest import REPO_ROOT

VALIDATION_DAYS = 7
TEST_DAYS = 7


def synthetic_training_set(rows: int = 4_000, seed: int = 0, days: int = 56) -> pd.DataFrame:
    """A point-in-time training set shaped like the feature store's, with a known risk model.

    Defaults rise with missed payments and utilisation (about 5-8% positives); labels arrive
    1 to 21 days after the features; a few values are missing and a few categories unseen.
    """
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2026-01-01", tz="UTC")
    event_timestamp = (
        start
        + pd.to_timedelta(rng.integers(0, days, rows), unit="D")
        + pd.Timedelta(hours=23, minutes=59)
    )
    label_timestamp = event_timestamp + pd.to_timedelta(rng.integers(1, 22, rows), unit="D")
    credit_limit = rng.choice([1_000.0, 2_500.0, 5_000.0, 10_000.0], rows)
    utilisation = rng.beta(2.0, 4.0, rows)
    avg_utilisation = np.clip(utilisation + rng.normal(0.0, 0.05, rows), 0.0, 1.0)
    missed_30d = rng.poisson(0.15 + 0.6 * utilisation)
    missed_90d = missed_30d + rng.poisson(0.3, rows)
    spend_7d = rng.gamma(2.0, 150.0, rows)
    spend_30d = spend_7d * 4 * rng.lognormal(0.0, 0.2, rows)
    payments_30d = spend_30d * rng.beta(5.0, 2.0, rows) * (1 - 0.15 * np.clip(missed_30d, 0, 3))
    tenure_days = rng.integers(30, 3_000, rows).astype(float)
    product = rng.choice(schema.PRODUCTS, rows, p=[0.6, 0.3, 0.1]).astype(object)
    channel = rng.choice(schema.CHANNELS, rows).astype(object)
    logit = (
        -4.0
        + 0.9 * missed_30d
        + 0.35 * missed_90d
        + 3.0 * (utilisation - 0.3)
        - 1.0 * (payments_30d / spend_30d - 0.7)
        + 0.3 * (product == "classic")
        - tenure_days / 3_000
    )
    defaulted = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype("int64")
    frame = pd.DataFrame(
        {
            schema.ENTITY_KEY: rng.integers(1, max(rows // 20, 50), rows).astype("int64"),
            schema.EVENT_TIMESTAMP: event_timestamp,
            schema.LABEL_TIMESTAMP: label_timestamp,
            schema.LABEL: defaulted,
            "age_band": rng.choice(schema.AGE_BANDS, rows),
            "sex": rng.choice(schema.SEXES, rows),
            "region": rng.choice(schema.REGIONS, rows),
            "spend_7d": spend_7d,
            "spend_30d": spend_30d,
            "spend_90d": spend_30d * 3 * rng.lognormal(0.0, 0.1, rows),
            "payments_7d": payments_30d / 4,
            "payments_30d": payments_30d,
            "payments_90d": payments_30d * 3,
            "transactions_7d": rng.poisson(6, rows).astype(float),
            "transactions_30d": rng.poisson(25, rows).astype(float),
            "active_days_30d": np.minimum(30, rng.poisson(15, rows)).astype(float),
            "balance": utilisation * credit_limit,
            "utilisation": utilisation,
            "avg_utilisation_30d": avg_utilisation,
            "max_utilisation_90d": np.maximum(utilisation, avg_utilisation) + 0.05,
            "missed_payments_30d": missed_30d.astype(float),
            "missed_payments_90d": missed_90d.astype(float),
            "credit_limit": credit_limit,
            "tenure_days": tenure_days,
            "product": product,
            "main_channel_30d": channel,
            "payment_to_spend_30d": payments_30d / spend_30d,
            "spend_trend_7d_vs_30d": spend_7d / (spend_30d / 4),
            "balance_to_limit": utilisation,
        }
    )
    frame.loc[rng.random(rows) < 0.02, "avg_utilisation_30d"] = np.nan
    frame.loc[rng.random(rows) < 0.005, "product"] = "diamond"
    frame.loc[rng.random(rows) < 0.005, "main_channel_30d"] = None
    return frame


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return synthetic_training_set()


@pytest.fixture(scope="module")
def windows(frame):
    return time_split(frame, VALIDATION_DAYS, TEST_DAYS)


@pytest.fixture(scope="module")
def lightgbm_fit(windows):
    return train_lightgbm(windows.train, windows.validation, seed=3, num_threads=1)


@pytest.fixture(scope="module")
def torch_fit(windows):
    return train_torch(windows.train, windows.validation, seed=3, max_epochs=4)


@pytest.fixture
def parquet_training_set(tmp_path, frame) -> Path:
    path = tmp_path / "training_set.parquet"
    frame.to_parquet(path)
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- split


def test_time_split_never_leaks_the_future(frame, windows):
    cutoffs = split_cutoffs(frame, VALIDATION_DAYS, TEST_DAYS)
    train, validation, test = windows
    event = schema.EVENT_TIMESTAMP

    assert train[event].max() < cutoffs.validation_start <= validation[event].min()
    assert validation[event].max() < cutoffs.test_start <= test[event].min()
    assert (cutoffs.test_start - cutoffs.validation_start).days == VALIDATION_DAYS
    for part in windows:
        assert part[event].is_monotonic_increasing
    # Every training label was known at the training cut-off, and the rule did drop rows.
    assert (train[schema.LABEL_TIMESTAMP] <= cutoffs.validation_start).all()
    before_cutoff = int((frame[event] < cutoffs.validation_start).sum())
    assert 0 < len(train) < before_cutoff
    assert len(validation) + len(test) == int((frame[event] >= cutoffs.validation_start).sum())


def test_time_split_train_window_ignores_everything_after_the_cutoff(frame, windows):
    cutoffs = split_cutoffs(frame, VALIDATION_DAYS, TEST_DAYS)
    changed = frame.copy()
    later = changed[schema.EVENT_TIMESTAMP] >= cutoffs.validation_start
    changed.loc[later, schema.LABEL] = 1 - changed.loc[later, schema.LABEL]
    changed.loc[later, "utilisation"] = 0.99

    pd.testing.assert_frame_equal(
        time_split(changed, VALIDATION_DAYS, TEST_DAYS).train, windows.train
    )


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda f: f.drop(columns=["utilisation"]), "lacks columns utilisation"),
        (
            lambda f: f.assign(event_timestamp=f[schema.EVENT_TIMESTAMP].dt.tz_localize(None)),
            "timezone-aware",
        ),
        (lambda f: f.assign(defaulted=f[schema.LABEL].replace(1, 2)), "must be 0/1"),
        (lambda f: f.assign(defaulted=f[schema.LABEL].astype(float).where(f.index > 5)), "nulls"),
        (lambda f: f.iloc[:0], "no rows"),
    ],
)
def test_time_split_rejects_broken_frames(frame, breakage, message):
    with pytest.raises(TrainingDataError, match=message):
        time_split(breakage(frame), VALIDATION_DAYS, TEST_DAYS)


def test_loading_a_training_set_names_every_missing_column(tmp_path, frame):
    from keel.training import load_training_set

    path = tmp_path / "partial.parquet"
    frame.drop(columns=["utilisation", "product"]).to_parquet(path)
    with pytest.raises(TrainingDataError, match="lacks columns utilisation, product"):
        load_training_set(path)
    with pytest.raises(TrainingDataError, match="materialise the `training_set` asset"):
        load_training_set(tmp_path / "absent.parquet")
    frame.to_parquet(path)
    assert len(load_training_set(path)) == len(frame)


def test_time_split_needs_enough_history(frame):
    with pytest.raises(TrainingDataError, match="train window"):
        time_split(frame, validation_days=45, test_days=10)


# --------------------------------------------------------------------------- reproducibility


def test_lightgbm_fit_is_reproducible(tmp_path, windows, lightgbm_fit):
    again = train_lightgbm(windows.train, windows.validation, seed=3, num_threads=1)

    assert again.model.model_text() == lightgbm_fit.model.model_text()
    first = save_risk_model(lightgbm_fit.model, tmp_path / "first")
    second = save_risk_model(again.model, tmp_path / "second")
    assert file_sha256(first / "model.txt") == file_sha256(second / "model.txt")


def test_torch_fit_is_reproducible(tmp_path, windows, torch_fit):
    again = train_torch(windows.train, windows.validation, seed=3, max_epochs=4)

    first = save_risk_model(torch_fit.model, tmp_path / "first")
    second = save_risk_model(again.model, tmp_path / "second")
    assert file_sha256(first / "weights.safetensors") == file_sha256(second / "weights.safetensors")
    other_seed = train_torch(windows.train, windows.validation, seed=4, max_epochs=1)
    third = save_risk_model(other_seed.model, tmp_path / "third")
    assert file_sha256(third / "weights.safetensors") != file_sha256(first / "weights.safetensors")


# --------------------------------------------------------------------------- preemption

TORCH_SCRIPT = """
import sys, time
import pandas as pd
from keel.training import save_risk_model, time_split, train_torch

parquet, checkpoint_dir, out_dir, pause = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
train, validation, _ = time_split(pd.read_parquet(parquet), 7, 7)
fit = train_torch(
    train, validation, seed=11, max_epochs=6, patience=10, checkpoint_dir=checkpoint_dir,
    on_epoch_end=lambda epoch, auc: time.sleep(pause),
)
save_risk_model(fit.model, out_dir)
print("resumed_from_epoch", fit.resumed_from_epoch, "epochs_run", fit.epochs_run)
"""


def run_script(script: str, *args: str, **popen) -> subprocess.Popen:
    # One thread everywhere: the same arithmetic order in every run, whatever else runs here.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finish(process: subprocess.Popen, timeout: float = 240) -> str:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr
    return stdout


def wait_until(condition, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"process ended early: {process.communicate()[1]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def test_sigkill_mid_training_then_resume_gives_identical_weights(tmp_path, parquet_training_set):
    import torch

    uninterrupted = run_script(
        TORCH_SCRIPT, str(parquet_training_set), str(tmp_path / "ckpt-a"), str(tmp_path / "a"), "0"
    )
    finish(uninterrupted)

    checkpoint = tmp_path / "ckpt-b" / "checkpoint.pt"

    def epochs_done() -> int:
        if not checkpoint.exists():
            return 0
        return torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"]

    victim = run_script(
        TORCH_SCRIPT, str(parquet_training_set), str(checkpoint.parent), str(tmp_path / "b"), "5"
    )
    wait_until(lambda: epochs_done() >= 2, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_at = epochs_done()
    assert 2 <= killed_at < 6
    assert not (tmp_path / "b").exists()
    # The atomic write leaves no half-written temp file behind, even when killed.
    assert [path.name for path in checkpoint.parent.iterdir()] == ["checkpoint.pt"]

    resumed = run_script(
        TORCH_SCRIPT, str(parquet_training_set), str(checkpoint.parent), str(tmp_path / "b"), "0"
    )
    assert f"resumed_from_epoch {killed_at} epochs_run 6" in finish(resumed)
    assert file_sha256(tmp_path / "b" / "weights.safetensors") == file_sha256(
        tmp_path / "a" / "weights.safetensors"
    )


def test_checkpoint_of_another_fit_is_refused(tmp_path, windows):
    from keel.tabular_net import CheckpointMismatchError

    train_torch(windows.train, windows.validation, seed=1, max_epochs=1, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointMismatchError, match="other data or settings"):
        train_torch(
            windows.train, windows.validation, seed=2, max_epochs=2, checkpoint_dir=tmp_path
        )


OPTUNA_SCRIPT = """
import sys, time
import pandas as pd
from keel.training import TrainingOptions, time_split
from keel.tuning import tune

parquet, storage = sys.argv[1], sys.argv[2]
train, validation, _ = time_split(pd.read_parquet(parquet), 7, 7)
tune(
    "lightgbm", train, validation, storage=storage, study_name="resume-test",
    options=TrainingOptions(trials=6, seed=5, max_rounds=60, num_threads=1),
    callbacks=[lambda study, trial: time.sleep(3)],
)
"""


def test_interrupted_optuna_study_resumes_instead_of_starting_over(
    tmp_path, parquet_training_set, windows
):
    import optuna

    from keel.tuning import FINISHED_STATES, open_storage, storage_url, tune

    storage = str(tmp_path / "optuna")

    def finished_trials() -> list[optuna.trial.FrozenTrial]:
        if not (tmp_path / "optuna" / "lightgbm.db").exists():
            return []
        try:
            study = optuna.load_study(
                study_name="resume-test", storage=open_storage(storage_url(storage, "lightgbm"))
            )
        except KeyError:  # the study row is not written yet
            return []
        return study.get_trials(states=FINISHED_STATES)

    victim = run_script(OPTUNA_SCRIPT, str(parquet_training_set), storage)
    wait_until(lambda: len(finished_trials()) >= 2, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    before = {trial.number: trial.params for trial in finished_trials()}
    assert 2 <= len(before) < 6

    result = tune(
        "lightgbm",
        windows.train,
        windows.validation,
        storage=storage,
        study_name="resume-test",
        options=TrainingOptions(trials=6, seed=5, max_rounds=60, num_threads=1),
    )

    assert result.finished_trials == 6
    assert result.new_trials == 6 - len(before)
    after = {trial.number: trial.params for trial in finished_trials()}
    assert {number: after[number] for number in before} == before
    assert result.best_value == max(result.trial_values)
    # The trial the kill interrupted was failed before resuming (the draws are compared with
    # an uninterrupted study's in the next test, and through the Dagster retry when slow).
    assert len(result.orphaned_trials) <= 1 and len(after) + len(result.orphaned_trials) == (
        max(after) + 1
    )


def test_a_study_reopened_with_a_trial_left_running_continues_the_same_draws(tmp_path, windows):
    import optuna

    from keel.tuning import FINISHED_STATES, open_study, tune

    def run(folder: str, trials: int):
        return tune(
            "lightgbm",
            windows.train,
            windows.validation,
            storage=str(tmp_path / folder),
            study_name="reopened",
            options=TrainingOptions(trials=trials, seed=3, max_rounds=20, num_threads=1),
        )

    uninterrupted = run("a", 4)
    run("b", 2)
    # A process that died in its third trial leaves it running.
    abandoned = open_study("lightgbm", storage=str(tmp_path / "b"), study_name="reopened", seed=3)
    abandoned.ask()
    resumed = run("b", 4)

    def drawn(result) -> list[dict]:
        study = optuna.load_study(study_name="reopened", storage=result.storage)
        return [trial.params for trial in study.get_trials(states=FINISHED_STATES)]

    assert resumed.orphaned_trials == [2]
    assert (resumed.finished_trials, resumed.new_trials) == (4, 2)
    assert drawn(resumed) == drawn(uninterrupted)
    assert resumed.best_params == uninterrupted.best_params


@pytest.mark.parametrize("reproducible", [True, False])
def test_the_trial_count_alone_ends_a_reproducible_search(tmp_path, windows, reproducible):
    from keel.tuning import tune

    options = TrainingOptions(
        trials=3, time_budget_s=1e-3, max_rounds=20, num_threads=1, reproducible=reproducible
    )
    result = tune(
        "lightgbm",
        windows.train,
        windows.validation,
        storage=str(tmp_path),
        study_name="budget",
        options=options,
    )
    # Past the time budget after its first trial: only a search without it runs all three.
    assert result.finished_trials == (3 if reproducible else 1)


def test_best_trial_parameters_feed_the_final_fit(keel_home: KeelPaths, frame):
    outcome = train_family(
        "lightgbm",
        frame,
        dataset_version="a" * 64,
        options=TrainingOptions(trials=3, max_rounds=80, num_threads=1),
        study_storage=str(keel_home.optuna),
        log=lambda line: None,
    )

    assert outcome.tuning.finished_trials == 3
    assert outcome.tuning.best_trial is not None
    assert (keel_home.optuna / "lightgbm.db").exists()
    for name, value in outcome.best_params.items():
        assert outcome.params[name] == value
    assert {"validation_auc", "test_auc", "test_log_loss"} <= set(outcome.metrics)


def test_a_trial_behind_the_median_stops_early_and_is_pruned(tmp_path, windows):
    import optuna

    from keel.tuning import open_study, tune

    max_rounds = 200
    study = open_study("lightgbm", storage=str(tmp_path), study_name="pruning", seed=1)
    # Three finished trials that reported an AUC no fit on this data reaches, at every round.
    for _ in range(3):
        study.add_trial(
            optuna.trial.create_trial(
                value=0.999,
                intermediate_values={step: 0.999 for step in range(10, max_rounds + 1, 10)},
            )
        )
    options = TrainingOptions(
        trials=4, max_rounds=max_rounds, early_stopping_rounds=max_rounds, num_threads=1
    )

    result = tune(
        "lightgbm",
        windows.train,
        windows.validation,
        storage=str(tmp_path),
        study_name="pruning",
        options=options,
    )

    assert (tmp_path / "lightgbm.db").exists()
    assert (result.new_trials, result.pruned_trials) == (1, 1)
    trial = study.get_trials(deepcopy=False)[-1]
    assert trial.state == optuna.trial.TrialState.PRUNED
    # Reported every 10 rounds and stopped at the first report past the 50 warm-up rounds.
    assert sorted(trial.intermediate_values) == [10, 20, 30, 40, 50]
    assert all(value < 0.999 for value in trial.intermediate_values.values())


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("feature", MONOTONE_INCREASING)
def test_more_missed_payments_never_lower_the_risk_score(
    family, feature, windows, lightgbm_fit, torch_fit
):
    model = {"lightgbm": lightgbm_fit, "torch": torch_fit}[family].model
    # Real rows, plus rows whose other numbers are shuffled across rows: a guarantee must hold
    # off the data's manifold too, where an unconstrained model bends most easily.
    real = windows.test.head(200)
    rng = np.random.default_rng(0)
    shuffled = real.copy()
    for column in schema.NUMERIC_FEATURES:
        shuffled[column] = rng.permutation(real[column].to_numpy()) * rng.uniform(0, 3, len(real))
    rows = pd.concat([real, shuffled], ignore_index=True)
    grid = np.arange(0, 25, dtype=float)
    scores = np.stack([model.predict_proba(rows.assign(**{feature: value})) for value in grid])

    assert (np.diff(scores, axis=0) >= 0).all()
    assert (scores[-1] > scores[0]).mean() > 0.5  # the feature is used, not just tolerated


def test_network_is_monotone_by_construction_whatever_its_weights():
    import torch

    from keel.tabular_net import TabularNet

    torch.manual_seed(0)
    network = TabularNet(free_inputs=6, monotone_inputs=2, cardinalities=[4, 5]).eval()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.normal_(0.0, 2.0)  # far from any trained state
    rows = 500
    free, categories = torch.randn(rows, 6), torch.randint(0, 4, (rows, 2))
    base = torch.randn(rows, 2)
    for column in range(2):
        steps = torch.linspace(-5, 5, 41)
        scores = []
        for step in steps:
            monotone = base.clone()
            monotone[:, column] = step
            with torch.no_grad():
                scores.append(network(free, monotone, categories))
        assert (torch.diff(torch.stack(scores), dim=0) >= 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_models_score_missing_values_and_unseen_categories(
    family, windows, lightgbm_fit, torch_fit
):
    model = {"lightgbm": lightgbm_fit, "torch": torch_fit}[family].model
    rows = windows.test.head(8).copy()
    rows.loc[rows.index[:4], "product"] = "titanium"
    rows.loc[rows.index[4:], "main_channel_30d"] = None
    rows.loc[rows.index[::2], "utilisation"] = np.nan
    rows.loc[rows.index[1], "payment_to_spend_30d"] = np.inf

    scores = model.predict_proba(rows)

    assert scores.shape == (8,)
    assert np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
    assert model.family == family
    assert set(model.feature_names) == set(schema.MODEL_FEATURES)
    protected = set(schema.PROTECTED_ATTRIBUTES) | {schema.LABEL}
    assert not protected & set(model.feature_names)
    with pytest.raises(TrainingDataError, match="lacks model features utilisation"):
        model.predict_proba(rows.drop(columns=["utilisation"]))


def test_class_weighting_keeps_probabilities_calibrated(windows, lightgbm_fit, torch_fit):
    base_rate = windows.test[schema.LABEL].mean()
    for fit in (lightgbm_fit, torch_fit):
        mean_score = fit.model.predict_proba(windows.test).mean()
        assert base_rate / 2 < mean_score < base_rate * 2, fit.model.family


def test_reduced_precision_variants_keep_the_interface(windows, torch_fit):
    rows = windows.test
    reference = torch_fit.model.predict_proba(rows)
    for variant, precision in (
        (torch_fit.model.half_precision(), "fp16"),
        (torch_fit.model.dynamic_int8(), "int8"),
    ):
        scores = variant.predict_proba(rows)
        assert variant.precision == precision
        assert variant.family == "torch"
        assert variant.feature_names == torch_fit.model.feature_names
        assert scores.shape == reference.shape and scores.dtype == np.float64
        assert np.abs(scores - reference).max() < 0.02
    assert torch_fit.model.precision == "fp32"


# --------------------------------------------------------------------------- integrity


@pytest.mark.parametrize("family", FAMILIES)
def test_altered_weights_are_refused(tmp_path, family, windows, lightgbm_fit, torch_fit):
    model = {"lightgbm": lightgbm_fit, "torch": torch_fit}[family].model
    folder = save_risk_model(model, tmp_path / family)
    np.testing.assert_array_equal(
        load_model_folder(folder).predict_proba(windows.test), model.predict_proba(windows.test)
    )

    weights = folder / json.loads((folder / "model.json").read_text())["weights_file"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    with pytest.raises(ModelIntegrityError, match="refusing to load altered weights"):
        load_model_folder(folder)


def test_folder_without_model_config_is_refused(tmp_path):
    with pytest.raises(ModelIntegrityError, match="not a Keel model"):
        load_model_folder(tmp_path)


# --------------------------------------------------------------------------- devices


def test_compute_resource_uses_cuda_only_when_torch_sees_it():
    import torch

    from keel.tabular_net import DeviceError, mixed_precision_dtype
    from orchestration.resources import ComputeResource

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert ComputeResource(device="auto").torch_device() == expected
    assert ComputeResource(device="cpu").torch_device() == "cpu"
    assert mixed_precision_dtype("cpu") is None
    with pytest.raises(DeviceError, match="unknown device"):
        ComputeResource(device="tpu").torch_device()
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="torch sees no CUDA GPU"):
            ComputeResource(device="cuda").torch_device()


# --------------------------------------------------------------------------- lineage and MLflow

MANIFEST_MODELS = {
    "stg_generator__accounts": [],
    "stg_generator__transactions": [],
    "int_account_days": ["model.keel.stg_generator__transactions"],
    "fct_account_features_daily": ["model.keel.int_account_days"],
    "fct_default_labels": ["model.keel.stg_generator__transactions"],
    "dim_accounts": ["model.keel.stg_generator__accounts"],
    "rpt_unrelated": ["source.keel.raw.events"],
}


@pytest.fixture
def dbt_manifest(tmp_path) -> Path:
    nodes = {
        f"model.keel.{name}": {
            "resource_type": "model",
            "name": name,
            "alias": name,
            "config": {},
            "depends_on": {"nodes": parents},
        }
        for name, parents in MANIFEST_MODELS.items()
    }
    nodes["test.keel.unique_account"] = {"resource_type": "test", "name": "unique_account"}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"metadata": {}, "nodes": nodes}))
    return path


def test_dbt_lineage_lists_models_upstream_of_the_marts(dbt_manifest, tmp_path):
    from keel.tracking import LineageError, dbt_lineage

    lineage = dbt_lineage(dbt_manifest)

    assert lineage.manifest_hash == file_sha256(dbt_manifest)
    assert lineage.models == tuple(sorted(set(MANIFEST_MODELS) - {"rpt_unrelated"}))
    with pytest.raises(LineageError, match="keel prepare"):
        dbt_lineage(tmp_path / "missing.json")


def test_code_version_reads_git_or_takes_a_fixed_commit(tmp_path):
    from keel.tracking import LineageError, code_version

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    with pytest.raises(LineageError, match=r"set MlflowResource\.code_commit"):
        code_version(tmp_path)  # not a git checkout
    # An image without .git carries the commit it was built from.
    assert code_version(tmp_path, commit="abc123") == code_version(commit="abc123")
    assert not code_version(tmp_path, commit="abc123").dirty

    git("init", "-q")
    (tmp_path / "model.py").write_text("x = 1\n")
    git("add", "model.py")
    git("commit", "-q", "-m", "first")
    clean = code_version(tmp_path)
    assert clean.commit == git("rev-parse", "HEAD") and not clean.dirty
    (tmp_path / "model.py").write_text("x = 2\n")
    assert code_version(tmp_path).dirty
    git("commit", "-q", "-am", "second")
    assert code_version(tmp_path).commit == git("rev-parse", "HEAD") != clean.commit
    (tmp_path / "notes.txt").write_text("untracked")
    assert code_version(tmp_path).dirty


def local_mlflow(paths: KeelPaths):
    """The local profile's MLflow store inside the test's data folder."""
    from orchestration.resources import MlflowResource

    store = f"sqlite:///{paths.mlflow / 'mlflow.db'}"
    return MlflowResource(
        tracking_uri=store,
        registry_uri=store,
        artifact_location=str(paths.mlflow / "artifacts"),
        lock_file=str(paths.mlflow / "registry.lock"),
    )


def materialise_training(keel_home: KeelPaths, path: Path, dbt_manifest: Path, monkeypatch):
    from assets.training import lightgbm_model, torch_model
    from orchestration.resources import ComputeResource

    monkeypatch.setattr("keel.tracking.DBT_MANIFEST", dbt_manifest)

    @dg.asset(name="training_set")
    def training_set() -> dg.MaterializeResult:
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(path)),
                "dataset_version": file_sha256(path),
                "feature_service": "default_risk_v1",
            }
        )

    resources = {
        "mlflow": local_mlflow(keel_home),
        "compute": ComputeResource(
            device="auto",
            checkpoint_dir=str(keel_home.artefacts / "checkpoints"),
            study_storage=str(keel_home.optuna),
            num_threads=1,
        ),
    }
    run_config = {
        "ops": {
            "lightgbm_model": {"config": {"trials": 2, "max_rounds": 80, "trained_by": "tester"}},
            "torch_model": {
                "config": {"trials": 1, "tuning_epochs": 2, "max_epochs": 3, "trained_by": "tester"}
            },
        }
    }
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [training_set, lightgbm_model, torch_model],
        resources=resources,
        run_config=run_config,
        instance=instance,
    )
    return result, instance


def test_training_assets_log_runs_with_full_lineage(
    keel_home, parquet_training_set, dbt_manifest, monkeypatch
):
    import mlflow

    from keel.schema import LINEAGE_TAGS
    from keel.tracking import code_version
    from keel.training import EXPERIMENT_NAME
    from orchestration.resources import ComputeResource

    result, instance = materialise_training(
        keel_home, parquet_training_set, dbt_manifest, monkeypatch
    )
    assert result.success
    upstream = instance.get_latest_materialization_event(dg.AssetKey("training_set"))
    data_version = upstream.asset_materialization.tags["dagster/data_version"]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{keel_home.mlflow / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    assert experiment.artifact_location.endswith("mlflow/artifacts")
    test_rows = pd.read_parquet(parquet_training_set).tail(50)
    for family, asset in (("lightgbm", "lightgbm_model"), ("torch", "torch_model")):
        metadata = result.asset_materializations_for_node(asset)[0].metadata
        run = client.get_run(metadata["run_id"].value)
        tags = run.data.tags
        assert {tag for tag in LINEAGE_TAGS if tags.get(tag)} == set(LINEAGE_TAGS)
        assert tags["keel.dataset_version"] == file_sha256(parquet_training_set)
        assert tags["keel.dataset_version"] == metadata["dataset_version"].value
        assert tags["keel.training_set_path"] == str(parquet_training_set)
        assert tags["keel.dagster_data_version"] == data_version
        assert tags["keel.code_commit"] == tags["mlflow.source.git.commit"]
        assert tags["keel.code_dirty"] == str(code_version().dirty).lower()
        assert tags["keel.feature_service"] == "default_risk_v1"
        assert tags["keel.dbt_manifest_hash"] == file_sha256(dbt_manifest)
        assert "fct_account_features_daily" in tags["keel.dbt_models"].split(",")
        assert tags["keel.model_family"] == family
        assert tags["keel.trained_by"] == "tester"

        best_params = metadata["best_params"].value
        assert best_params and all(run.data.params[k] == str(v) for k, v in best_params.items())
        assert run.data.params[f"package.{'lightgbm' if family == 'lightgbm' else 'torch'}"]
        assert run.data.params["setting.seed"] == "7"
        assert metadata["validation_auc"].value == pytest.approx(run.data.metrics["validation_auc"])
        assert 0.5 < run.data.metrics["test_auc"] <= 1.0
        artefacts = {item.path for item in client.list_artifacts(run.info.run_id, "environment")}
        assert "environment/packages.json" in artefacts

        model_uri = metadata["model_uri"].value
        info = mlflow.models.get_model_info(model_uri)
        assert info.signature is not None and info.saved_input_example_info is not None
        pyfunc_scores = mlflow.pyfunc.load_model(model_uri).predict(
            test_rows[list(schema.MODEL_FEATURES)]
        )
        model = load_risk_model(model_uri)
        assert model.family == family
        assert pyfunc_scores.shape == (50,)
        np.testing.assert_allclose(pyfunc_scores, model.predict_proba(test_rows))
    torch_metadata = result.asset_materializations_for_node("torch_model")[0].metadata
    # device="auto": the GPU when torch sees one, else the CPU.
    assert torch_metadata["device"].value == ComputeResource(device="auto").torch_device()
    # Logged for good, so the checkpoint is gone.
    assert not any((keel_home.artefacts / "checkpoints" / "torch").iterdir())


def test_training_asset_without_a_training_set_fails_clearly(keel_home):
    from assets.training import lightgbm_model
    from orchestration.resources import ComputeResource, MlflowResource

    resources = {
        "mlflow": MlflowResource(
            tracking_uri=f"sqlite:///{keel_home.mlflow / 'mlflow.db'}",
            registry_uri=f"sqlite:///{keel_home.mlflow / 'mlflow.db'}",
            artifact_location=str(keel_home.mlflow / "artifacts"),
        ),
        "compute": ComputeResource(),
    }
    with pytest.raises(dg.Failure, match="has no materialisation yet"):
        dg.materialize([lightgbm_model], resources=resources)
    with pytest.raises(dg.Failure, match="set both training_set_path and dataset_version"):
        dg.materialize(
            [lightgbm_model],
            resources=resources,
            run_config={"ops": {"lightgbm_model": {"config": {"training_set_path": "x.parquet"}}}},
        )


def test_torch_step_asks_for_a_gpu_and_both_steps_retry():
    from assets.training import lightgbm_model, torch_model

    tags = torch_model.op.tags
    assert tags["gpu"] == "true"
    k8s = json.loads(tags["dagster-k8s/config"])
    assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for asset in (lightgbm_model, torch_model):
        assert asset.op.retry_policy is not None and asset.op.retry_policy.max_retries >= 1
        assert asset.group_names_by_key[asset.key] == "training"
    assert "gpu" not in lightgbm_model.op.tags
    assert torch_model.op.pool == "gpu"


# --------------------------------------------------------------------------- preemption in Dagster

PREEMPTION_EPOCHS = 8


def preemption_job() -> dg.JobDefinition:
    """The torch asset alone, on the multiprocess executor; rebuilt in every step process."""
    from assets.training import torch_model
    from orchestration.resources import ComputeResource

    paths = KeelPaths.current()
    defs = dg.Definitions(
        assets=[torch_model],
        resources={
            "mlflow": local_mlflow(paths),
            "compute": ComputeResource(
                device="cpu",
                checkpoint_dir=str(paths.artefacts / "checkpoints"),
                study_storage=str(paths.optuna),
                num_threads=1,
            ),
        },
        jobs=[dg.define_asset_job("preemption", selection=[torch_model.key])],
    )
    return defs.resolve_job_def("preemption")


@pytest.mark.slow
def test_dagster_retries_a_killed_training_step_which_resumes(keel_home, parquet_training_set):
    import threading

    import psutil
    import torch

    checkpoints = keel_home.artefacts / "checkpoints" / "torch"
    killed: list[int] = []

    def kill_the_step_after_two_epochs() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for path in checkpoints.glob("*/checkpoint.pt") if checkpoints.exists() else []:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if state["epoch"] >= 2:
                    step = next(
                        child
                        for child in psutil.Process().children(recursive=True)
                        if "spawn_main" in " ".join(child.cmdline())
                    )
                    step.send_signal(signal.SIGKILL)
                    killed.append(state["epoch"])
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_the_step_after_two_epochs, daemon=True)
    watcher.start()
    config = {
        "training_set_path": str(parquet_training_set),
        "dataset_version": file_sha256(parquet_training_set),
        "trials": 0,
        "max_epochs": PREEMPTION_EPOCHS,
        "patience": PREEMPTION_EPOCHS,
    }
    instance = dg.DagsterInstance.local_temp(str(keel_home.dagster_home))
    result = dg.execute_job(
        dg.reconstructable(preemption_job),
        instance=instance,
        run_config={"ops": {"torch_model": {"config": config}}},
    )
    watcher.join(timeout=5)

    assert killed, "the step finished before it could be killed"
    assert result.success
    events = [event.event_type_value for event in result.all_events]
    assert "STEP_UP_FOR_RETRY" in events and "STEP_RESTARTED" in events
    metadata = result.asset_materializations_for_node("torch_model")[0].metadata
    assert metadata["resumed_from_epoch"].value == killed[0]
    assert metadata["epochs_run"].value == PREEMPTION_EPOCHS

    # The retried step ends where an uninterrupted fit ends.
    train, validation, _ = time_split(pd.read_parquet(parquet_training_set), 7, 7)
    uninterrupted = train_torch(
        train, validation, seed=7, max_epochs=PREEMPTION_EPOCHS, patience=PREEMPTION_EPOCHS
    )
    local_mlflow(keel_home).configure()
    logged = load_risk_model(metadata["model_uri"].value)
    for name, tensor in uninterrupted.model.state_dict().items():
        assert torch.equal(logged.state_dict()[name], tensor), name


def _trial_states(database: Path) -> list[str]:
    import sqlite3

    if not database.exists():
        return []
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as connection:
            return [state for (state,) in connection.execute("select state from trials")]
    except sqlite3.OperationalError:  # the schema is not written yet, or a writer holds it
        return []


@pytest.mark.slow
def test_a_step_killed_while_tuning_is_retried_and_ends_with_identical_weights(
    keel_home, parquet_training_set
):
    import threading

    import psutil
    import torch

    from keel.tuning import FINISHED_STATES, storage_url

    trials = 3
    database = keel_home.optuna / "torch.db"
    killed: list[list[str]] = []

    def kill_the_step_in_its_second_trial() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            states = _trial_states(database)
            if "RUNNING" in states and sum(s in ("COMPLETE", "PRUNED") for s in states) >= 1:
                step = next(
                    child
                    for child in psutil.Process().children(recursive=True)
                    if "spawn_main" in " ".join(child.cmdline())
                )
                step.send_signal(signal.SIGKILL)
                killed.append(states)
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_the_step_in_its_second_trial, daemon=True)
    watcher.start()
    settings = {"trials": trials, "tuning_epochs": 3, "max_epochs": 4, "patience": 4}
    config = {
        "training_set_path": str(parquet_training_set),
        "dataset_version": file_sha256(parquet_training_set),
        **settings,
    }
    instance = dg.DagsterInstance.local_temp(str(keel_home.dagster_home))
    result = dg.execute_job(
        dg.reconstructable(preemption_job),
        instance=instance,
        run_config={"ops": {"torch_model": {"config": config}}},
    )
    watcher.join(timeout=5)

    assert killed, "tuning finished before the step could be killed"
    assert result.success
    events = [event.event_type_value for event in result.all_events]
    assert "STEP_UP_FOR_RETRY" in events and "STEP_RESTARTED" in events
    metadata = result.asset_materializations_for_node("torch_model")[0].metadata
    assert metadata["finished_trials"].value == trials

    # The same training, never interrupted, in another data folder.
    uninterrupted = train_family(
        "torch",
        pd.read_parquet(parquet_training_set),
        dataset_version=file_sha256(parquet_training_set),
        options=TrainingOptions(seed=7, num_threads=1, **settings),
        study_storage=str(keel_home.home / "uninterrupted-optuna"),
        log=lambda line: None,
    )
    import optuna

    studies = optuna.get_all_study_summaries(storage_url(str(keel_home.optuna), "torch"))
    (study,) = [
        optuna.load_study(
            study_name=s.study_name, storage=storage_url(str(keel_home.optuna), "torch")
        )
        for s in studies
    ]
    states = [trial.state for trial in study.get_trials()]
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the trial the kill interrupted
    resumed_draws = [t.params for t in study.get_trials(states=FINISHED_STATES)]
    assert resumed_draws == [
        t.params
        for t in optuna.load_study(
            study_name=uninterrupted.tuning.study_name, storage=uninterrupted.tuning.storage
        ).get_trials(states=FINISHED_STATES)
    ]
    assert metadata["best_params"].value == json.loads(json.dumps(uninterrupted.best_params))
    local_mlflow(keel_home).configure()
    logged = load_risk_model(metadata["model_uri"].value)
    for name, tensor in uninterrupted.model.state_dict().items():
        assert torch.equal(logged.state_dict()[name], tensor), name
