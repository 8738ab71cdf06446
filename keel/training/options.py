"""Names, default hyperparameters, errors and the options that decide a fit."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from keel import schema

EXPERIMENT_NAME = schema.EXPERIMENT
REGISTERED_MODEL_NAME = schema.REGISTERED_MODEL
FAMILIES = ("lightgbm", "torch")


# Domain knowledge the models must respect, declared by the dataset (features.monotone).
MONOTONE_INCREASING = schema.MONOTONE_INCREASING


DEFAULT_LIGHTGBM_PARAMS: dict[str, Any] = {
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_child_samples": 50,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "max_bin": 255,
}
DEFAULT_TORCH_PARAMS: dict[str, Any] = {
    "hidden_units": 128,
    "layers": 2,
    "dropout": 0.1,
    "embedding_dim": 4,
    "monotone_units": 8,
    "learning_rate": 1e-3,
    "weight_decay": 1e-5,
    "batch_size": 512,
}


class TrainingDataError(ValueError):
    """The training set breaks the column contract or cannot be split."""


class ModelIntegrityError(RuntimeError):
    """A model folder is incomplete, or its weights do not match the recorded sha256."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TrainingOptions:
    """Everything besides data that decides a fit; its hash keys studies and checkpoints."""

    trials: int = 20
    time_budget_s: float = 900.0
    seed: int = 7
    validation_days: int = 7
    test_days: int = 7
    max_rounds: int = 2000
    early_stopping_rounds: int = 50
    max_epochs: int = 30
    patience: int = 5
    tuning_epochs: int = 8
    # LightGBM threads (0: every core) and the network's CPU threads (0: one, see fit_network).
    num_threads: int = 0
    # The trial count alone ends tuning (time_budget_s is ignored), so that a resumed run ends
    # where an uninterrupted one ends; off, the time budget may stop tuning early.
    reproducible: bool = True

    def for_family(self, family: str) -> dict[str, Any]:
        """The settings that apply to ``family`` (the other family's fit limits left out)."""
        other = {
            "lightgbm": ("max_epochs", "patience", "tuning_epochs"),
            "torch": ("max_rounds", "early_stopping_rounds"),
        }[family]
        return {name: value for name, value in asdict(self).items() if name not in other}

    def fingerprint(self, family: str) -> str:
        """Hash of what shapes ``family``'s search and fit (trial count and budget excluded)."""
        chosen = self.for_family(family)
        del chosen["trials"], chosen["time_budget_s"], chosen["reproducible"]
        return _sha256(json.dumps({"family": family, **chosen}, sort_keys=True).encode())[:12]
