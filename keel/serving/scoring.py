"""The request path's maths: route entities to arms, score them, fall back, run the shadow.

Plain Python over a `Snapshot` of `keel.serving.deployments`; ``keel.serving.app`` wraps it in
HTTP. Each entity goes to the arm `Snapshot.arm_for` picks (sticky per account). The
prediction cache answers what it can; the arm's model scores the rest in one batch. When the
canary raises, the same rows get the champion's scores and each row records the canary's
error, so the client sees no failure while the error still counts against the canary. When
the champion raises, the request fails (`ModelUnavailable`, HTTP 503).

The shadow model scores the same rows after the response is sent (handed over to the
worker's `ShadowRunner`, scored in batches across requests); its results go to the
prediction log as ``shadow`` records.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keel.serving import metrics
from keel.serving.cache import PredictionCache
from keel.serving.deployments import CANARY, CHAMPION, LoadedModel, Snapshot
from keel.serving.prediction_log import SHADOW, PredictionLogWriter

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """The champion could not score: the request cannot be answered."""


@dataclass
class Batch:
    """Entities of one request and their features, column by column."""

    account_ids: list[int | None]
    columns: dict[str, list[Any]]
    event_us: list[int | None]
    known: list[bool]
    # Design matrices built for this batch, as (layout, rows, matrix): the shadow reuses them.
    designs: list[tuple[Any, list[int], Any]] = field(default_factory=list)


@dataclass
class Scores:
    """Per entity: what the client gets and what the log records."""

    score: list[float | None]
    arm: list[str | None]
    version: list[str | None]
    cache_hit: list[bool]
    error: list[str | None]
    fallback_version: list[str | None]
    model_seconds: dict[tuple[str, str], float]  # (arm, version) -> model time in the request


def model_frame(
    columns: dict[str, list[Any]], names: Sequence[str], rows: list[int]
) -> pd.DataFrame:
    """The model's input: columns ``names`` at positions ``rows``."""
    import pandas as pd

    if len(rows) == len(next(iter(columns.values()), ())):
        return pd.DataFrame({name: columns[name] for name in names})
    return pd.DataFrame({name: [columns[name][i] for i in rows] for name in names})


class FastLightGBM:
    """A LightGBM risk model scored straight from columns: no pandas frame per request.

    Builds the design matrix `keel.training.FeatureEncoder.lightgbm_matrix` builds (numbers
    as float64 with infinities as missing, categories as 1..k by vocabulary, 0 for unseen or
    missing) and applies ``LightGBMRiskModel.predict_proba``'s correction, so the scores are
    the same numbers; the tests compare both on every served row.
    """

    def __init__(self, risk_model: Any) -> None:
        encoder = risk_model.encoder
        self.numeric = tuple(encoder.numeric)
        self.categories = tuple(
            (name, {value: code for code, value in enumerate(vocabulary, start=1)})
            for name, vocabulary in encoder.categories
        )
        self.booster = risk_model.booster
        self.logit_offset = float(risk_model.logit_offset)
        # Two models with equal layouts build the same matrix from the same columns.
        self.layout = (
            self.numeric,
            tuple((name, tuple(codes)) for name, codes in self.categories),
        )

    def predict(self, columns: dict[str, list[Any]], rows: list[int]) -> np.ndarray:
        return self.score_design(self.design(columns, rows))

    def design(self, columns: dict[str, list[Any]], rows: list[int]) -> np.ndarray:
        """The model's input matrix for ``rows`` of ``columns``."""
        import numpy as np

        numbers = [columns[name] for name in self.numeric]
        categories = [(columns[name], codes) for name, codes in self.categories]
        # One conversion for the whole matrix (None becomes NaN): cheaper than one per column.
        matrix = np.array(
            [
                [column[i] for column in numbers]
                + [codes.get(column[i], 0) for column, codes in categories]
                for i in rows
            ],
            dtype=np.float64,
        ).reshape(len(rows), len(numbers) + len(categories))
        numeric = matrix[:, : len(numbers)]
        numeric[np.isinf(numeric)] = np.nan
        return matrix

    def score_design(self, matrix: np.ndarray) -> np.ndarray:
        """Scores of the rows of a matrix that `design` built (with this layout)."""
        import numpy as np

        from keel.training import SMALL_BATCH_ROWS

        threads = 1 if len(matrix) <= SMALL_BATCH_ROWS else 0
        raw = self.booster.predict(matrix, raw_score=True, num_threads=threads)
        return 0.5 * (1.0 + np.tanh(0.5 * (np.asarray(raw, np.float64) - self.logit_offset)))


