"""Benchmark: online lookup latency of the feature service for 1 and 100 entities.

Measures the path serving uses, ``keel.mirrors.feast_online_reader.OnlineFeatureReader``, on
the local SQLite online store and on the Redis server at 127.0.0.1:6379, after checking that it
returns exactly what ``store.get_online_features(...).to_dict()`` returns. Feast's SDK call
runs side by side as the baseline. Like a serving process after start-up, the measured process
freezes its start-up objects out of the garbage collector (``gc.freeze``) before the clocks
start.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np

from bench.common import write_result
from bench.pit_join import FIRST_DAY, write_synthetic_marts
from keel import schema

ACCOUNTS = 10_000
DAYS = 2
SEED = 11
WARMUP = 300
CALLS = {1: 5_000, 100: 2_000}
SDK_CALLS = {1: 500, 100: 200}
REDIS = "127.0.0.1:6379"


def percentiles(call, batches: list[list[int]]) -> dict[str, float]:
    """p50 and p99 of ``call(batch)`` over ``batches``, in milliseconds."""
    timings = []
    clock = time.perf_counter_ns
    for batch in batches:
        start = clock()
        call(batch)
        timings.append(clock() - start)
    timings.sort()
    return {
        "p50_ms": round(timings[len(timings) // 2] / 1e6, 4),
        "p99_ms": round(timings[int(len(timings) * 0.99)] / 1e6, 4),
    }


def open_backend(backend: str):
    from keel import features

    overrides: dict = {"project": f"bench{uuid.uuid4().hex[:8]}"}
    if backend == "redis":
        import redis

        host, port = REDIS.split(":")
        try:
            redis.Redis(host=host, port=int(port), socket_connect_timeout=1).ping()
        except redis.exceptions.ConnectionError as error:
            raise SystemExit(
                f"Redis is not reachable on {REDIS}: start it (Debian: apt-get install "
                "redis-server && redis-server --daemonize yes) and run the benchmark again."
            ) from error
        overrides["online_store"] = {
            "type": "keel.mirrors.feast_online_stores.KeelRedisOnlineStore",
            "connection_string": REDIS,
        }
    store = features.open_store(overrides=overrides)
    features.apply_repo(store)
    features.materialize_day(store, FIRST_DAY + timedelta(days=DAYS - 1))
    return store


def measure(backend: str, ids: np.ndarray, rng: np.random.Generator) -> dict[str, dict]:
    from keel.mirrors.feast_online_reader import OnlineFeatureReader

    store = open_backend(backend)
    try:
        service = store.get_feature_service(schema.FEATURE_SERVICE)
        reader = OnlineFeatureReader(store, schema.FEATURE_SERVICE)

        def sdk(batch: list[int]) -> dict:
            rows = [{schema.ENTITY_KEY: entity} for entity in batch]
            return store.get_online_features(features=service, entity_rows=rows).to_dict()

        for size in (1, 100):
            for _ in range(20):
                batch = rng.choice(ids, size).tolist()
                if reader.get(batch) != sdk(batch):
                    raise AssertionError(f"{backend}: the reader differs from Feast for {batch}")
        batches = {
            size: [rng.choice(ids, size).tolist() for _ in range(n)] for size, n in CALLS.items()
        }
        for batch in batches[1][:WARMUP] + batches[100][: WARMUP // 10]:
            reader.get(batch)
            sdk(batch)
        gc.collect()
        gc.freeze()
        figures = {}
        for size in (1, 100):
            fast = percentiles(reader.get, batches[size])
            baseline = percentiles(sdk, batches[size][: SDK_CALLS[size]])
            figures[f"{backend}_{size}"] = {
                **fast,
                "feast_sdk_p50_ms": baseline["p50_ms"],
                "feast_sdk_p99_ms": baseline["p99_ms"],
                "speedup_p99_vs_feast_sdk": round(baseline["p99_ms"] / fast["p99_ms"], 1),
            }
        gc.unfreeze()
        return figures
    finally:
        store.teardown()


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="keel-online-lookup-"))
    try:
        os.environ["KEEL_HOME"] = str(scratch)
        write_synthetic_marts(
            scratch / "marts", accounts=ACCOUNTS, days=DAYS, label_rows=10, seed=SEED
        )
        ids = np.arange(1, ACCOUNTS + 1, dtype=np.int64) * 10
        rng = np.random.default_rng(SEED)
        figures: dict = {}
        for backend in ("sqlite", "redis"):
            figures.update(measure(backend, ids, rng))
        figures["params"] = {
            "entities_in_store": ACCOUNTS,
            "features": len(schema.MODEL_FEATURES),
            "feature_service": schema.FEATURE_SERVICE,
            "calls": {str(size): n for size, n in CALLS.items()},
            "feast_sdk_calls": {str(size): n for size, n in SDK_CALLS.items()},
            "warmup_calls": WARMUP,
            "redis": REDIS,
            "measured": "keel.mirrors.feast_online_reader.OnlineFeatureReader.get, checked "
            "equal to get_online_features(...).to_dict()",
            "gc_frozen_after_startup": True,
        }
        write_result("online_lookup", figures)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
