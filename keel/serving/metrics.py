"""Every Prometheus metric of ``keel serve``, in one place.

With several uvicorn workers each process keeps its own values; prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by ``keel serve`` before any worker
imports this module) shares them through files, and `render_metrics` sums them for ``/metrics``.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Serving latencies sit in the milliseconds; the top buckets catch a stalled store.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
# Daily features are up to a day old when healthy; TTL is two days.
_AGE_BUCKETS = tuple(hours * 3600.0 for hours in (1, 6, 12, 24, 36, 48, 72, 168))

REQUESTS = Counter(
    "keel_serve_requests", "HTTP requests answered, by route and status code.", ["route", "status"]
)
PREDICTIONS = Counter(
    "keel_serve_predictions",
    "Entities scored, by deployment arm and model version.",
    ["arm", "version"],
)
LATENCY = Histogram(
    "keel_serve_latency_seconds",
    "Request latency to the prediction log write, by arm and model version.",
    ["arm", "version"],
    buckets=_LATENCY_BUCKETS,
)
ERRORS = Counter(
    "keel_serve_errors",
    "Failures by kind: model (an arm's model raised), feature_store, bad_request, internal.",
    ["arm", "version", "kind"],
)
CANARY_FALLBACKS = Counter(
    "keel_serve_canary_fallbacks", "Entities whose canary failed and got the champion's score."
)
CACHE_HITS = Counter("keel_serve_cache_hits", "Entities scored from the prediction cache.")
CACHE_MISSES = Counter("keel_serve_cache_misses", "Entities scored by the model.")
CACHE_SECONDS_SAVED = Counter(
    "keel_serve_cache_saved_seconds",
    "Model time the cache saved: hits times the mean model time per entity.",
)
FEATURE_AGE = Histogram(
    "keel_serve_feature_age_seconds",
    "Age of the served features (request time minus feature event time).",
    buckets=_AGE_BUCKETS,
)
UNKNOWN_ENTITIES = Counter(
    "keel_serve_unknown_entities", "Requested entities the online store has no features for."
)
SHADOW_PREDICTIONS = Counter(
    "keel_serve_shadow_predictions", "Entities the shadow model scored.", ["version"]
)
SHADOW_ERRORS = Counter("keel_serve_shadow_errors", "Shadow scoring failures.", ["version"])
SHADOW_LATENCY = Histogram(
    "keel_serve_shadow_latency_seconds",
    "Shadow model time per request.",
    ["version"],
    buckets=_LATENCY_BUCKETS,
)
SHADOW_DROPPED = Counter(
    "keel_serve_shadow_dropped", "Shadow jobs dropped because too many were waiting."
)
# Set by the release side with keel.serving.guardrails.STATE_VALUES.
GUARDRAIL_STATE = Gauge(
    "keel_serve_guardrail_state",
    "Guardrail state per arm: 0 no canary, 1 collecting, 2 healthy, 3 breached.",
    ["arm", "guardrail"],
    multiprocess_mode="mostrecent",
)
MODEL_INFO = Gauge(
    "keel_serve_model_loaded",
    "1 for each model version a worker serves, by arm.",
    ["arm", "version"],
    multiprocess_mode="livemax",
)


def multiprocess_mode() -> bool:
    """Whether values live in shared files, as prometheus-client decided when it was imported.

    Feast sets ``PROMETHEUS_MULTIPROC_DIR`` when it is imported, which may be after
    prometheus-client chose in-process values; the environment alone cannot tell.
    """
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue and bool(os.environ.get(MULTIPROC_ENV))


def render_metrics() -> tuple[bytes, str]:
    """The exposition text of every worker (summed in multiprocess mode) and its content type."""
    if multiprocess_mode():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_worker_exited(pid: int) -> None:
    """Drop a finished worker's live gauges (multiprocess mode only)."""
    if multiprocess_mode():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
