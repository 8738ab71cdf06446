"""Edge bundle benchmark: native LightGBM and PyTorch models against their ONNX bundles.

Both families are trained on one synthetic training set (the shape the feature store
produces) and bundled as the ``model_bundle`` asset bundles them (INT8 calibrated on the
validation window). On the held-out window, side by side in this one process:

- single-row latency: the native model on a one-row DataFrame (as the evaluation times it)
  against the bundle on one JSON-style row (encoding included on both sides); and the bare
  graphs (network forward against ``session.run`` on already encoded inputs);
- 1,000-row batch latency: DataFrame in, scores out;
- bundle sizes, the INT8 AUC change, and the serverless cold start (import + load + first
  prediction) of a fresh, isolated interpreter.

Torch and onnxruntime each get one thread, so the ratios compare like with like. Exits
non-zero when an FP32 bundle's scores differ from the native model's by more than 1e-5.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

ROWS = 60_000
DAYS = 56
SEED = 0
SINGLE_ROW_CALLS = 500
BATCH_ROWS = 1_000
COLD_STARTS = 3
TORCH_EPOCHS = 4
LIGHTGBM_ROUNDS = 400
FP32_TOLERANCE = 1e-5
GOALS = {"torch_int8_speedup": 2.0, "torch_int8_auc_drop": 0.005, "edge_cold_start_s": 1.0}


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _per_call_ms(function, calls: list, warmup: int = 30) -> float:
    """Median milliseconds of ``function(argument)`` over ``calls``."""
    for argument in calls[:warmup]:
        function(argument)
    timings = []
    for argument in calls:
        started = time.perf_counter()
        function(argument)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1e3


def _graph_only_ms(model, bundle, frame, calls: int) -> dict[str, float]:
    """Network forward against the bundle's session on inputs encoded beforehand."""
    import torch

    encoded = [model.encoder.network_arrays(frame.iloc[[i]]) for i in range(calls)]
    tensors = [tuple(torch.from_numpy(array) for array in arrays) for arrays in encoded]
    feeds = [dict(zip(bundle.contract.graph_inputs, arrays, strict=True)) for arrays in encoded]

    def forward(inputs):
        with torch.inference_mode():
            return model.network(*inputs)

    return {
        "native": _per_call_ms(forward, tensors),
        "bundle": _per_call_ms(lambda feed: bundle.session.run(None, feed), feeds),
    }


