"""Training benchmark: the LightGBM asset against a bare ``lightgbm.train``, and torch epochs.

Both LightGBM fits see the same one-million-row training set, window split, matrix and
parameters (defaults, no tuning), in this one process and one after the other, so their
ratio is the cost of everything the asset adds: reading Parquet, the time split, encoding,
scoring both windows and the MLflow run with its model. The PyTorch figure is the mean CPU
epoch time of the final fit on the same training window.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

ROWS = 1_000_000
DAYS = 84
SEED = 0
REPEATS = 5
TORCH_EPOCHS = 2
# One LightGBM thread on both sides: on a small machine that other work shares, OpenMP threads
# waiting for each other at every barrier make multi-threaded timings swing several-fold.
LIGHTGBM_THREADS = 1


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resources(home: Path) -> dict:
    from orchestration.resources import ComputeResource, MlflowResource

    store = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    return {
        "mlflow": MlflowResource(
            tracking_uri=store,
            registry_uri=store,
            artifact_location=str(home / "mlflow" / "artifacts"),
            lock_file=str(home / "mlflow" / "registry.lock"),
        ),
        "compute": ComputeResource(
            device="cpu",
            checkpoint_dir=str(home / "checkpoints"),
            study_storage=str(home / "optuna"),
            num_threads=LIGHTGBM_THREADS,
        ),
    }


def _asset_seconds(path: Path, home: Path) -> tuple[float, dict]:
    import dagster as dg

    from assets.training import lightgbm_model

    config = {
        "training_set_path": str(path),
        "dataset_version": _file_sha256(path),
        "trials": 0,
        "trained_by": "bench",
    }
    started = time.perf_counter()
    result = dg.materialize(
        [lightgbm_model],
        resources=_resources(home),
        run_config={"ops": {"lightgbm_model": {"config": config}}},
        instance=dg.DagsterInstance.ephemeral(),
    )
    seconds = time.perf_counter() - started
    metadata = result.asset_materializations_for_node("lightgbm_model")[0].metadata
    return seconds, {key: value.value for key, value in metadata.items()}


def _bare_seconds(path: Path) -> tuple[float, int]:
    import lightgbm
    import pandas as pd

    from keel.schema import LABEL
    from keel.training import (
        DEFAULT_LIGHTGBM_PARAMS,
        FeatureEncoder,
        TrainingOptions,
        lightgbm_dataset,
        lightgbm_params,
        positive_weight,
        time_split,
    )

    options = TrainingOptions(trials=0, num_threads=LIGHTGBM_THREADS)
    train, validation, _ = time_split(
        pd.read_parquet(path), options.validation_days, options.test_days
    )
    encoder = FeatureEncoder()
    train_matrix, train_labels = encoder.lightgbm_matrix(train), train[LABEL].to_numpy()
    valid_matrix, valid_labels = encoder.lightgbm_matrix(validation), validation[LABEL].to_numpy()
    params = lightgbm_params(
        DEFAULT_LIGHTGBM_PARAMS,
        encoder=encoder,
        seed=options.seed,
        pos_weight=positive_weight(train_labels),
        num_threads=options.num_threads,
    )
    started = time.perf_counter()
    train_set = lightgbm_dataset(train_matrix, train_labels, encoder)
    valid_set = lightgbm_dataset(valid_matrix, valid_labels, encoder, reference=train_set)
    booster = lightgbm.train(
        params,
        train_set,
        num_boost_round=options.max_rounds,
        valid_sets=[valid_set],
        callbacks=[lightgbm.early_stopping(options.early_stopping_rounds, verbose=False)],
    )
    return time.perf_counter() - started, booster.best_iteration


def _torch_epoch_seconds(path: Path) -> tuple[float, int]:
    import numpy as np
    import pandas as pd

    from keel.training import DEFAULT_TORCH_PARAMS, TrainingOptions, time_split, train_torch

    options = TrainingOptions()
    train, validation, _ = time_split(
        pd.read_parquet(path), options.validation_days, options.test_days
    )
    fit = train_torch(
        train,
        validation,
        DEFAULT_TORCH_PARAMS,
        seed=options.seed,
        max_epochs=TORCH_EPOCHS,
        patience=TORCH_EPOCHS,
        device="cpu",
    )
    return float(np.mean(fit.epoch_seconds)), len(train)


def main() -> None:
    from bench.common import peak_rss_mb, write_result
    from keel.training import DEFAULT_TORCH_PARAMS
    from tests.test_training import synthetic_training_set

    with tempfile.TemporaryDirectory(prefix="keel-bench-training-") as scratch:
        home = Path(scratch)
        path = home / "training_set.parquet"
        frame = synthetic_training_set(rows=ROWS, seed=SEED, days=DAYS)
        frame.to_parquet(path)
        positive_rate = float(frame["defaulted"].mean())
        del frame

        # Warm-up on a small set: imports, the MLflow schema and the experiment exist after it.
        small = home / "warm_up.parquet"
        synthetic_training_set(rows=20_000, seed=SEED + 1, days=DAYS).to_parquet(small)
        _asset_seconds(small, home)

        asset_runs, bare_runs = [], []
        metadata: dict = {}
        best_iteration = 0
        for _ in range(REPEATS):
            bare, best_iteration = _bare_seconds(path)
            bare_runs.append(bare)
            seconds, metadata = _asset_seconds(path, home)
            asset_runs.append(seconds)
        epoch_seconds, torch_rows = _torch_epoch_seconds(path)

    seconds, bare_seconds = min(asset_runs), min(bare_runs)
    median_ratio = statistics.median(asset_runs) / statistics.median(bare_runs)
    write_result(
        "training",
        {
            "rows": ROWS,
            "seconds": round(seconds, 3),
            "bare_seconds": round(bare_seconds, 3),
            "overhead_ratio": round(seconds / bare_seconds, 4),
            "epoch_seconds": round(epoch_seconds, 3),
            "params": {
                "days": DAYS,
                "positive_rate": round(positive_rate, 4),
                "train_rows": metadata.get("train_rows"),
                "validation_rows": metadata.get("validation_rows"),
                "test_rows": metadata.get("test_rows"),
                "best_iteration_asset": metadata.get("best_iteration"),
                "best_iteration_bare": best_iteration,
                "validation_auc": metadata.get("validation_auc"),
                "repeats": REPEATS,
                "overhead_ratio_of_medians": round(median_ratio, 4),
                "asset_seconds_each": [round(value, 3) for value in asset_runs],
                "bare_seconds_each": [round(value, 3) for value in bare_runs],
                "timing": "minimum over repeats, asset and bare alternating in one process",
                "lightgbm_params": "keel.training.DEFAULT_LIGHTGBM_PARAMS, trials=0",
                "lightgbm_threads": LIGHTGBM_THREADS,
                "torch_device": "cpu",
                "torch_threads": 1,
                "torch_batch_size": DEFAULT_TORCH_PARAMS["batch_size"],
                "torch_train_rows": torch_rows,
                "torch_epochs": TORCH_EPOCHS,
                "gpu": "none on the benchmark machine",
                "cpu_count": os.cpu_count(),
                "peak_rss_mb": round(peak_rss_mb(), 1),
            },
        },
    )


if __name__ == "__main__":
    main()
