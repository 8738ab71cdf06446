"""A dataset's model families: LightGBM and the PyTorch tabular network behind one interface.

Both read the spec's features in its order, with its category vocabularies, and respect its
monotone directions: LightGBM through its monotone constraints, the network through its
monotone block (a feature whose risk must not rise with it enters that block negated). Each
fitted model is a handful of files (``model_files``) that ``model_from_files`` reads back, so
the registered model is scored exactly as it was judged. The champion is the family with the
best held-out ROC AUC among those that passed every gate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keel.datasets.spec import MODEL_FAMILIES, DatasetSpec

LIGHTGBM_PARAMS = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_child_samples": 50,
    "feature_fraction": 0.9,
    "verbosity": -1,
    "seed": 7,
}
MAX_ROUNDS = 400
# Small by default: a folder dataset's network trains in seconds on a CPU.
TORCH_EPOCHS = 40
TORCH_PATIENCE = 5
TORCH_SEED = 7
DESCRIPTION_FILE = "dataset_model.json"
LIGHTGBM_FILE = "model.txt"


@dataclass
class DatasetModel:
    """A fitted model of one family with the spec's feature order and category vocabularies.

    ``estimator`` is a LightGBM booster, or a ``keel.training.models.TorchRiskModel``;
    ``details`` records how the fit went (rounds, epochs, device).
    """

    family: str
    estimator: Any
    features: tuple[str, ...]
    categories: dict[str, tuple[str, ...]]
    details: dict[str, Any] = field(default_factory=dict)

    def frame(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The booster's inputs: numbers as floats, categories coded by the spec's vocabulary."""
        columns = {}
        for name in self.features:
            if name in self.categories:
                columns[name] = pd.Categorical(rows[name], categories=self.categories[name])
            else:
                columns[name] = pd.to_numeric(rows[name], errors="coerce").astype("float64")
        return pd.DataFrame(columns, index=rows.index)

    def network_rows(self, rows: pd.DataFrame) -> pd.DataFrame:
        """``rows`` with every numeric feature as float64 (nullable integers included)."""
        numbers = {
            name: pd.to_numeric(rows[name], errors="coerce").astype("float64")
            for name in self.features
            if name not in self.categories
        }
        return rows.assign(**numbers)

    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        """The probability of the positive label for every row."""
        if self.family == "lightgbm":
            return np.asarray(self.estimator.predict(self.frame(rows)), dtype=np.float64)
        return self.estimator.predict_proba(self.network_rows(rows))


def fit_lightgbm(spec: DatasetSpec, parts: Mapping[str, pd.DataFrame]) -> DatasetModel:
    """LightGBM with the spec's monotone directions, early-stopped on the validation part."""
    import lightgbm as lgb

    model = DatasetModel("lightgbm", None, spec.features, dict(spec.categorical_features))
    label = spec.label.column
    params = {
        **LIGHTGBM_PARAMS,
        "monotone_constraints": [spec.monotone.get(name, 0) for name in spec.features],
    }
    train = lgb.Dataset(model.frame(parts["train"]), parts["train"][label].to_numpy())
    validation = lgb.Dataset(
        model.frame(parts["validation"]), parts["validation"][label].to_numpy(), reference=train
    )
    model.estimator = lgb.train(
        params,
        train,
        num_boost_round=MAX_ROUNDS,
        valid_sets=[validation],
        callbacks=[lgb.early_stopping(30, verbose=False)],
    )
    model.details = {"rounds": int(model.estimator.best_iteration)}
    return model


def _torch_encoder(spec: DatasetSpec, train: pd.DataFrame):
    """The spec's encoder, standardised on ``train``; decreasing features scaled by ``-std``.

    The network's monotone block never lets the score fall as an input rises: a feature whose
    risk must not rise with it enters negated, which a negative scale does in the encoder
    itself, so the saved model carries it and scores the same after loading.
    """
    from keel.training.encoding import FeatureEncoder

    encoder = FeatureEncoder(
        numeric=spec.numeric_features,
        categories=tuple(spec.categorical_features.items()),
        monotone=tuple(name for name in spec.numeric_features if name in spec.monotone),
    ).fitted(train)
    scale = tuple(
        -std if spec.monotone.get(name) == -1 else std
        for name, std in zip(encoder.numeric, encoder.std, strict=True)
    )
    return dataclasses.replace(encoder, std=scale)


