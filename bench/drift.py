"""One daily drift report on 1 million rows x 20 features: the fast path against Evidently.

Each measured side runs in its own process, so its peak memory is its own:

- ``profile``: builds the champion's reference profile (``profile_build_seconds``); a champion
  needs it once, but Evidently does the equivalent work in every report, so
  ``total_seconds`` (profile build + daily report) is the like-for-like figure;
- ``fast``: the daily report: load the profile, test every feature (``seconds``,
  ``peak_rss_mb``);
- ``evidently``: Evidently's default use, a fresh ``Report([DataDriftPreset()])`` over the full
  reference and current frames (``evidently_default_seconds``); its verdicts are read from the
  report itself: each column's ``ValueDrift`` test and the ``DriftedColumnsCount`` test that is
  Evidently's dataset-level verdict;
- ``artefacts``: the HTML report on samples, the PNG plot and the data quality figures that a
  daily asset adds (reported under ``params``).

Both sides see the same seeded frames: 18 numeric features (continuous, counts with many
ties, one with few distinct values, some nulls) and 2 categorical ones, with a covariate
shift on 6 of them in the current day. Imports are done before the clocks start. The run
exits non-zero when the two sides disagree on any verdict. ``KEEL_BENCH_DRIFT_ROWS`` scales
both frames (default 1 million rows each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import peak_rss_mb, require_same_answers, write_result
from keel import schema

ROWS = int(os.environ.get("KEEL_BENCH_DRIFT_ROWS", "1000000"))
REFERENCE_ROWS = ROWS
SEED = 7
NUMERIC = list(schema.NUMERIC_FEATURES[:18])
CATEGORICAL = list(schema.CATEGORICAL_FEATURES)
SHIFTED = (
    "spend_30d",
    "transactions_7d",
    "utilisation",
    "missed_payments_30d",
    "balance",
    "product",
)
REPO_ROOT = Path(__file__).resolve().parent.parent


def make_frame(rows: int, seed: int, shifted: bool) -> pd.DataFrame:
    """Seeded account features; ``shifted`` moves the ``SHIFTED`` features."""
    rng = np.random.default_rng(seed)

    def shift(name: str, normal: float, moved: float) -> float:
        return moved if shifted and name in SHIFTED else normal

    columns: dict[str, np.ndarray] = {
        "spend_7d": rng.lognormal(3.0, 1.0, rows),
        "spend_30d": rng.lognormal(shift("spend_30d", 4.3, 4.55), 1.0, rows),
        "spend_90d": rng.lognormal(5.4, 0.9, rows),
        "payments_7d": rng.lognormal(2.5, 1.1, rows),
        "payments_30d": rng.lognormal(3.9, 1.0, rows),
        "payments_90d": rng.lognormal(5.0, 0.9, rows),
        "transactions_7d": rng.poisson(shift("transactions_7d", 6.0, 7.5), rows),
        "transactions_30d": rng.poisson(25.0, rows),
        "active_days_30d": rng.binomial(30, 0.4, rows),
        "balance": rng.gamma(2.0, shift("balance", 900.0, 1050.0), rows),
        "utilisation": rng.beta(shift("utilisation", 2.0, 2.6), 5.0, rows),
        "avg_utilisation_30d": rng.beta(2.0, 5.0, rows),
        "max_utilisation_90d": rng.beta(3.0, 4.0, rows),
        # Few distinct values: Evidently tests this one with Jensen-Shannon on value counts.
        "missed_payments_30d": np.minimum(
            rng.poisson(shift("missed_payments_30d", 0.3, 0.6), rows), 3
        ),
        "missed_payments_90d": rng.poisson(0.8, rows),
        "credit_limit": rng.choice([1000.0, 2500, 5000, 7500, 10000, 15000, 20000, 30000], rows),
        "tenure_days": rng.integers(30, 3650, rows),
        "payment_to_spend_30d": rng.gamma(1.5, 0.6, rows),
    }
    frame = pd.DataFrame({name: columns[name].astype(np.float64) for name in NUMERIC})
    del columns
    for name in ("spend_7d", "balance", "utilisation"):
        frame.loc[rng.random(rows) < 0.02, name] = np.nan
    products = np.array(schema.PRODUCTS, dtype=object)
    product_shares = [0.45, 0.35, 0.2] if shifted else [0.6, 0.3, 0.1]
    # Indexing an object array shares the category strings, as Parquet readers do.
    frame["product"] = products[rng.choice(len(products), rows, p=product_shares)]
    channels = np.array(schema.CHANNELS, dtype=object)
    frame["main_channel_30d"] = channels[rng.choice(len(channels), rows, p=[0.5, 0.3, 0.15, 0.05])]
    return frame


def reference_frame() -> pd.DataFrame:
    return make_frame(REFERENCE_ROWS, SEED, shifted=False)


def current_frame() -> pd.DataFrame:
    return make_frame(ROWS, SEED + 1, shifted=True)


def stage_profile(workdir: Path) -> dict:
    from keel import monitoring

    reference = reference_frame()
    start = time.perf_counter()
    profile = monitoring.build_reference_profile(
        reference, NUMERIC, CATEGORICAL, champion_version="bench", training_set_hash="bench"
    )
    profile.save(workdir / "profile")
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in (workdir / "profile").iterdir())
    return {"seconds": seconds, "file_mb": size / 2**20}


def stage_fast(workdir: Path) -> dict:
    import scipy.spatial.distance
    import scipy.stats  # noqa: F401  (imported before the clock, as Evidently's is)

    from keel import monitoring

    current = current_frame()
    start = time.perf_counter()
    profile = monitoring.ReferenceProfile.load(workdir / "profile")
    result = monitoring.data_drift(profile, current)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "result": result.to_dict()}


def evidently_verdicts(snapshot) -> dict:
    """Evidently's own verdicts from a ``DataDriftPreset`` snapshot run with its tests."""
    report = snapshot.dict()
    status = {test["metric_config"]["metric_id"]: test["status"] for test in report["tests"]}
    features, dataset = [], None
    for metric in report["metrics"]:
        config = metric["config"]
        if config["type"].endswith(":ValueDrift"):
            features.append(
                {
                    "column": config["column"],
                    "method": config["method"],
                    "score": float(metric["value"]),
                    "drifted": status[metric["id"]] == "FAIL",
                }
            )
        elif config["type"].endswith(":DriftedColumnsCount"):
            # Its default test fails when the share of drifted columns reaches drift_share.
            dataset = {
                "number_of_drifted_features": int(metric["value"]["count"]),
                "share_of_drifted_features": float(metric["value"]["share"]),
                "dataset_drift": status[metric["id"]] == "FAIL",
            }
    if dataset is None:
        raise ValueError("the snapshot has no DriftedColumnsCount metric")
    return {"features": features, **dataset}


