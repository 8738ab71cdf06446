"""Batch inference: score one day's accounts with the champion, features from the feature store.

The day's entity rows are the accounts in that day's feature-mart file, stamped at the end of
the day; their features come from ``get_historical_features`` over the feature service, the
same retrieval that built the training set, so batch scores see exactly the training features.
Only a champion that the registry's audit log approves may score: an alias or tag set directly
in MLflow is refused.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from keel import schema
from keel.monitoring_policy import DEFAULT_DECISION_THRESHOLD

if TYPE_CHECKING:
    from feast import FeatureStore

    from keel.registry import ModelRegistry

SCORE = "score"
MODEL_VERSION = "model_version"
SCORED_AT = "scored_at"


class InferenceError(RuntimeError):
    """A day that cannot be scored (no features for it, no champion)."""


def approved_champion(registry: ModelRegistry) -> str:
    """The champion's version number; ApprovalError unless the audit log agrees and approves it.

    The ``champion`` alias must point where the audit log's last promotion or rollback went:
    an alias moved outside Keel, even onto a version approved once, is refused.
    """
    from keel.registry import ApprovalError

    version = registry.champion()
    if version is None:
        raise InferenceError(
            "there is no champion yet: run the retrain job (training, evaluation, registry) "
            "and approve a version, or turn on auto_approve"
        )
    registry.require_approved(version)
    audited = registry.audited_champion()
    if version != audited:
        raise ApprovalError(
            f"the {registry.name} champion alias points at version {version}, but the audit log "
            f"made version {audited or 'none'} the champion: the alias was moved outside Keel "
            "(keel registry promote or rollback move it with an audit record)"
        )
    return version


def day_end(day: date) -> datetime:
    """The instant a day's features are stamped with (the end of the day, UTC)."""
    return datetime.combine(day + timedelta(days=1), time(), UTC)


def entity_rows(marts_dir: str | Path, day: date) -> pd.DataFrame:
    """The accounts that have features on ``day``, as Feast entity rows at the end of the day."""
    import pyarrow.parquet as pq

    from keel.storage import location

    path = location(marts_dir, schema.FEATURES_MART, f"{day.isoformat()}.parquet")
    if not path.exists():
        raise InferenceError(
            f"no features for {day} ({path} is missing): materialise the daily dbt models first"
        )
    with path.open("rb") as handle:
        accounts = pq.read_table(handle, columns=[schema.ENTITY_KEY]).column(schema.ENTITY_KEY)
    ids = np.unique(accounts.to_numpy())
    return pd.DataFrame(
        {schema.ENTITY_KEY: ids, schema.EVENT_TIMESTAMP: pd.Timestamp(day_end(day))}
    )


def score_day(store: FeatureStore, model: Any, model_version: str, entities: pd.DataFrame):
    """Features of the entity rows from the feature service, and the model's scores."""
    service = store.get_feature_service(schema.FEATURE_SERVICE)
    frame = store.get_historical_features(entity_df=entities, features=service).to_df()
    frame = frame.sort_values(schema.ENTITY_KEY, kind="stable").reset_index(drop=True)
    frame[SCORE] = model.predict_proba(frame[list(schema.MODEL_FEATURES)])
    frame[MODEL_VERSION] = model_version
    frame[SCORED_AT] = pd.Timestamp(datetime.now(UTC))
    return frame


def write_predictions(frame: pd.DataFrame, path):
    """Write one day's predictions as Parquet, atomically (a local path or a ``UPath``)."""
    from keel.files import atomic_write

    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return atomic_write(path, buffer.getvalue())


@dataclass(frozen=True)
class ScoreSummary:
    """What a person checks first about a day's scores."""

    rows: int
    mean: float
    quantiles: dict[str, float]
    histogram: list[int]
    flagged_share: float

    def to_markdown(self) -> str:
        from keel.reporting import markdown_table

        edges = np.linspace(0, 1, len(self.histogram) + 1)
        return markdown_table(
            ["score", "accounts"],
            [
                [f"{low:.1f}-{high:.1f}", count]
                for low, high, count in zip(edges[:-1], edges[1:], self.histogram, strict=True)
            ],
        )


def summarise_scores(
    scores: np.ndarray, threshold: float = DEFAULT_DECISION_THRESHOLD, bins: int = 10
) -> ScoreSummary:
    """Count, mean, quantiles, a histogram, and the share above the decision threshold."""
    scores = np.asarray(scores, dtype=float)
    counts, _ = np.histogram(scores, bins=bins, range=(0.0, 1.0))
    return ScoreSummary(
        rows=int(scores.size),
        mean=float(scores.mean()) if scores.size else float("nan"),
        quantiles={
            f"p{q}": float(np.quantile(scores, q / 100)) if scores.size else float("nan")
            for q in (5, 25, 50, 75, 95)
        },
        histogram=[int(c) for c in counts],
        flagged_share=float((scores >= threshold).mean()) if scores.size else 0.0,
    )
