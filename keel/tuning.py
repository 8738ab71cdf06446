"""Hyperparameter search with Optuna: one resumable study per model family.

Studies live in SQLite (one file per family under the Optuna folder) or in any database URL
Optuna takes. A study is named by family, dataset version and the settings that shape the
search, so running the same training again, after a crash or a preempted node, loads the
study and only runs the trials still missing. Trials of a killed process stop sending their
heartbeat; Optuna fails them after the grace period and queues their parameters again.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

from keel.training.lightgbm_fit import train_lightgbm
from keel.training.options import (
    DEFAULT_LIGHTGBM_PARAMS,
    DEFAULT_TORCH_PARAMS,
    FAMILIES,
    TrainingOptions,
)
from keel.training.torch_fit import train_torch

# A killed trial is failed and retried once nobody has heard from it for this long.
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
# LightGBM reports to the pruner every this many rounds (each report is a database write).
LIGHTGBM_REPORT_EVERY = 10
FINISHED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
_DATABASE_URL = re.compile(r"^[a-z][a-z0-9+]*://")


@dataclass
class TuningResult:
    """The outcome of a (possibly resumed) study."""

    study_name: str
    storage: str
    best_params: dict[str, Any]
    best_value: float | None
    best_trial: int | None
    finished_trials: int
    pruned_trials: int
    new_trials: int
    trial_values: list[float] = field(default_factory=list)


def storage_url(storage: str, family: str) -> str:
    """An Optuna storage URL: a database URL as given, or ``<folder>/<family>.db`` in SQLite."""
    if _DATABASE_URL.match(storage):
        return storage
    folder = Path(storage).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / f'{family}.db'}"


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna database storage; creating a SQLite schema is serialised across processes.

    Two processes opening a new SQLite study file at once would both create Optuna's schema,
    and one fails; a file lock beside the database makes the second wait for the first.
    """
    from filelock import FileLock

    # SQLite: wait for a concurrent writer instead of failing at once.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    lock = (
        FileLock(url.removeprefix("sqlite:///") + ".lock", timeout=120)
        if url.startswith("sqlite:///")
        else contextlib.nullcontext()
    )
    with lock, warnings.catch_warnings():
        # Heartbeats are marked experimental; they are what detects a killed trial.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=1
            ),
        )