def stage_evidently(workdir: Path) -> dict:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    reference, current = reference_frame(), current_frame()
    definition = DataDefinition(numerical_columns=NUMERIC, categorical_columns=CATEGORICAL)
    start = time.perf_counter()
    snapshot = Report([DataDriftPreset()], include_tests=True).run(
        Dataset.from_pandas(current, data_definition=definition),
        Dataset.from_pandas(reference, data_definition=definition),
    )
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "result": evidently_verdicts(snapshot),
    }


def stage_artefacts(workdir: Path) -> dict:
    import evidently.presets  # noqa: F401

    from keel import monitoring

    current = current_frame()
    start = time.perf_counter()
    profile = monitoring.ReferenceProfile.load(workdir / "profile")
    result = monitoring.data_drift(profile, current)
    quality = monitoring.data_quality(current, profile)
    monitoring.write_drift_report(workdir / "drift.html", profile, current, result, quality=quality)
    monitoring.plot_drift(workdir / "drift.png", profile, current, result)
    result.to_markdown()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}


STAGES = {
    "profile": stage_profile,
    "fast": stage_fast,
    "evidently": stage_evidently,
    "artefacts": stage_artefacts,
}


def run_stage(name: str, workdir: Path) -> dict:
    """Run one stage in a fresh Python process and read back what it measured."""
    subprocess.run(
        [sys.executable, "-m", "bench.drift", name, str(workdir)], cwd=REPO_ROOT, check=True
    )
    return json.loads((workdir / f"{name}.json").read_text())