_fast_models: dict[int, tuple[Any, FastLightGBM | None]] = {}


def fast_model(model: LoadedModel) -> FastLightGBM | None:
    """The column scorer of a LightGBM risk model (None for any other model)."""
    entry = _fast_models.get(id(model.model))
    if entry is None or entry[0] is not model.model:
        from keel.training import LightGBMRiskModel

        fast = FastLightGBM(model.model) if type(model.model) is LightGBMRiskModel else None
        if len(_fast_models) > 16:  # old versions: drop them, the dict only caches adapters
            _fast_models.clear()
        entry = _fast_models[id(model.model)] = (model.model, fast)
    return entry[1]


def _predict(model: LoadedModel, batch: Batch, rows: list[int]) -> tuple[list[float], float]:
    """Scores of ``rows`` by ``model`` and the model time; raises as the model does."""
    started = time.perf_counter()
    fast = fast_model(model)
    if fast is None:
        scores = model.predict(model_frame(batch.columns, model.feature_names, rows))
    else:
        design = fast.design(batch.columns, rows)
        batch.designs.append((fast.layout, rows, design))
        scores = _usable(model, fast.score_design(design), len(rows))
    return scores.tolist(), time.perf_counter() - started


def _usable(model: LoadedModel, scores: np.ndarray, rows: int) -> np.ndarray:
    import numpy as np

    from keel.serving.deployments import ServingModelError

    if scores.shape != (rows,) or not np.isfinite(scores).all():
        raise ServingModelError(f"version {model.version} returned unusable scores")
    return scores


def _reused_design(jobs: list[ShadowJob], layout: Any) -> np.ndarray | None:
    """The matrix of every job's rows from the designs their requests built, if all have one."""
    import numpy as np

    parts = []
    for job in jobs:
        found: dict[int, tuple[np.ndarray, int]] = {}
        for built_layout, rows, matrix in job.batch.designs:
            if built_layout is layout or built_layout == layout:
                if rows == job.rows:
                    parts.append(matrix)
                    break
                found.update((row, (matrix, k)) for k, row in enumerate(rows))
        else:
            if any(row not in found for row in job.rows):
                return None  # rows answered from the cache, or by a model of another layout
            parts.append(np.stack([found[row][0][found[row][1]] for row in job.rows]))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _error_text(arm: str, error: BaseException) -> str:
    return f"{arm}: {type(error).__name__}: {error}"[:500]