def open_study(family: str, *, storage: str, study_name: str, seed: int) -> optuna.study.Study:
    """Create the study, or load it if an earlier (perhaps killed) run started it."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; use one of {FAMILIES}")
    rdb = open_storage(storage_url(storage, family))
    # Warm-up steps are rounds for LightGBM and epochs for the network.
    warmup = 50 if family == "lightgbm" else 2
    return optuna.create_study(
        storage=rdb,
        study_name=study_name,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=warmup),
        load_if_exists=True,
    )


def suggest_lightgbm(trial: optuna.trial.Trial) -> dict[str, Any]:
    """LightGBM search space (keys of `DEFAULT_LIGHTGBM_PARAMS`)."""
    return {
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.2, log=True),
        "num_leaves": trial.suggest_int("num_leaves", 15, 255, log=True),
        "min_child_samples": trial.suggest_int("min_child_samples", 10, 300, log=True),
        "feature_fraction": trial.suggest_float("feature_fraction", 0.5, 1.0),
        "bagging_fraction": trial.suggest_float("bagging_fraction", 0.5, 1.0),
        "lambda_l2": trial.suggest_float("lambda_l2", 1e-3, 10.0, log=True),
    }


def suggest_torch(trial: optuna.trial.Trial) -> dict[str, Any]:
    """Network search space (keys of `DEFAULT_TORCH_PARAMS`)."""
    return {
        "hidden_units": trial.suggest_categorical("hidden_units", [64, 128, 256]),
        "layers": trial.suggest_int("layers", 1, 3),
        "dropout": trial.suggest_float("dropout", 0.0, 0.3),
        "embedding_dim": trial.suggest_int("embedding_dim", 2, 8),
        "learning_rate": trial.suggest_float("learning_rate", 3e-4, 3e-3, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-3, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [256, 512, 1024]),
    }


def _lightgbm_pruning(trial: optuna.trial.Trial) -> Callable:
    import lightgbm

    def callback(env: lightgbm.callback.CallbackEnv) -> None:
        round_number = env.iteration + 1
        if round_number % LIGHTGBM_REPORT_EVERY:
            return
        auc = next(value for _, metric, value, _ in env.evaluation_result_list if metric == "auc")
        trial.report(auc, round_number)
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation AUC {auc:.4f} at round {round_number}")

    callback.order = 40  # after early stopping (30), which may end the fit first
    return callback


def _objective(
    family: str,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    options: TrainingOptions,
    device: str,
) -> Callable[[optuna.trial.Trial], float]:
    def lightgbm_objective(trial: optuna.trial.Trial) -> float:
        fit = train_lightgbm(
            train,
            validation,
            suggest_lightgbm(trial),
            seed=options.seed,
            max_rounds=options.max_rounds,
            early_stopping_rounds=options.early_stopping_rounds,
            num_threads=options.num_threads,
            callbacks=[_lightgbm_pruning(trial)],
        )
        trial.set_user_attr("best_iteration", fit.best_iteration)
        return fit.validation_auc

    def torch_objective(trial: optuna.trial.Trial) -> float:
        def report(epoch: int, auc: float) -> None:
            trial.report(auc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation AUC {auc:.4f} at epoch {epoch}")

        fit = train_torch(
            train,
            validation,
            suggest_torch(trial),
            seed=options.seed,
            max_epochs=options.tuning_epochs,
            patience=options.patience,
            device=device,
            on_epoch_end=report,
            num_threads=options.num_threads or 1,
        )
        trial.set_user_attr("best_epoch", fit.best_epoch)
        return fit.validation_auc

    return lightgbm_objective if family == "lightgbm" else torch_objective


def tune(
    family: str,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    *,
    storage: str,
    study_name: str,
    options: TrainingOptions,
    device: str = "cpu",
    callbacks: Sequence[Callable[[optuna.study.Study, optuna.trial.FrozenTrial], None]] = (),
) -> TuningResult:
    """Run the trials still missing from ``family``'s study and return its best parameters.

    Trials that finished (complete or pruned) in an earlier run count towards
    ``options.trials``; ``options.time_budget_s`` bounds this call. With ``options.trials``
    at 0 no study is opened and the defaults are returned.

    Args:
        family: ``lightgbm`` or ``torch``.
        train: Training window.
        validation: Validation window; trials maximise its AUC.
        storage: A folder (SQLite file per family) or an Optuna database URL.
        study_name: Name that identifies the study across restarts.
        options: Trial count, time budget, seed and fit limits.
        device: Torch device for network trials.
        callbacks: Extra ``study.optimize`` callbacks.
    """
    defaults = DEFAULT_LIGHTGBM_PARAMS if family == "lightgbm" else DEFAULT_TORCH_PARAMS
    if options.trials < 0 or options.time_budget_s <= 0:
        raise ValueError("trials must be >= 0 and time_budget_s > 0")
    if options.trials == 0:
        return TuningResult(study_name, "", dict(defaults), None, None, 0, 0, 0)

    study = open_study(family, storage=storage, study_name=study_name, seed=options.seed)
    finished_before = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))
    missing = options.trials - finished_before
    if missing > 0:
        study.optimize(
            _objective(family, train, validation, options, device),
            n_trials=missing,
            timeout=options.time_budget_s,
            callbacks=list(callbacks),
            gc_after_trial=family == "torch",
        )
    finished = study.get_trials(deepcopy=False, states=FINISHED_STATES)
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    return TuningResult(
        study_name=study_name,
        storage=storage_url(storage, family),
        # No complete trial within the budget: the defaults are the best we know.
        best_params={**defaults, **best.params} if best else dict(defaults),
        best_value=best.value if best else None,
        best_trial=best.number if best else None,
        finished_trials=len(finished),
        pruned_trials=len(finished) - len(complete),
        new_trials=len(finished) - finished_before,
        trial_values=[t.value for t in complete],
    )
