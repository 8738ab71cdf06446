"""Ingest benchmark: the data layer through Dagster against one hand-written DuckDB SQL script.

The generator writes N events first, untimed and outside both sides (``generate_seconds`` in
``params``). Then, each in its own process so that each peak memory figure is its own:

- ``seconds``: ingest, validate and `dbt build` those files through Dagster, marts exported as
  Parquet;
- ``baseline_seconds``: the same transformations as one SQL script over the same files.

Both sides' marts (daily features and labels) must hold the same rows and values: the run
exits non-zero when they differ. Scale with KEEL_BENCH_ACCOUNTS (default 100,000) and
KEEL_BENCH_DAYS (default 100): 10 million events.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import require_same_answers, write_result

ACCOUNTS = int(os.environ.get("KEEL_BENCH_ACCOUNTS", "100000"))
DAYS = int(os.environ.get("KEEL_BENCH_DAYS", "100"))
FIRST_DAY = "2026-01-01"
# Window sums may add the same values in another order on the two sides.
RELATIVE_TOLERANCE = 1e-9


def _peak_rss_mb() -> dict[str, float]:
    """Peak memory of this process and of its largest child (dbt runs as a subprocess)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": max(own, children), "own_mb": own, "largest_child_mb": children}


def _sources(home: Path):
    from orchestration.resources import SourcesResource

    return SourcesResource(
        generated_dir=str(home / "generated"),
        landing_dir=str(home / "landing"),
        accounts=ACCOUNTS,
        late_share=0.0,
    )


def run_generator(home: Path) -> dict:
    """Write the extracts both sides read (the pipeline's own generation then finds them)."""
    from datetime import date

    from keel.generator import days, generate_account_holders, generate_day

    sources = _sources(home)
    config = sources.generator_config()
    start = time.perf_counter()
    generate_account_holders(config, Path(sources.generated_dir))
    for day in days(date.fromisoformat(FIRST_DAY), DAYS):
        generate_day(config, day, Path(sources.generated_dir), Path(sources.landing_dir))
    return {"generate_seconds": time.perf_counter() - start}


def run_pipeline(home: Path) -> dict:
    """The data layer through Dagster in two runs, over the files already generated."""
    from datetime import date, timedelta

    import dagster as dg

    from assets.ingestion import INGESTION_ASSETS, INGESTION_CHECKS
    from assets.transformation import TRANSFORMATION_ASSETS, dbt_models
    from orchestration.profiles import resources_for

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
        resources={**resources_for("local"), "sources": _sources(home)},
    )
    instance = dg.DagsterInstance.ephemeral()
    first = date.fromisoformat(FIRST_DAY)
    last = first + timedelta(days=DAYS - 1)
    start = time.perf_counter()
    if not defs.resolve_job_def("static").execute_in_process(instance=instance).success:
        raise RuntimeError("the static run failed")
    daily = defs.resolve_job_def("daily").execute_in_process(
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": first.isoformat(),
            "dagster/asset_partition_range_end": last.isoformat(),
        },
    )
    if not daily.success:
        raise RuntimeError("the daily run failed")
    return {"seconds": time.perf_counter() - start}


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


def _mart_view(folder: Path, alias: str, columns: list[str]) -> str:
    # Timestamps with and without a zone compare as UTC instants.
    selected = ", ".join(
        f"cast({c} as timestamptz) as {c}" if "timestamp" in c else c for c in columns
    )
    return (
        f"{alias} as (select {selected} from read_parquet("
        f"'{folder}/**/*.parquet', hive_partitioning = false))"
    )


