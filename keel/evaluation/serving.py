"""Serving cost: latency, throughput and size of a model and its precision variants."""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from keel.evaluation.metrics import RiskModel, score
from keel.gates import EvaluationError


@dataclass(frozen=True)
class ServingProbe:
    """How serving cost is measured.

    Attributes:
        single_row_calls: Timed one-row predictions (after ``warmup_calls`` untimed ones).
        warmup_calls: Untimed calls first, so that lazy initialisation is not billed.
        batch_rows: Rows in the throughput batch (drawn from the held-out window).
        batch_repeats: The best of this many batch timings counts.
    """

    single_row_calls: int = 200
    warmup_calls: int = 20
    batch_rows: int = 10_000
    batch_repeats: int = 3


def pickled_size_bytes(model: RiskModel) -> int:
    """Bytes of the model pickled in memory: one yardstick for a model and its variants."""
    return len(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))


def serving_cost(
    model: RiskModel,
    frame: pd.DataFrame,
    probe: ServingProbe,
    seed: int = 0,
    size_bytes: int | None = None,
) -> dict[str, float]:
    """Single-row latency p50/p99, batch throughput and size of one model on held-out rows.

    Args:
        model: The model to time.
        frame: Held-out rows to draw requests from.
        probe: How many calls and rows to time.
        seed: Picks the rows, so that challenger and champion see the same requests.
        size_bytes: The artefact size when known (the MLflow model folder); else the
            pickled size.
    """
    rng = np.random.default_rng(seed)
    features = frame[list(model.feature_names)]
    rows = rng.integers(0, len(features), size=probe.warmup_calls + probe.single_row_calls)
    single_rows = [features.iloc[[i]] for i in rows]
    for one in single_rows[: probe.warmup_calls]:
        model.predict_proba(one)
    latencies_ns = np.empty(probe.single_row_calls, dtype=np.int64)
    for n, one in enumerate(single_rows[probe.warmup_calls :]):
        start = time.perf_counter_ns()
        model.predict_proba(one)
        latencies_ns[n] = time.perf_counter_ns() - start
    batch = features.iloc[rng.integers(0, len(features), size=probe.batch_rows)]
    batch = batch.reset_index(drop=True)
    best = math.inf
    for _ in range(probe.batch_repeats):
        start = time.perf_counter()
        model.predict_proba(batch)
        best = min(best, time.perf_counter() - start)
    latencies_ms = latencies_ns / 1e6
    return {
        "latency_p50_ms": float(np.percentile(latencies_ms, 50)),
        "latency_p99_ms": float(np.percentile(latencies_ms, 99)),
        "throughput_rows_per_s": float(probe.batch_rows / best),
        "size_bytes": int(size_bytes if size_bytes is not None else pickled_size_bytes(model)),
        "single_row_calls": probe.single_row_calls,
        "batch_rows": probe.batch_rows,
    }


def precision_variants(
    model: RiskModel,
    frame: pd.DataFrame,
    labels: np.ndarray,
    probe: ServingProbe,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """FP32 against FP16 and dynamic INT8 variants of a PyTorch model: AUC change and speed-up.

    All three are timed in the same process on the same rows, sizes as pickled bytes, so the
    ratios compare like with like.
    """
    from sklearn.metrics import roc_auc_score

    makers: dict[str, Callable[[], RiskModel]] = {"fp32": lambda: model}
    for name, method in (("fp16", "half_precision"), ("int8_dynamic", "dynamic_int8")):
        if not callable(getattr(model, method, None)):
            raise EvaluationError(f"the {model.family} model has no {method}() variant")
        makers[name] = getattr(model, method)
    results = []
    base: dict[str, Any] = {}
    for name, make in makers.items():
        variant = make()
        auc = float(roc_auc_score(labels, score(variant, frame)))
        cost = serving_cost(variant, frame, probe, seed=seed)
        if name == "fp32":
            base = {"roc_auc": auc, **cost}
        results.append(
            {
                "variant": name,
                "roc_auc": auc,
                "auc_change": auc - base["roc_auc"],
                "latency_p50_ms": cost["latency_p50_ms"],
                "latency_p99_ms": cost["latency_p99_ms"],
                "throughput_rows_per_s": cost["throughput_rows_per_s"],
                "single_row_speedup": base["latency_p50_ms"] / cost["latency_p50_ms"],
                "batch_speedup": cost["throughput_rows_per_s"] / base["throughput_rows_per_s"],
                "size_bytes": cost["size_bytes"],
                "size_ratio": cost["size_bytes"] / base["size_bytes"],
            }
        )
    return results