class Scorer:
    """Scores batches against the current snapshot, with the cache; thread-safe.

    Args:
        cache: The worker's prediction cache.
    """

    def __init__(self, cache: PredictionCache) -> None:
        self.cache = cache
        self._snapshot: Snapshot | None = None
        self._seconds_per_entity = 0.0  # running mean of model time, for the cache's savings

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot is self._snapshot:
            return
        previous, self._snapshot = self._snapshot, snapshot
        self.cache.retain(set(snapshot.versions().values()))
        if previous is not None:
            for arm, version in previous.versions().items():
                metrics.MODEL_INFO.labels(arm, version).set(0)
        for arm, version in snapshot.versions().items():
            metrics.MODEL_INFO.labels(arm, version).set(1)

    def score(self, snapshot: Snapshot, batch: Batch) -> Scores:
        self._on_snapshot(snapshot)
        size = len(batch.account_ids)
        result = Scores(
            score=[None] * size,
            arm=[None] * size,
            version=[None] * size,
            cache_hit=[False] * size,
            error=[None] * size,
            fallback_version=[None] * size,
            model_seconds={},
        )
        groups: dict[str, list[int]] = {}
        for i, (account_id, known) in enumerate(zip(batch.account_ids, batch.known, strict=True)):
            if known:
                arm = snapshot.arm_for(account_id) if account_id is not None else CHAMPION
                groups.setdefault(arm, []).append(i)
        for arm, rows in groups.items():
            self._score_arm(snapshot, snapshot.model_for(arm), batch, rows, result)
        return result

    def _score_arm(
        self, snapshot: Snapshot, model: LoadedModel, batch: Batch, rows: list[int], out: Scores
    ) -> None:
        arm, version = model.arm, model.version
        ids, event_us = batch.account_ids, batch.event_us
        keys = [
            (version, ids[i], event_us[i])
            if ids[i] is not None and event_us[i] is not None
            else None
            for i in rows
        ]
        cached = self.cache.get_many(keys)
        misses = []
        for i, score in zip(rows, cached, strict=True):
            out.arm[i], out.version[i] = arm, version
            if score is None:
                misses.append(i)
            else:
                out.score[i], out.cache_hit[i] = score, True
        hits = len(rows) - len(misses)
        if hits:
            metrics.CACHE_HITS.inc(hits)
            metrics.CACHE_SECONDS_SAVED.inc(hits * self._seconds_per_entity)
        if not misses:
            return
        metrics.CACHE_MISSES.inc(len(misses))
        try:
            scores, seconds = _predict(model, batch, misses)
        except Exception as error:
            metrics.ERRORS.labels(arm, version, "model").inc()
            if arm != CANARY:
                log.error("champion %s failed: %s", version, error)
                raise ModelUnavailable(_error_text(arm, error)) from error
            self._fall_back(snapshot, batch, misses, _error_text(arm, error), out)
            return
        out.model_seconds[(arm, version)] = seconds
        self._seconds_per_entity += 0.05 * (seconds / len(misses) - self._seconds_per_entity)
        for i, score in zip(misses, scores, strict=True):
            out.score[i] = score
        self.cache.put_many(
            ((version, ids[i], event_us[i]) if event_us[i] is not None else None, score)
            for i, score in zip(misses, scores, strict=True)
            if ids[i] is not None
        )

    def _fall_back(
        self, snapshot: Snapshot, batch: Batch, rows: list[int], error: str, out: Scores
    ) -> None:
        champion = snapshot.champion
        try:
            scores, _ = _predict(champion, batch, rows)
        except Exception as champion_error:
            metrics.ERRORS.labels(CHAMPION, champion.version, "model").inc()
            raise ModelUnavailable(_error_text(CHAMPION, champion_error)) from champion_error
        metrics.CANARY_FALLBACKS.inc(len(rows))
        for i, score in zip(rows, scores, strict=True):
            out.score[i], out.error[i], out.fallback_version[i] = score, error, champion.version


@dataclass
class ShadowJob:
    """One request's rows for the shadow model."""

    request_id: str
    ts: str
    model: LoadedModel
    batch: Batch
    rows: list[int]


