"""The daily RAG report: query embedding drift against the corpus, unanswered share, cache hits.

Drift uses Evidently's embedding drift methods (``distance``: cosine distance between the
mean query and mean corpus vectors; ``model``: ROC AUC of a classifier told to separate
them), the questions of the day against a fixed sample of the index's chunk vectors.
Questions and manual text differ in form, so the level says little on its own; its change
from day to day is what to watch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Fewer questions than this make no drift verdict: the methods need some rows.
MIN_QUESTIONS_FOR_DRIFT = 20
REFERENCE_SAMPLE = 2000


def embedding_drift(
    current: np.ndarray, reference: np.ndarray, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Evidently's ``distance`` (cosine) and ``model`` drift methods on two vector sets."""
    import pandas as pd
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import distance, model

    rng = np.random.default_rng(seed)
    if len(reference) > REFERENCE_SAMPLE:
        reference = reference[rng.choice(len(reference), REFERENCE_SAMPLE, replace=False)]
    columns = [f"e{i}" for i in range(current.shape[1])]
    current_frame = pd.DataFrame(current, columns=columns)
    reference_frame = pd.DataFrame(reference, columns=columns)
    result = {}
    for name, method in (("distance", distance(dist="cosine")), ("model", model())):
        np.random.seed(seed)  # the model method splits its rows at random
        score, drifted, _ = method(current_frame, reference_frame)
        result[name] = {"score": float(score), "drifted": bool(drifted)}
    return result


def daily_report(
    records: list[dict[str, Any]], question_vectors: np.ndarray, corpus_vectors: np.ndarray
) -> dict[str, Any]:
    """One day's figures from its ask-log records and the vectors of its questions."""
    asked = len(records)
    refused = sum(1 for r in records if r.get("refused"))
    hits = sum(1 for r in records if r.get("cache") in ("exact", "semantic"))
    report: dict[str, Any] = {
        "questions": asked,
        "unanswered_share": refused / asked if asked else 0.0,
        "cache_hit_rate": hits / asked if asked else 0.0,
        "tokens": sum(int(r.get("tokens", 0)) for r in records),
        "tokens_saved": sum(int(r.get("tokens", 0)) for r in records if r.get("cache") != "miss"),
        "index_versions": sorted({r.get("index_version", "") for r in records}),
        "latency_p99_ms": float(np.percentile([r["latency_ms"] for r in records], 99))
        if records
        else 0.0,
    }
    if asked >= MIN_QUESTIONS_FOR_DRIFT:
        report["embedding_drift"] = embedding_drift(question_vectors, corpus_vectors)
    else:
        report["embedding_drift"] = None
        report["drift_skipped"] = f"{asked} questions < {MIN_QUESTIONS_FOR_DRIFT}"
    return report