def compare_marts(pipeline_marts: Path, baseline_marts: Path) -> dict:
    """Rows only one side has, and rows whose values differ, per mart (all zero: the same).

    Both sides are read through DuckDB with the same column names and types; floating-point
    values agree within ``RELATIVE_TOLERANCE``. ``created_timestamp`` (the build time) is left
    out.
    """
    import duckdb

    from keel import schema

    marts = {
        "features": (
            pipeline_marts / schema.FEATURES_MART,
            baseline_marts / "features",
            (schema.ENTITY_KEY, "event_timestamp"),
            tuple(schema.DAILY_NUMERIC_FEATURES),
            tuple(schema.DAILY_CATEGORICAL_FEATURES),
        ),
        "labels": (
            pipeline_marts / schema.LABELS_MART,
            baseline_marts / "labels",
            (schema.ENTITY_KEY, "event_timestamp"),
            (),
            (schema.LABEL_TIMESTAMP, schema.LABEL, *schema.PROTECTED_ATTRIBUTES),
        ),
    }
    figures = {}
    with duckdb.connect() as connection:
        connection.execute("set timezone = 'UTC'")
        for name, (ours, theirs, keys, floats, exact) in marts.items():
            columns = [*keys, *floats, *exact]

            joined = " and ".join(f"o.{k} = t.{k}" for k in keys)
            differs = [f"o.{c} is distinct from t.{c}" for c in exact] + [
                f"(o.{c} is null) <> (t.{c} is null) or abs(o.{c} - t.{c}) > "
                f"{RELATIVE_TOLERANCE} * greatest(abs(o.{c}), abs(t.{c}), 1.0)"
                for c in floats
            ]
            only_ours, only_theirs, different, total = connection.execute(
                f"""
                with {_mart_view(ours, "o", columns)}, {_mart_view(theirs, "t", columns)}
                select
                    count(*) filter (where t.{keys[0]} is null),
                    count(*) filter (where o.{keys[0]} is null),
                    count(*) filter (
                        where o.{keys[0]} is not null and t.{keys[0]} is not null
                        and ({" or ".join(differs)})
                    ),
                    count(*)
                from o full outer join t on {joined}
                """
            ).fetchone()
            figures[name] = {
                "rows": total,
                "only_pipeline": only_ours,
                "only_baseline": only_theirs,
                "different_values": different,
            }
    return figures


def _child(role: str, home: Path, *extra: Path) -> dict:
    command = [sys.executable, "-m", "bench.ingest", role, str(home), *map(str, extra)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="keel-bench-ingest-") as scratch:
        home = Path(scratch) / "keel-home"
        generated = _child("generate", home)
        ours = _child("pipeline", home)
        extracts = next(path for path in (home / "generated").iterdir() if path.is_dir())
        baseline = _child("baseline", Path(scratch) / "baseline", extracts)
        comparison = compare_marts(home / "marts", Path(scratch) / "baseline" / "baseline-marts")
    events = ACCOUNTS * DAYS
    checks = {}
    for name, figures in comparison.items():
        checks[f"same_{name}_mart"] = figures["rows"] > 0 and not (
            figures["only_pipeline"] or figures["only_baseline"] or figures["different_values"]
        )
    write_result(
        "ingest",
        {
            "events": events,
            "seconds": round(ours["seconds"], 2),
            "events_per_s": round(events / ours["seconds"]),
            "peak_rss_mb": round(ours["peak_rss_mb"], 1),
            "baseline_seconds": round(baseline["baseline_seconds"], 2),
            "ratio_vs_duckdb_sql": round(ours["seconds"] / baseline["baseline_seconds"], 2),
            "same_marts": all(checks.values()),
            "params": {
                "accounts": ACCOUNTS,
                "days": DAYS,
                "timed": "ingest, validation, dbt and mart export; generation on neither side",
                "generate_seconds": round(generated["generate_seconds"], 2),
                "marts_compared": comparison,
                "baseline_peak_rss_mb": round(baseline["peak_rss_mb"], 1),
                "pipeline_process_peak_rss_mb": round(ours["own_mb"], 1),
                "dbt_process_peak_rss_mb": round(ours["largest_child_mb"], 1),
                "baseline_feature_rows": baseline["baseline_feature_rows"],
                "cpu_count": os.cpu_count(),
            },
        },
    )
    require_same_answers("ingest", checks)


ROLES = {"generate": run_generator, "pipeline": run_pipeline}

if __name__ == "__main__":
    role, home = sys.argv[1], Path(sys.argv[2])
    os.environ["KEEL_HOME"] = str(home)
    os.environ["KEEL_PROFILE"] = "local"
    figures = ROLES[role](home) if role in ROLES else run_baseline(home, Path(sys.argv[3]))
    print(json.dumps({**figures, **_peak_rss_mb()}))
