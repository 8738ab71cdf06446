"""What a bundle costs to run: single-row and batch latency per variant, and cold start."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

BATCH_ROWS = 1_000


def json_rows(frame: pd.DataFrame, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows as a client sends them in JSON: missing values as null."""
    part = frame.loc[:, list(names)].astype(object)
    return part.where(part.notna(), None).to_dict(orient="records")


def single_row_latency_ms(predict, rows: list[Any], warmup: int = 20) -> dict[str, float]:
    """p50 and p99 of ``predict`` over one row at a time, in milliseconds."""
    for row in rows[:warmup]:
        predict(row)
    timings = np.empty(len(rows))
    for index, row in enumerate(rows):
        started = time.perf_counter()
        predict(row)
        timings[index] = time.perf_counter() - started
    return {
        "p50_ms": float(np.percentile(timings, 50) * 1e3),
        "p99_ms": float(np.percentile(timings, 99) * 1e3),
    }


def batch_ms(predict, batch: Any, repeats: int = 5) -> float:
    """Best of ``repeats`` runs of ``predict`` over one batch, in milliseconds."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        predict(batch)
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def bundle_timings(folder: str | Path, frame: pd.DataFrame, timed_rows: int = 200) -> dict:
    """Latency per variant and the serverless cold start, on rows of ``frame``.

    Per variant: single-row p50/p99 and one 1,000-row batch (rows drawn with replacement);
    then the cold start of the default variant's handler in a fresh, isolated interpreter.
    """
    from keel.edge.isolated import invoke_handler
    from keel_edge import Bundle, read_manifest

    manifest = read_manifest(folder)
    figures: dict[str, float] = {}
    drawn = np.random.default_rng(0).integers(0, len(frame), max(timed_rows, BATCH_ROWS))
    sample = frame.iloc[drawn]
    for variant in manifest["variants"]:
        bundle = Bundle(folder, variant, threads=1)
        rows = json_rows(sample, bundle.feature_names)
        picked = [[row] for row in rows[:timed_rows]]
        latency = single_row_latency_ms(bundle.predict, picked)
        batch = rows[:BATCH_ROWS]
        figures[f"{variant}_single_row_p50_ms"] = latency["p50_ms"]
        figures[f"{variant}_single_row_p99_ms"] = latency["p99_ms"]
        figures[f"{variant}_batch_{BATCH_ROWS}_ms"] = batch_ms(bundle.predict, batch)
    cold = invoke_handler(folder, [picked[0][0]])
    if cold["response"]["statusCode"] != 200:
        raise RuntimeError(f"the serverless handler answered {cold['response']}")
    figures["edge_cold_start_s"] = cold_start_seconds(cold)
    return figures


def cold_start_seconds(invocation: dict[str, Any]) -> float:
    """Import + load + first prediction, as the handler's first response reports it."""
    import json

    return float(json.loads(invocation["response"]["body"])["cold_start"]["total_s"])
