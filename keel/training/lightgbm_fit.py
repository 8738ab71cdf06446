"""LightGBM: parameters, datasets and the fit with early stopping."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from keel.schema import LABEL
from keel.training.data import positive_weight
from keel.training.encoding import FeatureEncoder
from keel.training.models import LightGBMRiskModel
from keel.training.options import DEFAULT_LIGHTGBM_PARAMS


@dataclass
class LightGBMFit:
    """A fitted LightGBM model and how it was fitted."""

    model: LightGBMRiskModel
    params: dict[str, Any]
    best_iteration: int
    validation_auc: float


def lightgbm_params(
    overrides: Mapping[str, Any] | None,
    *,
    encoder: FeatureEncoder,
    seed: int,
    pos_weight: float,
    num_threads: int = 0,
) -> dict[str, Any]:
    """The full, deterministic LightGBM parameter set for one fit."""
    unknown = set(overrides or {}) - set(DEFAULT_LIGHTGBM_PARAMS)
    if unknown:
        raise ValueError(f"unknown LightGBM parameters {sorted(unknown)}")
    constraints = [1 if name in encoder.monotone else 0 for name in encoder.feature_names]
    return {
        **DEFAULT_LIGHTGBM_PARAMS,
        **(overrides or {}),
        "objective": "binary",
        "metric": "auc",
        "scale_pos_weight": pos_weight,
        # With positives weighted by negatives/positives the weighted base rate is 1/2, so the
        # best constant start is logit 0; LightGBM's average ignores the weight and would start
        # at the raw base rate, leaving early-stopped models miscalibrated.
        "boost_from_average": False,
        "monotone_constraints": constraints,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": num_threads,
        "verbosity": -1,
    }


def lightgbm_dataset(matrix: np.ndarray, labels: np.ndarray, encoder: FeatureEncoder, **kwargs):
    """A `lightgbm.Dataset` over ``matrix`` with the categorical columns declared."""
    import lightgbm

    return lightgbm.Dataset(
        matrix,
        label=labels,
        feature_name=list(encoder.feature_names),
        categorical_feature=list(encoder.categorical),
        params={"feature_pre_filter": False, "max_bin": DEFAULT_LIGHTGBM_PARAMS["max_bin"]},
        free_raw_data=True,
        **kwargs,
    )


def train_lightgbm(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    params: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    max_rounds: int = 2000,
    early_stopping_rounds: int = 50,
    num_threads: int = 0,
    callbacks: Sequence[Callable] = (),
) -> LightGBMFit:
    """Fit LightGBM on ``train``, stopping early on validation AUC.

    Args:
        train: Training window (model features and the label).
        validation: Validation window, for early stopping.
        params: Hyperparameters overriding `DEFAULT_LIGHTGBM_PARAMS` (e.g. Optuna's best).
        seed: Seed for bagging and feature sampling.
        max_rounds: Upper bound on boosting rounds.
        early_stopping_rounds: Rounds without validation AUC gain before stopping.
        num_threads: LightGBM threads; 0 uses OpenMP's default. Fix it for bit-identical runs
            across machines.
        callbacks: Extra LightGBM callbacks (Optuna's pruning).
    """
    import lightgbm

    encoder = FeatureEncoder()
    train_labels = train[LABEL].to_numpy()
    weight = positive_weight(train_labels)
    full_params = lightgbm_params(
        params, encoder=encoder, seed=seed, pos_weight=weight, num_threads=num_threads
    )
    train_set = lightgbm_dataset(encoder.lightgbm_matrix(train), train_labels, encoder)
    valid_set = lightgbm_dataset(
        encoder.lightgbm_matrix(validation),
        validation[LABEL].to_numpy(),
        encoder,
        reference=train_set,
    )
    booster = lightgbm.train(
        full_params,
        train_set,
        num_boost_round=max_rounds,
        valid_sets=[valid_set],
        valid_names=["validation"],
        callbacks=[lightgbm.early_stopping(early_stopping_rounds, verbose=False), *callbacks],
    )
    best_iteration = booster.best_iteration or booster.current_iteration()
    validation_auc = float(booster.best_score["validation"]["auc"])
    # Keep only the trees up to the best round, so saved text and predictions agree.
    booster = lightgbm.Booster(model_str=booster.model_to_string(num_iteration=best_iteration))
    model = LightGBMRiskModel(booster, encoder, math.log(weight))
    return LightGBMFit(model, full_params, best_iteration, validation_auc)
