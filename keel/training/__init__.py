"""Training: the time-based split, LightGBM and PyTorch default-risk models, and their files.

Everything here is plain Python (no Dagster); ``assets/training.py`` wraps it. Heavy libraries
(lightgbm, torch, sklearn, mlflow, optuna) are imported inside the functions that need them.

A fitted model is an object with ``family``, ``feature_names`` and ``predict_proba(frame)``
returning P(defaulted=1). Both families weight the positive class by ``n_negative /
n_positive`` while they learn (class imbalance), then subtract ``log(weight)`` from the logit
when they score: weighting positives by ``w`` multiplies the learnt odds by ``w``, so the
correction gives back calibrated probabilities.

On disk a model is a folder with ``model.json`` (family, features, category vocabularies,
normalisation, the sha256 of the weights file) and the weights: LightGBM model text or
PyTorch safetensors. The hash is checked before any weights are parsed.
"""

from keel.training.data import (
    REQUIRED_COLUMNS,
    SplitCutoffs,
    TimeSplit,
    check_training_frame,
    load_training_set,
    positive_weight,
    split_cutoffs,
    time_split,
)
from keel.training.encoding import CATEGORY_VOCABULARIES, FeatureEncoder
from keel.training.lightgbm_fit import (
    LightGBMFit,
    lightgbm_dataset,
    lightgbm_params,
    train_lightgbm,
)
from keel.training.logged import load_risk_model
from keel.training.models import (
    LIGHTGBM_WEIGHTS_FILE,
    MODEL_CONFIG_FILE,
    MODEL_FORMAT,
    PREDICT_BATCH_ROWS,
    SMALL_BATCH_ROWS,
    TORCH_WEIGHTS_FILE,
    LightGBMRiskModel,
    RiskModel,
    TorchRiskModel,
    classification_metrics,
    evaluate,
    load_model_folder,
    save_risk_model,
)
from keel.training.options import (
    DEFAULT_LIGHTGBM_PARAMS,
    DEFAULT_TORCH_PARAMS,
    EXPERIMENT_NAME,
    FAMILIES,
    MONOTONE_INCREASING,
    REGISTERED_MODEL_NAME,
    ModelIntegrityError,
    TrainingDataError,
    TrainingOptions,
)
from keel.training.run import TrainingOutcome, train_family
from keel.training.torch_fit import TorchFit, train_torch

__all__ = [
    "CATEGORY_VOCABULARIES",
    "DEFAULT_LIGHTGBM_PARAMS",
    "DEFAULT_TORCH_PARAMS",
    "EXPERIMENT_NAME",
    "FAMILIES",
    "LIGHTGBM_WEIGHTS_FILE",
    "MODEL_CONFIG_FILE",
    "MODEL_FORMAT",
    "MONOTONE_INCREASING",
    "PREDICT_BATCH_ROWS",
    "REGISTERED_MODEL_NAME",
    "REQUIRED_COLUMNS",
    "SMALL_BATCH_ROWS",
    "TORCH_WEIGHTS_FILE",
    "FeatureEncoder",
    "LightGBMFit",
    "LightGBMRiskModel",
    "ModelIntegrityError",
    "RiskModel",
    "SplitCutoffs",
    "TimeSplit",
    "TorchFit",
    "TorchRiskModel",
    "TrainingDataError",
    "TrainingOptions",
    "TrainingOutcome",
    "check_training_frame",
    "classification_metrics",
    "evaluate",
    "lightgbm_dataset",
    "lightgbm_params",
    "load_model_folder",
    "load_risk_model",
    "load_training_set",
    "positive_weight",
    "save_risk_model",
    "split_cutoffs",
    "time_split",
    "train_family",
    "train_lightgbm",
    "train_torch",
]