class ShadowRunner:
    """Scores shadow jobs after their responses are sent, in batches, and logs them.

    A request hands its job over with `submit`, on the worker's event loop; nothing is scored
    before the loop's next turn, by when the request's response has been written out. Jobs
    gather until `BATCH_ROWS` rows or `MAX_WAIT_S` seconds, then the shadow model scores them in
    one call (one LightGBM call for many requests costs little more than one for a single row)
    and their lines go to the log in one write. Jobs beyond ``max_pending`` waiting at once are
    dropped and counted.

    Args:
        log_writer: Where shadow records go.
        max_pending: Jobs waiting before new ones are dropped.
    """

    BATCH_ROWS = 64
    MAX_WAIT_S = 0.05

    def __init__(self, log_writer: PredictionLogWriter, max_pending: int) -> None:
        self.log_writer = log_writer
        self.max_pending = max_pending
        self.pending = 0
        self.done = 0
        self._jobs: list[ShadowJob] = []
        self._rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self._soon: asyncio.Handle | None = None

    def submit(self, job: ShadowJob) -> bool:
        """Queue ``job`` from a request on the event loop; False when too many are waiting.

        A plain call rather than a background task of the response: the task's machinery cost
        more per request than the shadow's share of a batched model call.
        """
        if self.pending >= self.max_pending:
            metrics.SHADOW_DROPPED.inc()
            return False
        self.pending += 1
        self._jobs.append(job)
        self._rows += len(job.rows)
        if self._rows >= self.BATCH_ROWS:
            if self._soon is None:
                self._soon = asyncio.get_running_loop().call_soon(self.flush)
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.MAX_WAIT_S, self.flush)
        return True

    def flush(self) -> None:
        """Score and log every waiting job now."""
        for handle in (self._timer, self._soon):
            if handle is not None:
                handle.cancel()
        self._timer = self._soon = None
        jobs, self._jobs, self._rows = self._jobs, [], 0
        if not jobs:
            return
        try:
            self.log_writer.write(self._score(jobs))
        except Exception:
            log.exception("shadow scoring of %d requests failed", len(jobs))
        finally:
            self.pending -= len(jobs)
            self.done += len(jobs)

    def _score(self, jobs: list[ShadowJob]) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        groups: dict[int, list[ShadowJob]] = {}
        for job in jobs:
            groups.setdefault(id(job.model), []).append(job)
        for group in groups.values():
            model = group[0].model
            fast = fast_model(model)
            # The served arms built the same matrix already when their layout is the shadow's.
            design = _reused_design(group, fast.layout) if fast is not None else None
            started = time.perf_counter()
            try:
                if design is not None:
                    scores = _usable(model, fast.score_design(design), len(design)).tolist()
                else:
                    scores = self._merged_scores(model, group)
            except Exception:
                # One bad request must not cost the others their shadow scores.
                for job in group:
                    records.extend(self._score_one(job))
                continue
            seconds = time.perf_counter() - started
            metrics.SHADOW_PREDICTIONS.labels(model.version).inc(len(scores))
            metrics.SHADOW_LATENCY.labels(model.version).observe(seconds)
            position = 0
            for job in group:
                share = seconds * len(job.rows) / len(scores)
                part = scores[position : position + len(job.rows)]
                position += len(job.rows)
                records.extend(_shadow_records(job, part, share, None))
        return records

    @staticmethod
    def _merged_scores(model: LoadedModel, jobs: list[ShadowJob]) -> list[float]:
        names = model.feature_names
        merged = Batch(
            account_ids=[j.batch.account_ids[i] for j in jobs for i in j.rows],
            columns={n: [j.batch.columns[n][i] for j in jobs for i in j.rows] for n in names},
            event_us=[],
            known=[],
        )
        return _predict(model, merged, list(range(len(merged.account_ids))))[0]

    @staticmethod
    def _score_one(job: ShadowJob) -> list[dict[str, Any]]:
        version = job.model.version
        started = time.perf_counter()
        try:
            scores, error = _predict(job.model, job.batch, job.rows)[0], None
        except Exception as failure:
            scores, error = [None] * len(job.rows), _error_text(SHADOW, failure)
            metrics.SHADOW_ERRORS.labels(version).inc()
        seconds = time.perf_counter() - started
        metrics.SHADOW_PREDICTIONS.labels(version).inc(len(job.rows))
        metrics.SHADOW_LATENCY.labels(version).observe(seconds)
        return _shadow_records(job, scores, seconds, error)


def _shadow_records(
    job: ShadowJob, scores: list[float | None], seconds: float, error: str | None
) -> list[dict[str, Any]]:
    latency_ms = round(seconds * 1000, 3)
    ids = job.batch.account_ids
    return [
        {
            "record": SHADOW,
            "request_id": job.request_id,
            "ts": job.ts,
            "account_id": ids[i],
            "row": i,
            "shadow_version": job.model.version,
            "shadow_score": score,
            "shadow_latency_ms": latency_ms,
            "shadow_error": error,
        }
        for i, score in zip(job.rows, scores, strict=True)
    ]
