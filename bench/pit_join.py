"""Benchmark: a point-in-time training set for 1 million label rows over the feature service.

Writes seeded synthetic marts in the dbt contract (``keel.schema``): 10 million daily feature
rows, 1 million labels. Then builds the same training set, each side in its own process (so
``peak_rss_mb`` is its own), from the Parquet marts to an Arrow table in memory:

- ``seconds``: ``store.get_historical_features(...)`` through ``KeelDuckDBOfflineStore``, the
  way the ``training_set`` asset calls it, labels read and put in canonical order included;
- ``asof_seconds``: one hand-written DuckDB ``ASOF JOIN`` (the floor), same columns and values;
- ``feast_file_seconds``: Feast's default file (Dask) offline store, stopped past 15 minutes or
  8 GiB of memory. If it stops, both sides also run at 100,000 labels x 1 million feature rows,
  where it finishes, so that the speedup has a number (``params.feast_file_small``).

Keel and the floor run five times each, interleaved; the figures are medians.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from bench.common import require_same_answers, write_result
from keel import schema

FIRST_DAY = date(2026, 1, 1)
LABEL_DELAY = timedelta(days=30)


def _utc_midnights(days: np.ndarray, first_day: date) -> pa.Array:
    start = np.datetime64(first_day.isoformat(), "us")
    return pa.array(start + days.astype("timedelta64[D]"), pa.timestamp("us", tz="UTC"))


def _rolling(daily: np.ndarray, window: int) -> np.ndarray:
    """Trailing sums over ``window`` days along axis 0 (days x accounts)."""
    cumulative = np.cumsum(daily, axis=0)
    shifted = np.zeros_like(cumulative)
    shifted[window:] = cumulative[:-window]
    return cumulative - shifted


def write_synthetic_marts(
    marts: Path,
    *,
    accounts: int,
    days: int,
    label_rows: int,
    seed: int = 7,
    first_day: date = FIRST_DAY,
    created_delay: timedelta = timedelta(hours=2),
) -> dict[str, int]:
    """Write seeded marts shaped like dbt's: daily feature files, label files, accounts.

    Every account gets one feature row per day, stamped at the end of its activity day, with
    rolling spend, payment and utilisation figures that change from day to day. Labels are
    sampled without repetition from (account, observation day) pairs and filed by arrival day.

    Returns:
        Row counts: ``feature_rows`` and ``label_rows``.
    """
    rng = np.random.default_rng(seed)
    features_dir = marts / schema.FEATURES_MART
    labels_dir = marts / schema.LABELS_MART
    features_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)

    account_ids = np.arange(1, accounts + 1, dtype=np.int64) * 10
    credit_limit = rng.choice([1_000.0, 2_500.0, 5_000.0, 10_000.0, 20_000.0], accounts)
    product = rng.choice(np.array(schema.PRODUCTS), accounts)
    opened_days_before = rng.integers(30, 3_000, accounts)
    risk = rng.beta(2, 8, accounts)
    age_band = rng.choice(np.array(schema.AGE_BANDS), accounts)
    sex = rng.choice(np.array(schema.SEXES), accounts)
    region = rng.choice(np.array(schema.REGIONS), accounts)

    warmup = 90
    total = days + warmup
    spend = rng.gamma(1.5, 20.0, (total, accounts)) * (rng.random((total, accounts)) < 0.6)
    payments = rng.gamma(1.2, 25.0, (total, accounts)) * (rng.random((total, accounts)) < 0.1)
    transactions = rng.poisson(1.2, (total, accounts)).astype(np.float64)
    missed = (rng.random((total, accounts)) < risk / 30).astype(np.float64)
    active = (spend > 0).astype(np.float64)
    balance = np.clip(np.cumsum(spend - payments, axis=0), 0.0, None)
    utilisation = np.minimum(balance / credit_limit, 1.5)
    sums = {
        "spend_7d": _rolling(spend, 7),
        "spend_30d": _rolling(spend, 30),
        "spend_90d": _rolling(spend, 90),
        "payments_7d": _rolling(payments, 7),
        "payments_30d": _rolling(payments, 30),
        "payments_90d": _rolling(payments, 90),
        "transactions_7d": _rolling(transactions, 7),
        "transactions_30d": _rolling(transactions, 30),
        "active_days_30d": _rolling(active, 30),
        "missed_payments_30d": _rolling(missed, 30),
        "missed_payments_90d": _rolling(missed, 90),
        "avg_utilisation_30d": _rolling(utilisation, 30) / 30,
    }
    max_utilisation = np.maximum.accumulate(utilisation, axis=0)
    channels = np.array(schema.CHANNELS)

    for day in range(days):
        row = warmup + day
        activity_day = first_day + timedelta(days=day)
        stamp = datetime.combine(activity_day + timedelta(days=1), datetime.min.time(), UTC)
        columns = {
            schema.ENTITY_KEY: pa.array(account_ids),
            schema.EVENT_TIMESTAMP: pa.array([stamp] * accounts, pa.timestamp("us", tz="UTC")),
            schema.CREATED_TIMESTAMP: pa.array(
                [stamp + created_delay] * accounts, pa.timestamp("us", tz="UTC")
            ),
        }
        values = {name: series[row] for name, series in sums.items()}
        values["balance"] = balance[row]
        values["utilisation"] = utilisation[row]
        values["max_utilisation_90d"] = max_utilisation[row]
        values["credit_limit"] = credit_limit
        values["tenure_days"] = (opened_days_before + day).astype(np.float64)
        for name in schema.DAILY_NUMERIC_FEATURES:
            columns[name] = pa.array(np.round(values[name], 2), pa.float64())
        columns["product"] = pa.array(product)
        columns["main_channel_30d"] = pa.array(rng.choice(channels, accounts))
        pq.write_table(pa.table(columns), features_dir / f"{activity_day.isoformat()}.parquet")

    picks = rng.choice(accounts * days, size=label_rows, replace=False)
    label_account, label_day = picks % accounts, picks // accounts
    defaulted = (rng.random(label_rows) < risk[label_account] * 0.5).astype(np.int64)
    observed = _utc_midnights(label_day + 1, first_day)
    arrived = _utc_midnights(label_day + 1 + LABEL_DELAY.days, first_day)
    labels = pa.table(
        {
            schema.ENTITY_KEY: pa.array(account_ids[label_account]),
            schema.EVENT_TIMESTAMP: observed,
            schema.LABEL_TIMESTAMP: arrived,
            schema.LABEL: pa.array(defaulted),
            "age_band": pa.array(age_band[label_account]),
            "sex": pa.array(sex[label_account]),
            "region": pa.array(region[label_account]),
        }
    )
    arrival_day = label_day + 1 + LABEL_DELAY.days
    for day in np.unique(arrival_day):
        name = (first_day + timedelta(days=int(day))).isoformat()
        pq.write_table(labels.filter(pa.array(arrival_day == day)), labels_dir / f"{name}.parquet")

    accounts_table = pa.table(
        {
            schema.ENTITY_KEY: pa.array(account_ids),
            "product": pa.array(product),
            "credit_limit": pa.array(credit_limit),
            "age_band": pa.array(age_band),
            "sex": pa.array(sex),
            "region": pa.array(region),
        }
    )
    pq.write_table(accounts_table, marts / schema.ACCOUNTS_MART)
    return {"feature_rows": accounts * days, "label_rows": label_rows}


# -- The benchmark ------------------------------------------------------------------------------

ACCOUNTS = 100_000
DAYS = 100
LABEL_ROWS = 1_000_000
SEED = 7
REPEATS = 5
FEAST_FILE_LIMIT_S = 15 * 60
FEAST_FILE_MEMORY_CAP_GB = 8.0
# Where Feast's file store finishes on this machine, if it cannot at full scale.
SMALL = {"accounts": 10_000, "days": 100, "label_rows": 100_000}


def _floor_sql(marts: Path, ttl_us: int) -> str:
    """The hand-written floor: one ASOF JOIN from the Parquet marts, same columns and values."""
    features = marts / schema.FEATURES_MART
    labels = marts / schema.LABELS_MART
    fresh = f"f.event_timestamp + INTERVAL ({ttl_us}) MICROSECONDS >= l.event_timestamp"
    daily = [f"CASE WHEN {fresh} THEN f.{name} END AS {name}" for name in schema.DAILY_FEATURES]
    return f"""
        WITH j AS (
            SELECT l.*, {", ".join(daily)}
            FROM read_parquet('{labels}/*.parquet') l
            ASOF LEFT JOIN read_parquet('{features}/*.parquet') f
              ON l.account_id = f.account_id AND l.event_timestamp >= f.event_timestamp
        )
        SELECT *,
            payments_30d / greatest(spend_30d, 1.0) AS payment_to_spend_30d,
            spend_7d / greatest(spend_30d * 7 / 30, 1.0) AS spend_trend_7d_vs_30d,
            balance / greatest(credit_limit, 1.0) AS balance_to_limit
        FROM j
    """


def run_side(side: str, home: Path) -> dict:
    """One measured side, in its own process: build the training table, keep it for checking."""
    os.environ["KEEL_HOME"] = str(home)
    import duckdb

    from keel import features

    marts = home / "marts"
    output = home / f"{side}.arrow"
    if side == "asof":
        connection = duckdb.connect()
        connection.execute("SET TimeZone = 'UTC'")
        start = time.perf_counter()
        table = connection.sql(_floor_sql(marts, 2 * 86_400_000_000)).to_arrow_table()
        seconds = time.perf_counter() - start
    else:
        overrides = {"offline_store": {"type": "file"}} if side == "feast_file" else None
        store = features.open_store(overrides=overrides)
        service = store.get_feature_service(schema.FEATURE_SERVICE)
        store.list_on_demand_feature_views()
        start = time.perf_counter()
        labels = features.read_mart(marts / schema.LABELS_MART, "labels")
        entity_rows = features.label_rows(labels, schema.ENTITY_KEY, schema.LABEL)
        table = store.get_historical_features(entity_df=entity_rows, features=service).to_arrow()
        seconds = time.perf_counter() - start
    feather.write_feather(table, output, compression="uncompressed")
    label_columns = pq.read_schema(next((marts / schema.LABELS_MART).glob("*.parquet"))).names
    return {
        "seconds": seconds,
        "rows": table.num_rows,
        "features": len(set(table.column_names) - set(label_columns)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "output": str(output),
    }


def _spawn(side: str, home: Path, limit_s: float | None = None, cap_gb: float | None = None):
    """Run ``side`` in a child process; stop it past ``limit_s`` or ``cap_gb`` of memory."""
    import psutil

    child = subprocess.Popen(
        [sys.executable, "-m", "bench.pit_join", side, str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    started, peak = time.perf_counter(), 0.0
    process = psutil.Process(child.pid)
    while child.poll() is None:
        elapsed = time.perf_counter() - started
        try:
            peak = max(peak, process.memory_info().rss / 2**30)
        except psutil.NoSuchProcess:
            break
        if (limit_s and elapsed > limit_s) or (cap_gb and peak > cap_gb):
            child.kill()
            child.wait()
            why = f"{peak:.1f} GiB memory cap" if cap_gb and peak > cap_gb else "time limit"
            return None, f"stopped at the {why} after {elapsed:.0f} s"
        time.sleep(0.2)
    output = child.stdout.read() if child.stdout else ""
    if child.returncode != 0:
        return None, f"failed with exit code {child.returncode}"
    return json.loads(output.strip().splitlines()[-1]), None


def _same_rows(left_path: str, right_path: str) -> bool:
    keys = [schema.ENTITY_KEY, schema.EVENT_TIMESTAMP]
    left = feather.read_table(left_path).to_pandas().sort_values(keys, ignore_index=True)
    right = feather.read_table(right_path).to_pandas().sort_values(keys, ignore_index=True)
    if list(left.columns) != list(right.columns) or len(left) != len(right):
        return False
    for column in left.columns:
        if not left[column].astype(object).equals(right[column].astype(object)):
            return False
    return True


def _prepare(home: Path, accounts: int, days: int, label_rows: int) -> None:
    """Write the marts into ``home`` and apply the feature repo there."""
    write_synthetic_marts(
        home / "marts", accounts=accounts, days=days, label_rows=label_rows, seed=SEED
    )
    os.environ["KEEL_HOME"] = str(home)
    from keel import features

    features.apply_repo(features.open_store())


def _feast_file_at_small_scale(home: Path) -> dict:
    """Both sides where Feast's file store can finish, so that there is a speedup to quote."""
    _prepare(home, **SMALL)
    keel, failure = _spawn("keel", home)
    if failure:
        raise RuntimeError(f"keel {failure}")
    feast_file, failure = _spawn("feast_file", home, FEAST_FILE_LIMIT_S, FEAST_FILE_MEMORY_CAP_GB)
    figures = {**SMALL, "feature_rows": SMALL["accounts"] * SMALL["days"]}
    figures["seconds"] = round(keel["seconds"], 3)
    if feast_file is None:
        figures["feast_file_seconds"] = f"did not finish: {failure}"
        return figures
    figures["feast_file_seconds"] = round(feast_file["seconds"], 3)
    figures["speedup_vs_feast_file"] = round(feast_file["seconds"] / keel["seconds"], 2)
    figures["same_rows_as_feast_file"] = _same_rows(keel["output"], feast_file["output"])
    return figures


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="keel-pit-join-"))
    try:
        home = scratch / "home"
        _prepare(home, ACCOUNTS, DAYS, LABEL_ROWS)
        runs: dict[str, list[dict]] = {"keel": [], "asof": []}
        for _ in range(REPEATS):
            for side in ("keel", "asof"):
                result, failure = _spawn(side, home)
                if failure:
                    raise RuntimeError(f"{side} {failure}")
                runs[side].append(result)
        seconds = statistics.median(run["seconds"] for run in runs["keel"])
        asof_seconds = statistics.median(run["seconds"] for run in runs["asof"])
        same_as_asof = _same_rows(runs["keel"][0]["output"], runs["asof"][0]["output"])
        feast_file, failure = _spawn(
            "feast_file", home, FEAST_FILE_LIMIT_S, FEAST_FILE_MEMORY_CAP_GB
        )
        params = {
            "feature_rows": ACCOUNTS * DAYS,
            "accounts": ACCOUNTS,
            "days": DAYS,
            "seed": SEED,
            "repeats": REPEATS,
            "seconds_runs": [round(run["seconds"], 3) for run in runs["keel"]],
            "asof_seconds_runs": [round(run["seconds"], 3) for run in runs["asof"]],
            "same_rows_as_asof": same_as_asof,
            "measured": "labels mart (Parquet) to the Arrow training table in memory",
            "feast_file_limits": f"{FEAST_FILE_LIMIT_S} s, {FEAST_FILE_MEMORY_CAP_GB} GiB",
        }
        if feast_file is not None:
            feast_file_seconds: float | str = round(feast_file["seconds"], 3)
            speedup: float | str = round(feast_file["seconds"] / seconds, 2)
            params["same_rows_as_feast_file"] = _same_rows(
                runs["keel"][0]["output"], feast_file["output"]
            )
            params["feast_file_peak_rss_mb"] = round(feast_file["peak_rss_mb"], 1)
        else:
            small = _feast_file_at_small_scale(scratch / "small")
            params["feast_file_small"] = small
            feast_file_seconds = f"Feast's file (Dask) store did not finish: {failure}"
            speedup = (
                "not measured at this scale; "
                f"{small.get('speedup_vs_feast_file', 'none either')} at "
                f"{SMALL['label_rows']:,} labels x {small['feature_rows']:,} feature rows "
                "(params.feast_file_small)"
            )
        write_result(
            "pit_join",
            {
                "label_rows": runs["keel"][0]["rows"],
                "features": runs["keel"][0]["features"],
                "seconds": round(seconds, 3),
                "peak_rss_mb": round(max(run["peak_rss_mb"] for run in runs["keel"]), 1),
                "feast_file_seconds": feast_file_seconds,
                "asof_seconds": round(asof_seconds, 3),
                "ratio_vs_asof": round(seconds / asof_seconds, 3),
                "speedup_vs_feast_file": speedup,
                "params": params,
            },
        )
        checks = {"same_rows_as_asof": same_as_asof}
        if "same_rows_as_feast_file" in params:
            checks["same_rows_as_feast_file"] = params["same_rows_as_feast_file"]
        if "same_rows_as_feast_file" in params.get("feast_file_small", {}):
            checks["feast_file_small.same_rows_as_feast_file"] = params["feast_file_small"][
                "same_rows_as_feast_file"
            ]
        require_same_answers("pit_join", checks)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(run_side(sys.argv[1], Path(sys.argv[2]))))
