"""PyTorch: the tabular network's fit with early stopping and checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel.schema import LABEL
from keel.training.data import positive_weight
from keel.training.encoding import FeatureEncoder
from keel.training.models import TorchRiskModel
from keel.training.options import DEFAULT_TORCH_PARAMS


@dataclass
class TorchFit:
    """A fitted network and its training history."""

    model: TorchRiskModel
    params: dict[str, Any]
    best_epoch: int
    epochs_run: int
    resumed_from_epoch: int
    epoch_seconds: list[float]
    validation_auc: float
    device: str
    mixed_precision: str
    history: list[dict[str, float]] = field(default_factory=list)


def network_architecture(
    train: Any, cardinalities: Any, params: Mapping[str, Any]
) -> dict[str, Any]:
    """The tabular net's shape: its input widths from the training arrays, the rest from params.

    Saved beside the weights, so that a model file rebuilds the same network.
    """
    return {
        "free_inputs": train.free.shape[1],
        "monotone_inputs": train.monotone.shape[1],
        "cardinalities": list(cardinalities),
        "embedding_dim": int(params["embedding_dim"]),
        "hidden_units": int(params["hidden_units"]),
        "layers": int(params["layers"]),
        "dropout": float(params["dropout"]),
        "monotone_units": int(params["monotone_units"]),
    }


def train_torch(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    params: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    max_epochs: int = 30,
    patience: int = 5,
    device: str = "cpu",
    checkpoint_dir: str | Path | None = None,
    on_epoch_end: Callable[[int, float], None] | None = None,
    num_threads: int = 1,
) -> TorchFit:
    """Fit the tabular network on ``train``, stopping early on validation AUC.

    Args:
        train: Training window (model features and the label).
        validation: Validation window, for early stopping and the LR schedule.
        params: Hyperparameters overriding `DEFAULT_TORCH_PARAMS` (e.g. Optuna's best).
        seed: Seed for initial weights, batch order and dropout.
        max_epochs: Upper bound on epochs.
        patience: Epochs without validation AUC gain before stopping.
        device: ``cpu`` or ``cuda[:N]`` (see `keel.tabular_net.select_device`).
        checkpoint_dir: Folder for the per-epoch checkpoint; a run started again with the same
            folder resumes from it and ends with the same weights as an uninterrupted run.
        on_epoch_end: Called with (epoch, validation AUC) after each epoch's checkpoint.
        num_threads: Torch threads while training on the CPU (see `fit_network`).
    """
    from keel.tabular_net import NetArrays, fit_network

    unknown = set(params or {}) - set(DEFAULT_TORCH_PARAMS)
    if unknown:
        raise ValueError(f"unknown PyTorch parameters {sorted(unknown)}")
    full_params = {**DEFAULT_TORCH_PARAMS, **(params or {})}
    encoder = FeatureEncoder().fitted(train)
    weight = positive_weight(train[LABEL].to_numpy())
    arrays = {
        name: NetArrays(*encoder.network_arrays(frame), frame[LABEL].to_numpy(np.float32))
        for name, frame in (("train", train), ("validation", validation))
    }
    architecture = network_architecture(arrays["train"], encoder.cardinalities, full_params)
    fit = fit_network(
        arrays["train"],
        arrays["validation"],
        architecture=architecture,
        learning_rate=float(full_params["learning_rate"]),
        weight_decay=float(full_params["weight_decay"]),
        batch_size=int(full_params["batch_size"]),
        pos_weight=weight,
        seed=seed,
        max_epochs=max_epochs,
        patience=patience,
        device=device,
        checkpoint_dir=checkpoint_dir,
        on_epoch_end=on_epoch_end,
        num_threads=num_threads,
    )
    model = TorchRiskModel(fit.network, encoder, math.log(weight), architecture)
    return TorchFit(
        model=model,
        params=full_params,
        best_epoch=fit.best_epoch,
        epochs_run=fit.epochs_run,
        resumed_from_epoch=fit.resumed_from_epoch,
        epoch_seconds=fit.epoch_seconds,
        validation_auc=fit.best_score,
        device=device,
        mixed_precision=fit.mixed_precision,
        history=fit.history,
    )
