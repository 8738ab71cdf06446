"""Ingest benchmark: the data layer through Dagster against one hand-written DuckDB SQL script.

Generate, ingest, validate and `dbt build` N events, side by side with the same
transformations as one SQL script over the same files.

Both run in their own process so that each peak memory figure is its own. Scale with
KEEL_BENCH_ACCOUNTS (default 100,000) and KEEL_BENCH_DAYS (default 100): 10 million events.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_result

ACCOUNTS = int(os.environ.get("KEEL_BENCH_ACCOUNTS", "100000"))
DAYS = int(os.environ.get("KEEL_BENCH_DAYS", "100"))
FIRST_DAY = "2026-01-01"


def _peak_rss_mb() -> dict[str, float]:
    """Peak memory of this process and of its largest child (dbt runs as a subprocess)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": max(own, children), "own_mb": own, "largest_child_mb": children}


def run_pipeline(home: Path) -> dict:
    """Generate the files, then run the data layer through Dagster in two runs."""
    from datetime import date, timedelta

    import dagster as dg

    from assets.ingestion import INGESTION_ASSETS, INGESTION_CHECKS
    from assets.transformation import TRANSFORMATION_ASSETS, dbt_models
    from keel.generator import days, generate_account_holders, generate_day
    from orchestration.profiles import resources_for
    from orchestration.resources import SourcesResource

    paths_generated, landing = home / "generated", home / "landing"
    sources = SourcesResource(
        generated_dir=str(paths_generated),
        landing_dir=str(landing),
        taiwan_csv="",
        accounts=ACCOUNTS,
        late_share=0.0,
    )
    start = time.perf_counter()
    config = sources.generator_config()
    generate_account_holders(config, paths_generated)
    first = date.fromisoformat(FIRST_DAY)
    for day in days(first, DAYS):
        generate_day(config, day, paths_generated, landing)
    generated = time.perf_counter() - start

    daily_models = dg.AssetSelection.assets(*TRANSFORMATION_ASSETS) - dg.AssetSelection.assets(
        dbt_models
    )
    defs = dg.Definitions(
        assets=[*INGESTION_ASSETS, *TRANSFORMATION_ASSETS],
        asset_checks=INGESTION_CHECKS,
        jobs=[
            dg.define_asset_job(
                "static", selection=dg.AssetSelection.assets("raw_account_holders", dbt_models)
            ),
            dg.define_asset_job(
                "daily",
                selection=dg.AssetSelection.assets("raw_account_activity", "raw_default_labels")
                | daily_models,
            ),
        ],
        resources={**resources_for("local"), "sources": sources},
    )
    instance = dg.DagsterInstance.ephemeral()
    assert defs.resolve_job_def("static").execute_in_process(instance=instance).success
    last = first + timedelta(days=DAYS - 1)
    daily = defs.resolve_job_def("daily").execute_in_process(
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": first.isoformat(),
            "dagster/asset_partition_range_end": last.isoformat(),
        },
    )
    assert daily.success
    return {"seconds": time.perf_counter() - start, "generate_seconds": generated}


def run_baseline(home: Path, generated: Path) -> dict:
    """The hand-written SQL script over the same generator files."""
    import duckdb

    script = (Path(__file__).with_name("ingest_baseline.sql")).read_text()
    out = home / "baseline-marts"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with duckdb.connect(str(home / "baseline.duckdb")) as connection:
        connection.execute(script.format(folder=generated, out=out))
        rows = connection.execute("select count(*) from features").fetchone()[0]
    return {"baseline_seconds": time.perf_counter() - start, "baseline_feature_rows": rows}


def _child(role: str, home: Path, *extra: Path) -> dict:
    command = [sys.executable, "-m", "bench.ingest", role, str(home), *map(str, extra)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="keel-bench-ingest-") as scratch:
        home = Path(scratch) / "keel-home"
        ours = _child("pipeline", home)
        generated = next((home / "generated").iterdir())
        baseline = _child("baseline", Path(scratch) / "baseline", generated)
    events = ACCOUNTS * DAYS
    write_result(
        "ingest",
        {
            "events": events,
            "seconds": round(ours["seconds"], 2),
            "events_per_s": round(events / ours["seconds"]),
            "peak_rss_mb": round(ours["peak_rss_mb"], 1),
            "baseline_seconds": round(baseline["baseline_seconds"], 2),
            "ratio_vs_duckdb_sql": round(ours["seconds"] / baseline["baseline_seconds"], 2),
            "params": {
                "accounts": ACCOUNTS,
                "days": DAYS,
                "generate_seconds": round(ours["generate_seconds"], 2),
                "baseline_peak_rss_mb": round(baseline["peak_rss_mb"], 1),
                "pipeline_process_peak_rss_mb": round(ours["own_mb"], 1),
                "dbt_process_peak_rss_mb": round(ours["largest_child_mb"], 1),
                "baseline_feature_rows": baseline["baseline_feature_rows"],
                "cpu_count": os.cpu_count(),
            },
        },
    )


if __name__ == "__main__":
    role, home = sys.argv[1], Path(sys.argv[2])
    os.environ["KEEL_HOME"] = str(home)
    os.environ["KEEL_PROFILE"] = "local"
    figures = run_pipeline(home) if role == "pipeline" else run_baseline(home, Path(sys.argv[3]))
    print(json.dumps({**figures, **_peak_rss_mb()}))
