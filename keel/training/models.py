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

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from keel.schema import (
    CATEGORICAL_FEATURES,
    CHANNELS,
    ENTITY_KEY,
    EVENT_TIMESTAMP,
    LABEL,
    LABEL_TIMESTAMP,
    MODEL_FEATURES,
    NUMERIC_FEATURES,
    PRODUCTS,
)

if TYPE_CHECKING:
    from keel.tuning import TuningResult

__all__ = [
    "CATEGORY_VOCABULARIES",
    "DEFAULT_LIGHTGBM_PARAMS",
    "DEFAULT_TORCH_PARAMS",
    "EXPERIMENT_NAME",
    "FAMILIES",
    "MONOTONE_INCREASING",
    "REGISTERED_MODEL_NAME",
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

EXPERIMENT_NAME = "keel-default-risk"
REGISTERED_MODEL_NAME = "keel-default-risk"
FAMILIES = ("lightgbm", "torch")

# Domain knowledge the models must respect: more missed payments never lowers the risk.
MONOTONE_INCREASING = ("missed_payments_30d", "missed_payments_90d")
CATEGORY_VOCABULARIES: dict[str, tuple[str, ...]] = {
    "product": PRODUCTS,
    "main_channel_30d": CHANNELS,
}

MODEL_CONFIG_FILE = "model.json"
MODEL_FORMAT = 1
LIGHTGBM_WEIGHTS_FILE = "model.txt"
TORCH_WEIGHTS_FILE = "weights.safetensors"
REQUIRED_COLUMNS = (ENTITY_KEY, EVENT_TIMESTAMP, LABEL_TIMESTAMP, LABEL, *MODEL_FEATURES)
PREDICT_BATCH_ROWS = 65_536
SMALL_BATCH_ROWS = 64

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


# --------------------------------------------------------------------------- training set


def load_training_set(path: str | Path) -> pd.DataFrame:
    """Read the point-in-time training set (Parquet) and check it against the column contract."""
    try:
        frame = pd.read_parquet(path, columns=list(REQUIRED_COLUMNS))
    except FileNotFoundError as error:
        raise TrainingDataError(
            f"training set {path} does not exist; materialise the `training_set` asset first"
        ) from error
    except (KeyError, ValueError) as error:
        # pyarrow names the first missing column; list them all for the reader.
        import pyarrow.parquet as pq

        present = set(pq.read_schema(path).names)
        missing = [name for name in REQUIRED_COLUMNS if name not in present]
        if not missing:
            raise
        raise TrainingDataError(
            f"training set {path} lacks columns {', '.join(missing)}"
        ) from error
    check_training_frame(frame)
    return frame


def check_training_frame(frame: pd.DataFrame) -> None:
    """Raise `TrainingDataError` unless ``frame`` holds labelled, UTC-stamped training rows."""
    missing = [name for name in REQUIRED_COLUMNS if name not in frame.columns]
    if missing:
        raise TrainingDataError(f"training frame lacks columns {', '.join(missing)}")
    if frame.empty:
        raise TrainingDataError("training frame has no rows")
    for column in (EVENT_TIMESTAMP, LABEL_TIMESTAMP):
        dtype = frame[column].dtype
        if not isinstance(dtype, pd.DatetimeTZDtype):
            raise TrainingDataError(
                f"column {column!r} must be a timezone-aware UTC timestamp, got {dtype}"
            )
        if frame[column].isna().any():
            raise TrainingDataError(f"column {column!r} holds {frame[column].isna().sum()} nulls")
    labels = frame[LABEL]
    if labels.isna().any():
        raise TrainingDataError(f"label column {LABEL!r} holds {labels.isna().sum()} nulls")
    unexpected = sorted(set(pd.unique(labels)) - {0, 1})
    if unexpected:
        raise TrainingDataError(f"label column {LABEL!r} must be 0/1, found {unexpected[:5]}")


# --------------------------------------------------------------------------- time split


class SplitCutoffs(NamedTuple):
    """Window boundaries: train < validation_start <= validation < test_start <= test < end."""

    validation_start: pd.Timestamp
    test_start: pd.Timestamp
    end: pd.Timestamp


class TimeSplit(NamedTuple):
    """The three time windows, each sorted by event time."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame


def split_cutoffs(frame: pd.DataFrame, validation_days: int, test_days: int) -> SplitCutoffs:
    """Day-aligned window boundaries, counted back from the day after the latest event."""
    if validation_days < 1 or test_days < 1:
        raise TrainingDataError(
            f"validation_days and test_days must be at least 1, got {validation_days}, {test_days}"
        )
    end = frame[EVENT_TIMESTAMP].max().floor("D") + pd.Timedelta(days=1)
    test_start = end - pd.Timedelta(days=test_days)
    validation_start = test_start - pd.Timedelta(days=validation_days)
    return SplitCutoffs(validation_start, test_start, end)


def time_split(frame: pd.DataFrame, validation_days: int, test_days: int) -> TimeSplit:
    """Split by ``event_timestamp`` into train, validation and test windows, latest last.

    A training row needs its label known at the training cut-off (``label_timestamp <=
    validation_start``): a model fitted at that moment could not have seen later labels.
    Validation and test rows are scored after the fact and are all kept.

    Args:
        frame: The training set (see `check_training_frame`).
        validation_days: Length of the validation window, in days.
        test_days: Length of the test window (the last days of the data), in days.

    Returns:
        The train, validation and test frames, each sorted by event time and account.
    """
    check_training_frame(frame)
    cutoffs = split_cutoffs(frame, validation_days, test_days)
    # One stable sort of the whole frame, then one copy per window: frames can be millions
    # of rows wide enough that every extra copy shows.
    events = frame[EVENT_TIMESTAMP].to_numpy(dtype="datetime64[ns]")  # UTC, naive
    order = np.lexsort((frame[ENTITY_KEY].to_numpy(), events))
    events = events[order]
    labels_known = frame[LABEL_TIMESTAMP].to_numpy(dtype="datetime64[ns]")[order]
    validation_start = cutoffs.validation_start.tz_convert("UTC").tz_localize(None).to_datetime64()
    test_start = cutoffs.test_start.tz_convert("UTC").tz_localize(None).to_datetime64()
    windows = {
        "train": (events < validation_start) & (labels_known <= validation_start),
        "validation": (events >= validation_start) & (events < test_start),
        "test": events >= test_start,
    }
    parts = {}
    for name, mask in windows.items():
        part = frame.take(order[mask])
        part.index = pd.RangeIndex(len(part))
        parts[name] = part
    for name in ("train", "validation"):
        part = parts[name]
        if part.empty or part[LABEL].nunique() < 2:
            raise TrainingDataError(
                f"the {name} window ({_describe_windows(cutoffs)}) has {len(part)} rows with "
                f"labels {sorted(part[LABEL].unique().tolist())}: it needs both classes; use "
                "more days of data or shorter validation/test windows"
            )
    if parts["test"].empty:
        raise TrainingDataError(f"the test window ({_describe_windows(cutoffs)}) has no rows")
    return TimeSplit(parts["train"], parts["validation"], parts["test"])


def _describe_windows(cutoffs: SplitCutoffs) -> str:
    return (
        f"validation from {cutoffs.validation_start:%Y-%m-%d}, "
        f"test from {cutoffs.test_start:%Y-%m-%d} to {cutoffs.end:%Y-%m-%d}"
    )


def positive_weight(labels: Iterable[int]) -> float:
    """Weight of a positive example that balances the classes: negatives / positives."""
    values = np.asarray(labels)
    positives = int((values == 1).sum())
    if positives == 0 or positives == len(values):
        raise TrainingDataError("the training window needs both classes")
    return (len(values) - positives) / positives


# --------------------------------------------------------------------------- features


@dataclass(frozen=True)
class FeatureEncoder:
    """Turns a frame of model features into numeric arrays, the same way at fit and predict time.

    Categories map to ``1..k`` by the schema's vocabulary; an unseen or missing category is
    ``0``. Numeric infinities (ratios over a zero denominator) count as missing. The network
    also needs ``mean``/``std`` (learnt from the training window) to standardise numbers.
    """

    numeric: tuple[str, ...] = NUMERIC_FEATURES
    categories: tuple[tuple[str, tuple[str, ...]], ...] = tuple(
        (name, CATEGORY_VOCABULARIES[name]) for name in CATEGORICAL_FEATURES
    )
    monotone: tuple[str, ...] = MONOTONE_INCREASING
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def feature_names(self) -> tuple[str, ...]:
        return (*self.numeric, *self.categorical)

    @property
    def categorical(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.categories)

    @property
    def cardinalities(self) -> tuple[int, ...]:
        """Embedding table sizes: every known category plus the unknown code 0."""
        return tuple(len(vocabulary) + 1 for _, vocabulary in self.categories)

    def numeric_matrix(self, frame: pd.DataFrame, extra_columns: int = 0) -> np.ndarray:
        """Numeric features as float64 columns, infinities replaced by NaN.

        Args:
            frame: Rows to encode.
            extra_columns: Empty columns left at the right for the caller to fill.
        """
        self._check_columns(frame)
        matrix = np.empty((len(frame), len(self.numeric) + extra_columns), dtype=np.float64)
        for index, name in enumerate(self.numeric):
            try:
                matrix[:, index] = frame[name].to_numpy(dtype=np.float64, na_value=np.nan)
            except (TypeError, ValueError) as error:
                raise TrainingDataError(
                    f"feature {name!r} must be numeric, got dtype {frame[name].dtype}"
                ) from error
        numbers = matrix[:, : len(self.numeric)]
        numbers[np.isinf(numbers)] = np.nan
        return matrix

    def category_codes(self, frame: pd.DataFrame) -> np.ndarray:
        """Categorical features as int64 codes (0 = unseen or missing)."""
        self._check_columns(frame)
        codes = np.empty((len(frame), len(self.categories)), dtype=np.int64)
        for index, (name, vocabulary) in enumerate(self.categories):
            codes[:, index] = pd.Categorical(frame[name], categories=vocabulary).codes + 1
        return codes

    def lightgbm_matrix(self, frame: pd.DataFrame) -> np.ndarray:
        """The LightGBM design matrix: numeric columns, then category codes."""
        matrix = self.numeric_matrix(frame, extra_columns=len(self.categories))
        matrix[:, len(self.numeric) :] = self.category_codes(frame)
        return matrix

    def fitted(self, train: pd.DataFrame) -> FeatureEncoder:
        """A copy that standardises with the training window's mean and standard deviation."""
        numbers = self.numeric_matrix(train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-null columns are fine here
            mean = np.nanmean(numbers, axis=0)
            std = np.nanstd(numbers, axis=0)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
        return FeatureEncoder(
            numeric=self.numeric,
            categories=self.categories,
            monotone=self.monotone,
            mean=tuple(float(value) for value in mean),
            std=tuple(float(value) for value in std),
        )

    def network_arrays(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Network inputs: (free numbers + missing flags, monotone numbers, category codes).

        Monotone features reach the network only through its monotone block, so the score can
        never fall as they rise; their missing flags go with the free numbers.
        """
        if not self.mean:
            raise ValueError("call FeatureEncoder.fitted(train) before network_arrays")
        numbers = self.numeric_matrix(frame)
        missing = np.isnan(numbers)
        scaled = (numbers - np.asarray(self.mean)) / np.asarray(self.std)
        scaled[missing] = 0.0
        monotone_index = [self.numeric.index(name) for name in self.monotone]
        free_index = [i for i in range(len(self.numeric)) if i not in monotone_index]
        free = np.hstack([scaled[:, free_index], missing]).astype(np.float32)
        monotone = scaled[:, monotone_index].astype(np.float32)
        return free, monotone, self.category_codes(frame)

    def to_dict(self) -> dict[str, Any]:
        return {
            "numeric": list(self.numeric),
            # Pairs, not a mapping: the column order must survive sorted JSON keys.
            "categories": [[name, list(vocabulary)] for name, vocabulary in self.categories],
            "monotone": list(self.monotone),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureEncoder:
        return cls(
            numeric=tuple(data["numeric"]),
            categories=tuple((name, tuple(vocab)) for name, vocab in data["categories"]),
            monotone=tuple(data["monotone"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
        )

    def _check_columns(self, frame: pd.DataFrame) -> None:
        missing = [name for name in self.feature_names if name not in frame.columns]
        if missing:
            raise TrainingDataError(f"frame lacks model features {', '.join(missing)}")


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    # tanh form: no overflow for large negative logits.
    return 0.5 * (1.0 + np.tanh(0.5 * logits))


# --------------------------------------------------------------------------- models


class LightGBMRiskModel:
    """A LightGBM booster with its encoder; scores are corrected for the positive weight."""

    family = "lightgbm"

    def __init__(self, booster: Any, encoder: FeatureEncoder, logit_offset: float) -> None:
        self.booster = booster
        self.encoder = encoder
        self.logit_offset = logit_offset

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.encoder.feature_names

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """P(defaulted=1) for every row of ``frame``, shape (n,)."""
        # Waking OpenMP's thread pool costs more than scoring a handful of rows alone.
        threads = 1 if len(frame) <= SMALL_BATCH_ROWS else 0
        raw = self.booster.predict(
            self.encoder.lightgbm_matrix(frame), raw_score=True, num_threads=threads
        )
        return _sigmoid(np.asarray(raw, dtype=np.float64) - self.logit_offset)

    def model_text(self) -> str:
        return self.booster.model_to_string()


class TorchRiskModel:
    """A `keel.tabular_net.TabularNet` with its encoder, scoring on the CPU."""

    family = "torch"

    def __init__(
        self,
        network: Any,
        encoder: FeatureEncoder,
        logit_offset: float,
        architecture: Mapping[str, Any],
        precision: str = "fp32",
    ) -> None:
        self.network = network.eval()
        self.encoder = encoder
        self.logit_offset = logit_offset
        self.architecture = dict(architecture)
        self.precision = precision

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.encoder.feature_names

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """P(defaulted=1) for every row of ``frame``, shape (n,)."""
        import torch

        free, monotone, codes = self.encoder.network_arrays(frame)
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(frame), PREDICT_BATCH_ROWS):
                stop = start + PREDICT_BATCH_ROWS
                logits = self.network(
                    torch.from_numpy(free[start:stop]).to(dtype),
                    torch.from_numpy(monotone[start:stop]).to(dtype),
                    torch.from_numpy(codes[start:stop]),
                )
                outputs.append(logits.float().numpy())
        raw = np.concatenate(outputs) if outputs else np.empty(0, dtype=np.float32)
        return _sigmoid(raw.astype(np.float64) - self.logit_offset)

    def half_precision(self) -> TorchRiskModel:
        """A copy whose weights and arithmetic are FP16."""
        network = copy.deepcopy(self.network).half()
        return TorchRiskModel(network, self.encoder, self.logit_offset, self.architecture, "fp16")

    def dynamic_int8(self) -> TorchRiskModel:
        """A copy whose Linear layers are dynamically quantised to INT8 (weights int8 at rest)."""
        import torch

        with warnings.catch_warnings():
            # torch.ao.quantization is deprecated in favour of torchao, which we do not ship.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            network = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(self.network).float(), {torch.nn.Linear}, dtype=torch.qint8
            )
        return TorchRiskModel(network, self.encoder, self.logit_offset, self.architecture, "int8")

    def state_dict(self) -> dict[str, Any]:
        return {
            name: tensor.detach().cpu().contiguous()
            for name, tensor in self.network.state_dict().items()
        }


RiskModel = LightGBMRiskModel | TorchRiskModel


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_risk_model(model: RiskModel, folder: str | Path) -> Path:
    """Write ``model`` to ``folder`` (weights plus ``model.json`` with their sha256)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "family": model.family,
        "feature_names": list(model.feature_names),
        "encoder": model.encoder.to_dict(),
        "logit_offset": model.logit_offset,
    }
    if isinstance(model, LightGBMRiskModel):
        weights = model.model_text().encode()
        config["weights_file"] = LIGHTGBM_WEIGHTS_FILE
    else:
        if model.precision != "fp32":
            raise ValueError("only the FP32 network is saved; derive variants after loading")
        from safetensors.torch import save

        weights = save(model.state_dict())
        config["weights_file"] = TORCH_WEIGHTS_FILE
        config["architecture"] = model.architecture
    config["weights_sha256"] = _sha256(weights)
    (folder / config["weights_file"]).write_bytes(weights)
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def load_model_folder(folder: str | Path) -> RiskModel:
    """Load a model folder written by `save_risk_model`, refusing weights whose sha256 differs."""
    folder = Path(folder)
    config_path = folder / MODEL_CONFIG_FILE
    if not config_path.is_file():
        raise ModelIntegrityError(f"{folder} holds no {MODEL_CONFIG_FILE}: not a Keel model")
    config = json.loads(config_path.read_text())
    if config.get("format") != MODEL_FORMAT or config.get("family") not in FAMILIES:
        raise ModelIntegrityError(
            f"{config_path}: unsupported model format {config.get('format')!r} "
            f"or family {config.get('family')!r}"
        )
    weights_path = folder / config["weights_file"]
    if not weights_path.is_file():
        raise ModelIntegrityError(f"{weights_path} is missing")
    # Hash and parse the same bytes, so the file cannot change in between.
    weights = weights_path.read_bytes()
    actual = _sha256(weights)
    if actual != config["weights_sha256"]:
        raise ModelIntegrityError(
            f"{weights_path} has sha256 {actual}, but {MODEL_CONFIG_FILE} records "
            f"{config['weights_sha256']}: refusing to load altered weights"
        )
    encoder = FeatureEncoder.from_dict(config["encoder"])
    if config["family"] == "lightgbm":
        import lightgbm

        booster = lightgbm.Booster(model_str=weights.decode())
        return LightGBMRiskModel(booster, encoder, float(config["logit_offset"]))
    from safetensors.torch import load

    from keel.tabular_net import TabularNet

    architecture = config["architecture"]
    network = TabularNet(**architecture)
    network.load_state_dict(load(weights))
    return TorchRiskModel(network, encoder, float(config["logit_offset"]), architecture)


def load_risk_model(model_uri: str) -> RiskModel:
    """Load a model logged by the training stage from an MLflow URI (runs:/..., models:/...)."""
    from keel.tracking import load_logged_model

    return load_logged_model(model_uri)


# --------------------------------------------------------------------------- metrics


def classification_metrics(
    labels: Sequence[int] | np.ndarray, scores: np.ndarray
) -> dict[str, float]:
    """AUC, log loss, average precision, Brier score, and base and mean predicted rates."""
    from sklearn.metrics import (
        average_precision_score,
        brier_score_loss,
        log_loss,
        roc_auc_score,
    )

    labels = np.asarray(labels)
    scores = np.clip(np.asarray(scores, dtype=np.float64), 1e-7, 1 - 1e-7)
    both_classes = len(np.unique(labels)) == 2
    return {
        "auc": float(roc_auc_score(labels, scores)) if both_classes else math.nan,
        "log_loss": float(log_loss(labels, scores, labels=[0, 1])),
        "average_precision": (
            float(average_precision_score(labels, scores)) if both_classes else math.nan
        ),
        "brier": float(brier_score_loss(labels, scores)),
        "positive_rate": float(labels.mean()),
        "mean_score": float(scores.mean()),
    }


def evaluate(model: RiskModel, frame: pd.DataFrame) -> dict[str, float]:
    """`classification_metrics` of ``model`` on a labelled frame."""
    return classification_metrics(frame[LABEL].to_numpy(), model.predict_proba(frame))


# --------------------------------------------------------------------------- LightGBM


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


# --------------------------------------------------------------------------- PyTorch


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
    architecture = {
        "free_inputs": arrays["train"].free.shape[1],
        "monotone_inputs": arrays["train"].monotone.shape[1],
        "cardinalities": list(encoder.cardinalities),
        "embedding_dim": int(full_params["embedding_dim"]),
        "hidden_units": int(full_params["hidden_units"]),
        "layers": int(full_params["layers"]),
        "dropout": float(full_params["dropout"]),
        "monotone_units": int(full_params["monotone_units"]),
    }
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


# --------------------------------------------------------------------------- one family, end to end


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
        del chosen["trials"], chosen["time_budget_s"]
        return _sha256(json.dumps({"family": family, **chosen}, sort_keys=True).encode())[:12]


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
