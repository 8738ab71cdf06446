"""Daily monitoring results made by keel.monitoring, reported as the monitoring assets do."""

from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd

from keel import schema
from keel.monitoring import build_reference_profile, data_drift, performance

DAYS = [f"2026-03-0{n}" for n in range(1, 5)]


def _frame(rng: np.random.Generator, rows: int, shift: float = 0.0) -> pd.DataFrame:
    data = {name: rng.normal(10 + shift * 10, 2, rows) for name in schema.NUMERIC_FEATURES}
    data["product"] = rng.choice(list(schema.PRODUCTS), rows)
    data["main_channel_30d"] = rng.choice(list(schema.CHANNELS), rows)
    return pd.DataFrame(data)


def daily_results(days=DAYS, seed: int = 7):
    """Real drift and performance results of days that drift more, and separate less, each day."""
    rng = np.random.default_rng(seed)
    profile = build_reference_profile(
        _frame(rng, 2_000), champion_version="1", training_set_hash="abc"
    )
    drift, perf = {}, {}
    for n, day in enumerate(days):
        drift[day] = data_drift(profile, _frame(rng, 1_000 + 100 * n, shift=0.4 * n))
        labels = rng.integers(0, 2, 500)
        scores = np.clip(labels * (0.4 - 0.1 * n) + rng.uniform(0, 0.6, 500), 0, 1)
        perf[day] = performance(scores, labels)
    return drift, perf


def report_drift(instance, key, day, result, issues=()) -> None:
    """A drift_report materialisation with the metadata entries the asset records."""
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=key,
            partition=day,
            metadata={
                "drift": dg.MetadataValue.json(result.to_dict()),
                "prediction_drift": dg.MetadataValue.bool(False),
                "quality_issues": dg.MetadataValue.json(list(issues)),
            },
        )
    )


def report_performance(instance, key, day, result) -> None:
    """A performance_report materialisation with the metadata entry the asset records."""
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            asset_key=key,
            partition=day,
            metadata={"performance": dg.MetadataValue.json(result.to_dict())},
        )
    )
