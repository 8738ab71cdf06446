"""One model family, end to end: split, tune, fit the final model and score it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from keel.schema import MODEL_FEATURES
from keel.training.data import SplitCutoffs, _describe_windows, split_cutoffs, time_split
from keel.training.lightgbm_fit import LightGBMFit, train_lightgbm
from keel.training.models import RiskModel, evaluate
from keel.training.options import FAMILIES, TrainingOptions, _sha256
from keel.training.torch_fit import TorchFit, train_torch

if TYPE_CHECKING:
    from keel.tuning import TuningResult


@dataclass
class TrainingOutcome:
    """What one family's training produced: the model, its search and its scores."""

    family: str
    model: RiskModel
    params: dict[str, Any]
    best_params: dict[str, Any]
    tuning: TuningResult
    metrics: dict[str, float]
    rows: dict[str, int]
    cutoffs: SplitCutoffs
    details: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    input_example: pd.DataFrame | None = None
    checkpoint_dir: Path | None = None
    seconds: float = 0.0


def train_family(
    family: str,
    frame: pd.DataFrame,
    *,
    dataset_version: str,
    options: TrainingOptions,
    study_storage: str,
    checkpoint_root: str | Path | None = None,
    device: str = "cpu",
    log: Callable[[str], None] = print,
) -> TrainingOutcome:
    """Split, tune with Optuna, fit the final model on the best parameters, and score it.

    Args:
        family: ``lightgbm`` or ``torch``.
        frame: The training set.
        dataset_version: The training set's content hash; keys the study and checkpoints.
        options: Trials, budget, seed, windows and fit limits.
        study_storage: Optuna storage: a folder (one SQLite file per family) or a database URL.
        checkpoint_root: Where the network's checkpoints go (torch only); None disables them.
        device: Torch device for the network.
        log: Where progress lines go.
    """
    from keel.tuning import tune

    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; use one of {FAMILIES}")
    started = time.perf_counter()
    cutoffs = split_cutoffs(frame, options.validation_days, options.test_days)
    train, validation, test = time_split(frame, options.validation_days, options.test_days)
    log(
        f"{family}: {len(train)} train, {len(validation)} validation, {len(test)} test rows "
        f"({_describe_windows(cutoffs)})"
    )
    run_key = f"{dataset_version[:16]}-{options.fingerprint(family)}"
    tuning = tune(
        family,
        train,
        validation,
        storage=study_storage,
        study_name=f"{family}-{run_key}",
        options=options,
        device=device,
    )
    log(
        f"{family}: study {tuning.study_name} has {tuning.finished_trials} finished trials "
        f"({tuning.new_trials} new); best {tuning.best_value}"
    )
    details: dict[str, Any] = {}
    history: list[dict[str, float]] = []
    checkpoint_dir = None
    fit: LightGBMFit | TorchFit
    if family == "lightgbm":
        fit = train_lightgbm(
            train,
            validation,
            tuning.best_params,
            seed=options.seed,
            max_rounds=options.max_rounds,
            early_stopping_rounds=options.early_stopping_rounds,
            num_threads=options.num_threads,
        )
        details["best_iteration"] = fit.best_iteration
    else:
        if checkpoint_root is not None:
            params_key = _sha256(json.dumps(tuning.best_params, sort_keys=True).encode())[:8]
            checkpoint_dir = Path(checkpoint_root) / family / f"{run_key}-{params_key}"
        fit = train_torch(
            train,
            validation,
            tuning.best_params,
            seed=options.seed,
            max_epochs=options.max_epochs,
            patience=options.patience,
            device=device,
            checkpoint_dir=checkpoint_dir,
            num_threads=options.num_threads or 1,
        )
        details.update(
            best_epoch=fit.best_epoch,
            epochs_run=fit.epochs_run,
            resumed_from_epoch=fit.resumed_from_epoch,
            mean_epoch_seconds=float(np.mean(fit.epoch_seconds)) if fit.epoch_seconds else 0.0,
            device=fit.device,
            mixed_precision=fit.mixed_precision,
        )
        history = fit.history
    # Validation AUC as early stopping saw it (scoring that window again would repeat work the
    # fit already did); the full scorecard on the held-out test window.
    metrics = {"validation_auc": fit.validation_auc}
    metrics.update({f"test_{key}": value for key, value in evaluate(fit.model, test).items()})
    return TrainingOutcome(
        family=family,
        model=fit.model,
        params=fit.params,
        best_params=tuning.best_params,
        tuning=tuning,
        metrics=metrics,
        rows={"train": len(train), "validation": len(validation), "test": len(test)},
        cutoffs=cutoffs,
        details=details,
        history=history,
        input_example=validation.loc[:, list(MODEL_FEATURES)].head(5).reset_index(drop=True),
        checkpoint_dir=checkpoint_dir,
        seconds=time.perf_counter() - started,
    )
