"""The fitted models, their files on disk (weights hash checked first) and their scores."""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel.schema import LABEL
from keel.training.encoding import FeatureEncoder, _sigmoid
from keel.training.options import FAMILIES, ModelIntegrityError, _sha256

MODEL_CONFIG_FILE = "model.json"
MODEL_FORMAT = 1
LIGHTGBM_WEIGHTS_FILE = "model.txt"
TORCH_WEIGHTS_FILE = "weights.safetensors"


PREDICT_BATCH_ROWS = 65_536
SMALL_BATCH_ROWS = 64


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
