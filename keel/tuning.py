"""Hyperparameter search with Optuna: one resumable study per model family.

Studies live in SQLite (one file per family under the Optuna folder) or in any database URL
Optuna takes. A study is named by family, dataset version and the settings that shape the
search, so running the same training again, after a crash or a preempted node, loads the
study and only runs the trials still missing.

Reproducible by default: trial ``k`` (``k`` trials finished before it) samples from a random
stream seeded by the seed and ``k`` alone, so a study resumed in a new process draws what an
uninterrupted one draws; the trial count, not the clock, ends the search; and a SQLite study is
held by one process at a time (a lock the OS releases when its holder dies), so a trial found
running when the lock is taken was left by a killed process and is failed before resuming. On
a database server, trials of a killed process stop sending their heartbeat; Optuna fails them
after the grace period and queues their parameters again.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
# How long a run waits for another process tuning the same SQLite study to finish.
SESSION_WAIT_SECONDS = 6 * 3600
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
    # Trials a killed run left running, failed before this run resumed the study.
    orphaned_trials: list[int] = field(default_factory=list)


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
        sampler=TrialSeededSampler(seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=warmup),
        load_if_exists=True,
    )


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """TPE whose random draws depend only on the seed and how many trials finished before.

    ``TPESampler(seed=...)`` keeps one random stream per process: a study resumed in a new
    process starts that stream again, so its next trial repeats the first trial's draws
    instead of continuing the sequence an uninterrupted run would have drawn.
    """

    def __init__(self, seed: int) -> None:
        self._seed = seed
        self._sampler = self._tpe(0)

    def _tpe(self, finished: int) -> optuna.samplers.TPESampler:
        seed = int(np.random.SeedSequence([self._seed, finished]).generate_state(1)[0])
        return optuna.samplers.TPESampler(seed=seed)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        finished = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))
        self._sampler = self._tpe(finished)
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


@contextlib.contextmanager
def study_session(url: str, study_name: str):
    """Hold a SQLite study for this process; yields whether the hold is exclusive.

    The lock is a file lock the OS drops when its holder dies, so whoever takes it knows that
    a trial still marked running belongs to no live process. Database servers get no lock
    (their trials are failed by the heartbeat).
    """
    if not url.startswith("sqlite:///"):
        yield False
        return
    from filelock import FileLock

    name = hashlib.sha256(study_name.encode()).hexdigest()[:16]
    lock = FileLock(f"{url.removeprefix('sqlite:///')}.{name}.session.lock")
    with lock.acquire(timeout=SESSION_WAIT_SECONDS):
        yield True


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """Fail the trials left running by a killed process; returns their numbers.

    Only safe while holding the study (`study_session`): then no live process runs them.
    """
    orphans = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in orphans:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return [trial.number for trial in orphans]


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
    ``options.trials``. With ``options.reproducible`` (the default) the trial count alone ends
    the search; otherwise ``options.time_budget_s`` also bounds this call. With
    ``options.trials`` at 0 no study is opened and the defaults are returned.

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

    url = storage_url(storage, family)
    with study_session(url, study_name) as exclusive:
        study = open_study(family, storage=storage, study_name=study_name, seed=options.seed)
        orphaned = fail_orphaned_trials(study) if exclusive else []
        finished_before = len(study.get_trials(deepcopy=False, states=FINISHED_STATES))
        missing = options.trials - finished_before
        if missing > 0:
            study.optimize(
                _objective(family, train, validation, options, device),
                n_trials=missing,
                timeout=None if options.reproducible else options.time_budget_s,
                callbacks=list(callbacks),
                gc_after_trial=family == "torch",
            )
        finished = study.get_trials(deepcopy=False, states=FINISHED_STATES)
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    return TuningResult(
        study_name=study_name,
        storage=url,
        # No complete trial within the budget: the defaults are the best we know.
        best_params={**defaults, **best.params} if best else dict(defaults),
        best_value=best.value if best else None,
        best_trial=best.number if best else None,
        finished_trials=len(finished),
        pruned_trials=len(finished) - len(complete),
        new_trials=len(finished) - finished_before,
        trial_values=[t.value for t in complete],
        orphaned_trials=orphaned,
    )