def main() -> None:
    from keel import monitoring

    with tempfile.TemporaryDirectory(prefix="keel-bench-drift-") as folder:
        workdir = Path(folder)
        profile = run_stage("profile", workdir)
        fast = run_stage("fast", workdir)
        evidently = run_stage("evidently", workdir)
        artefacts = run_stage("artefacts", workdir)
    ours = {f["column"]: f for f in fast["result"]["features"]}
    theirs = {f["column"]: f for f in evidently["result"]["features"]}
    display_names = {name: test.display_name for name, test in monitoring.STATTESTS.items()}
    both = ours.keys() & theirs.keys()
    checks = {
        "same_columns": ours.keys() == theirs.keys(),
        "same_tests": all(display_names[ours[c]["stattest"]] == theirs[c]["method"] for c in both),
        "same_column_verdicts": all(ours[c]["drifted"] == theirs[c]["drifted"] for c in both),
        "same_dataset_verdict": fast["result"]["dataset_drift"]
        == evidently["result"]["dataset_drift"],
        "same_drifted_count": sum(f["drifted"] for f in ours.values())
        == evidently["result"]["number_of_drifted_features"],
    }
    same_verdicts = all(checks.values())
    max_relative_difference = max(
        abs(ours[c]["score"] - theirs[c]["score"]) / max(abs(theirs[c]["score"]), 1e-300)
        for c in both
    )
    total = profile["seconds"] + fast["seconds"]
    write_result(
        "drift",
        {
            "seconds": round(fast["seconds"], 3),
            "profile_build_seconds": round(profile["seconds"], 3),
            "total_seconds": round(total, 3),
            "peak_rss_mb": round(fast["peak_rss_mb"], 1),
            "evidently_default_seconds": round(evidently["seconds"], 3),
            "speedup_vs_evidently_default": round(evidently["seconds"] / fast["seconds"], 1),
            "speedup_total_vs_evidently_default": round(evidently["seconds"] / total, 1),
            "same_verdicts": same_verdicts,
            "params": {
                "rows": ROWS,
                "reference_rows": REFERENCE_ROWS,
                "numeric_features": len(NUMERIC),
                "categorical_features": len(CATEGORICAL),
                "shifted_features": list(SHIFTED),
                "seed": SEED,
                "drifted_features": sorted(c for c in ours if ours[c]["drifted"]),
                "tests": {c: ours[c]["stattest"] for c in ours},
                "dataset_drift": fast["result"]["dataset_drift"],
                "max_relative_score_difference": max_relative_difference,
                "evidently_peak_rss_mb": round(evidently["peak_rss_mb"], 1),
                "checks": checks,
                "evidently_dataset_drift": evidently["result"]["dataset_drift"],
                "profile_file_mb": round(profile["file_mb"], 1),
                "artefacts_seconds": round(artefacts["seconds"], 3),
                "artefacts_peak_rss_mb": round(artefacts["peak_rss_mb"], 1),
                "artefacts_note": "drift + quality + Evidently HTML on a 5000-row sample + PNG",
                "timed": (
                    "seconds: profile load + all tests; total_seconds: profile build + seconds; "
                    "evidently: Report.run on full frames"
                ),
            },
        },
    )
    require_same_answers("drift", checks)


if __name__ == "__main__":
    stage, workdir = sys.argv[1], Path(sys.argv[2])
    figures = STAGES[stage](workdir)
    (workdir / f"{stage}.json").write_text(json.dumps(figures))