def _cold_start(folder: Path, row: dict, variant: str) -> dict[str, float]:
    from keel.edge.isolated import invoke_handler

    runs = []
    for _ in range(COLD_STARTS):
        result = invoke_handler(folder, [row], variant=variant)
        body = json.loads(result["response"]["body"])
        runs.append({**body["cold_start"], "process_wall_s": result["wall_s"]})
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def main() -> None:
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from bench.common import write_result
    from keel.edge.build import build_bundle, bundle_bytes
    from keel.edge.parity import check_parity
    from keel.edge.serving import frame_columns
    from keel.edge.timing import json_rows
    from keel.schema import LABEL
    from keel.training import save_risk_model, time_split, train_lightgbm, train_torch
    from keel_edge import Bundle
    from tests.test_training import synthetic_training_set

    torch.set_num_threads(1)
    windows = time_split(synthetic_training_set(rows=ROWS, seed=SEED, days=DAYS), 7, 7)
    test = windows.test.reset_index(drop=True)
    labels = test[LABEL].to_numpy()
    models = {
        "lightgbm": train_lightgbm(
            windows.train, windows.validation, seed=SEED, max_rounds=LIGHTGBM_ROUNDS, num_threads=1
        ).model,
        "torch": train_torch(
            windows.train, windows.validation, seed=SEED, max_epochs=TORCH_EPOCHS
        ).model,
    }
    rng = np.random.default_rng(SEED)
    picks = rng.integers(0, len(test), SINGLE_ROW_CALLS)
    batch = test.iloc[rng.integers(0, len(test), BATCH_ROWS)].reset_index(drop=True)
    figures: dict = {"families": {}}
    failures = []
    with tempfile.TemporaryDirectory(prefix="keel-bench-bundle-") as scratch:
        for family, model in models.items():
            folder = build_bundle(
                model,
                Path(scratch) / family,
                model_info={"name": "bench", "version": "1"},
                calibration=windows.validation,
            )
            parity = check_parity(folder, model, test, labels)
            fp32_diff = parity["variants"]["fp32"]["max_abs_diff"]
            if not fp32_diff <= FP32_TOLERANCE:
                failures.append(f"{family} FP32 bundle differs by {fp32_diff:.3g}")
            native_rows = [test.iloc[[i]] for i in picks]
            native_auc = float(roc_auc_score(labels, model.predict_proba(test)))
            result = {
                "native": {
                    "single_row_ms": _per_call_ms(model.predict_proba, native_rows),
                    "batch_1000_ms": _per_call_ms(model.predict_proba, [batch] * 20, warmup=3),
                    "bytes": _folder_bytes(save_risk_model(model, Path(scratch) / f"{family}-m")),
                    "auc": native_auc,
                },
                "parity": parity,
            }
            sizes = bundle_bytes(folder)
            for variant in parity["variants"]:
                bundle = Bundle(folder, variant, threads=1)
                rows = json_rows(test, bundle.feature_names)
                numeric = set(bundle.contract.numeric)
                columns = frame_columns(batch, bundle.feature_names, numeric)
                result[variant] = {
                    "single_row_ms": _per_call_ms(bundle.predict, [[rows[i]] for i in picks]),
                    "batch_1000_ms": _per_call_ms(bundle.predict, [columns] * 20, warmup=3),
                    "bytes": sizes[variant],
                    "auc": parity["variants"][variant]["auc"],
                    "auc_change": parity["variants"][variant]["auc_change"],
                    "max_abs_diff": parity["variants"][variant]["max_abs_diff"],
                }
                if family == "torch":
                    result[variant]["graph_only"] = _graph_only_ms(
                        model, bundle, test, SINGLE_ROW_CALLS
                    )
            variant = "int8" if "int8" in parity["variants"] else "fp32"
            result["cold_start"] = _cold_start(
                folder, json_rows(test.head(1), model.feature_names)[0], variant
            )
            figures["families"][family] = result
    torch_result, lightgbm_result = figures["families"]["torch"], figures["families"]["lightgbm"]
    native_ms = torch_result["native"]["single_row_ms"]
    figures.update(
        torch_int8_speedup=native_ms / torch_result["int8"]["single_row_ms"],
        torch_fp32_speedup=native_ms / torch_result["fp32"]["single_row_ms"],
        torch_int8_speedup_graph_only=torch_result["fp32"]["graph_only"]["native"]
        / torch_result["int8"]["graph_only"]["bundle"],
        torch_int8_vs_fp32_bundle=torch_result["fp32"]["single_row_ms"]
        / torch_result["int8"]["single_row_ms"],
        torch_int8_auc_drop=-torch_result["int8"]["auc_change"],
        lightgbm_fp32_speedup=lightgbm_result["native"]["single_row_ms"]
        / lightgbm_result["fp32"]["single_row_ms"],
        edge_cold_start_s=torch_result["cold_start"]["total_s"],
        fp32_max_abs_diff=max(
            family["parity"]["variants"]["fp32"]["max_abs_diff"]
            for family in figures["families"].values()
        ),
    )
    figures["goals_met"] = {
        "torch_int8_speedup": figures["torch_int8_speedup"] >= GOALS["torch_int8_speedup"],
        "torch_int8_auc_drop": figures["torch_int8_auc_drop"] <= GOALS["torch_int8_auc_drop"],
        "edge_cold_start_s": figures["edge_cold_start_s"] < GOALS["edge_cold_start_s"],
    }
    figures["params"] = {
        "rows": ROWS,
        "held_out_rows": len(test),
        "single_row_calls": SINGLE_ROW_CALLS,
        "batch_rows": BATCH_ROWS,
        "torch_epochs": TORCH_EPOCHS,
        "lightgbm_rounds": LIGHTGBM_ROUNDS,
        "threads": 1,
        "cold_starts": COLD_STARTS,
        "fp32_tolerance": FP32_TOLERANCE,
        "goals": GOALS,
    }
    write_result("bundle", figures)
    if failures:
        print("; ".join(failures))
        raise SystemExit(1)