def fit_torch(
    spec: DatasetSpec,
    parts: Mapping[str, pd.DataFrame],
    *,
    device: str = "auto",
    max_epochs: int = TORCH_EPOCHS,
    patience: int = TORCH_PATIENCE,
) -> DatasetModel:
    """The tabular network (``keel.tabular_net``) on CUDA when present, else the CPU."""
    from keel.tabular_net import NetArrays, fit_network, select_device
    from keel.training.data import positive_weight
    from keel.training.models import TorchRiskModel
    from keel.training.options import DEFAULT_TORCH_PARAMS
    from keel.training.torch_fit import network_architecture

    label = spec.label.column
    device = select_device(device)
    model = DatasetModel("torch", None, spec.features, dict(spec.categorical_features))
    encoder = _torch_encoder(spec, model.network_rows(parts["train"]))
    arrays = {}
    for name in ("train", "validation"):
        rows = model.network_rows(parts[name])
        arrays[name] = NetArrays(
            *encoder.network_arrays(rows), rows[label].to_numpy(dtype=np.float32)
        )
    weight = positive_weight(parts["train"][label].to_numpy())
    params = DEFAULT_TORCH_PARAMS
    architecture = network_architecture(arrays["train"], encoder.cardinalities, params)
    fit = fit_network(
        arrays["train"],
        arrays["validation"],
        architecture=architecture,
        learning_rate=float(params["learning_rate"]),
        weight_decay=float(params["weight_decay"]),
        batch_size=batch_size(len(parts["train"])),
        pos_weight=weight,
        seed=TORCH_SEED,
        max_epochs=max_epochs,
        patience=patience,
        device=device,
    )
    model.estimator = TorchRiskModel(fit.network, encoder, math.log(weight), architecture)
    model.details = {
        "epochs": fit.epochs_run,
        "best_epoch": fit.best_epoch,
        "device": device,
        "mixed_precision": fit.mixed_precision,
    }
    return model


def batch_size(rows: int) -> int:
    """The default batch, smaller for a small training set: some thirty steps an epoch."""
    from keel.training.options import DEFAULT_TORCH_PARAMS

    return int(min(DEFAULT_TORCH_PARAMS["batch_size"], max(32, rows // 32)))


def fit_family(spec: DatasetSpec, family: str, parts: Mapping[str, pd.DataFrame]) -> DatasetModel:
    """Fit ``family`` (one of ``MODEL_FAMILIES``) on the train part."""
    if family == "lightgbm":
        return fit_lightgbm(spec, parts)
    if family == "torch":
        return fit_torch(spec, parts)
    raise ValueError(f"unknown model family {family!r} (known: {', '.join(MODEL_FAMILIES)})")


def model_files(model: DatasetModel) -> dict[str, bytes]:
    """The model as files by name: its description, and the family's own weights."""
    description = {
        "family": model.family,
        "features": list(model.features),
        "categories": {name: list(values) for name, values in model.categories.items()},
        "details": model.details,
    }
    files = {DESCRIPTION_FILE: (json.dumps(description, indent=2) + "\n").encode()}
    if model.family == "lightgbm":
        files[LIGHTGBM_FILE] = model.estimator.model_to_string().encode()
        return files
    from keel.training.models import save_risk_model

    with tempfile.TemporaryDirectory(prefix="keel-dataset-model-") as scratch:
        folder = save_risk_model(model.estimator, Path(scratch))
        files.update({path.name: path.read_bytes() for path in folder.iterdir()})
    return files


def model_from_files(files: Mapping[str, bytes]) -> DatasetModel:
    """Read back what ``model_files`` wrote (the network's weights checked against their hash)."""
    description = json.loads(files[DESCRIPTION_FILE])
    family = description["family"]
    if family == "lightgbm":
        import lightgbm as lgb

        estimator = lgb.Booster(model_str=files[LIGHTGBM_FILE].decode())
    else:
        from keel.training.models import load_model_folder

        with tempfile.TemporaryDirectory(prefix="keel-dataset-model-") as scratch:
            for name, data in files.items():
                Path(scratch, name).write_bytes(data)
            estimator = load_model_folder(scratch)
    return DatasetModel(
        family,
        estimator,
        tuple(description["features"]),
        {name: tuple(values) for name, values in description["categories"].items()},
        description.get("details", {}),
    )


def champion(results: Mapping[str, Any]) -> str | None:
    """The family with the best ROC AUC among those that passed every gate; None if none did.

    ``results`` maps each family to its ``Judgement`` (or its record: ``passed`` and
    ``metrics``); a tie goes to the family listed first.
    """

    def passed(result: Any) -> bool:
        return result["passed"] if isinstance(result, Mapping) else result.passed

    def auc(result: Any) -> float:
        metrics = result["metrics"] if isinstance(result, Mapping) else result.metrics
        return float(metrics["roc_auc"])

    passing = [family for family, result in results.items() if passed(result)]
    return max(passing, key=lambda family: auc(results[family])) if passing else None
