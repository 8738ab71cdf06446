"""The ``keel serve`` HTTP app: online features, canary routing, prediction log, metrics.

``create_app()`` builds one worker's app (uvicorn calls it in each worker, with the settings the
CLI put in the environment). Routes:

- ``POST /v1/predict`` ``{"account_ids": [...]}`` (1 to 1,000): newest features from the Feast
  online store, then a score, model version and arm per account, and a request id.
- ``POST /v1/predict/features`` ``{"instances": [{"features": {...}, "account_id": 7}]}``: the
  model's features given directly (no lookup); ``account_id`` (optional) picks the sticky arm.
- ``GET /healthz`` (the process answers), ``GET /readyz`` (a model is loaded and the online
  store answers), ``GET /metrics`` (Prometheus), ``/docs`` (OpenAPI).

Unknown accounts (no features in the online store) follow the request's ``unknown`` policy,
default the server's (`keel.serving.settings.UNKNOWN_POLICIES`): ``reject`` answers 404
naming them and scores nothing; ``null`` answers 200 with ``found: false`` and ``score: null``
for them. Bad input is a 4xx with a message, a store that does not answer a 503; both still
write their lines to the prediction log.
"""

from __future__ import annotations

import functools
import gc
import itertools
import logging
import os
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)
from starlette.routing import Route

from keel.rag.routes import router as ask_router
from keel.schema import CATEGORICAL_FEATURES
from keel.serving import metrics
from keel.serving.auth import HEADER, KeyStore, Principal, authorize, require_role
from keel.serving.cache import PredictionCache
from keel.serving.features import FeatureStoreUnavailable
from keel.serving.prediction_log import PREDICTION, PredictionLogWriter
from keel.serving.scoring import Batch, ModelUnavailable, Scorer, ShadowJob, ShadowRunner
from keel.serving.settings import MAX_BATCH, ServeSettings

log = logging.getLogger(__name__)

AccountId = Annotated[StrictInt, Field(ge=0, lt=2**63)]
FeatureValue = StrictFloat | StrictInt | StrictStr | None
_JSON = "application/json"
_LOOKUP, _FEATURES = "lookup", "features"


class PredictRequest(BaseModel):
    """Accounts to score from their newest online features."""

    model_config = ConfigDict(extra="forbid")
    account_ids: list[AccountId] = Field(min_length=1, max_length=MAX_BATCH)
    unknown: Literal["reject", "null"] | None = Field(
        default=None, description="Policy for accounts without features (default: server's)."
    )


class Instance(BaseModel):
    """One row of model features, with the account it belongs to when known."""

    model_config = ConfigDict(extra="forbid")
    features: dict[str, FeatureValue]
    account_id: AccountId | None = None


class FeaturesRequest(BaseModel):
    """Rows of model features to score as given."""

    model_config = ConfigDict(extra="forbid")
    instances: list[Instance] = Field(min_length=1, max_length=MAX_BATCH)


class Prediction(BaseModel):
    """One account's answer (``score`` null for an unknown account under ``unknown: null``)."""

    account_id: int | None
    score: float | None
    model_version: str | None
    arm: str | None
    found: bool
    cache_hit: bool
    feature_event_time: str | None


class PredictResponse(BaseModel):
    """The request id (it keys the prediction log) and one answer per account, in order."""

    request_id: str
    predictions: list[Prediction]


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=_JSON, headers=headers)


@functools.lru_cache(maxsize=4096)  # a day's features share a handful of event times
def _iso_us(event_us: int | None) -> str | None:
    if event_us is None:
        return None
    return datetime.fromtimestamp(event_us / 1e6, UTC).isoformat()


class Service:
    """One worker's state: stores, deployments, cache, log, shadow thread."""

    def __init__(self, settings: ServeSettings, deployments: Any, reader: Any) -> None:
        self.settings = settings
        self.deployments = deployments
        self.reader = reader
        self.cache = PredictionCache(settings.cache_entries)
        self.scorer = Scorer(self.cache)
        self.log_writer = PredictionLogWriter(settings.resolved_log_dir())
        self.shadow = ShadowRunner(self.log_writer, settings.shadow_queue)
        self._latency: dict[tuple[str, str], Any] = {}
        self._predictions: dict[tuple[str, str], Any] = {}
        self._requests: dict[tuple[str, int], Any] = {}
        # Request ids: a random prefix per worker and a counter, unique like uuid4's and
        # without a system call for random bytes on every request.
        self._id_prefix = secrets.token_hex(10)
        self._id_counter = itertools.count()

    def close(self) -> None:
        self.shadow.flush()
        self.log_writer.close()

    def _observe(self, arm: str, version: str, count: int, seconds: float) -> None:
        key = (arm, version)
        if key not in self._latency:
            self._latency[key] = metrics.LATENCY.labels(arm, version)
            self._predictions[key] = metrics.PREDICTIONS.labels(arm, version)
        self._latency[key].observe(seconds)
        self._predictions[key].inc(count)

    def _count_request(self, route: str, status: int) -> None:
        child = self._requests.get((route, status))
        if child is None:
            child = self._requests[(route, status)] = metrics.REQUESTS.labels(route, str(status))
        child.inc()

    def predict(self, batch: Batch, route: str, policy: str, started: float) -> Response:
        """Score ``batch``, log every row, and answer; never raises for a client's error."""
        request_id = f"{self._id_prefix}{next(self._id_counter):012x}"
        ts = datetime.now(UTC).isoformat()
        snapshot = self.deployments.current
        unknown = [i for i, known in enumerate(batch.known) if not known]
        status, body, scores = 200, None, None
        if unknown:
            metrics.UNKNOWN_ENTITIES.inc(len(unknown))
        if snapshot is None:
            status = 503
            body = {"detail": "no model is loaded yet; see /readyz", "request_id": request_id}
        elif unknown and policy == "reject":
            status = 404
            ids = [batch.account_ids[i] for i in unknown]
            body = {
                "detail": f"{len(ids)} account(s) have no features in the online store; "
                'nothing was scored (send "unknown": "null" to score the others)',
                "unknown_account_ids": ids[:100],
                "request_id": request_id,
            }
        else:
            try:
                scores = self.scorer.score(snapshot, batch)
            except ModelUnavailable as error:
                status = 503
                body = {"detail": f"the model failed: {error}", "request_id": request_id}
        error_text = None if status == 200 else body["detail"]
        records = self._records(request_id, ts, batch, scores, route, error_text)
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        for record in records:
            record["latency_ms"] = latency_ms
        self.log_writer.write(records)
        seconds = latency_ms / 1000
        if scores is not None:
            self._metrics(batch, scores, seconds)
        if snapshot is not None and snapshot.shadow is not None and scores is not None:
            rows = [i for i, known in enumerate(batch.known) if known]
            if rows:
                self.shadow.submit(ShadowJob(request_id, ts, snapshot.shadow, batch, rows))
        self._count_request(route, status)
        if body is not None:
            if status == 503:
                metrics.ERRORS.labels("", "", "model" if snapshot else "not_ready").inc()
            return _json(status, body)
        answers = {"request_id": request_id, "predictions": self._answers(batch, scores)}
        return _json(200, answers)

    def _records(
        self,
        request_id: str,
        ts: str,
        batch: Batch,
        scores: Any,
        route: str,
        error: str | None,
    ) -> list[dict[str, Any]]:
        names = list(batch.columns)
        columns = [batch.columns[name] for name in names]
        records = []
        for i, account_id in enumerate(batch.account_ids):
            features = {name: column[i] for name, column in zip(names, columns, strict=True)}
            row_error = error
            if scores is not None:
                row_error = scores.error[i] or (None if batch.known[i] else "unknown entity")
            records.append(
                {
                    "record": PREDICTION,
                    "request_id": request_id,
                    "ts": ts,
                    "account_id": account_id,
                    "row": i,
                    "arm": scores.arm[i] if scores else None,
                    "model_version": scores.version[i] if scores else None,
                    "score": scores.score[i] if scores else None,
                    "latency_ms": None,
                    "error": row_error,
                    "fallback_version": scores.fallback_version[i] if scores else None,
                    "cache_hit": scores.cache_hit[i] if scores else False,
                    "feature_event_time": _iso_us(batch.event_us[i]),
                    "features": features,
                    "route": route,
                }
            )
        return records

    def _metrics(self, batch: Batch, scores: Any, seconds: float) -> None:
        counts: dict[tuple[str, str], int] = {}
        for arm, version in zip(scores.arm, scores.version, strict=True):
            if arm is not None:
                counts[(arm, version)] = counts.get((arm, version), 0) + 1
        for (arm, version), count in counts.items():
            self._observe(arm, version, count, seconds)
        now_us = time.time() * 1e6
        for event_us in batch.event_us:
            if event_us is not None:
                metrics.FEATURE_AGE.observe(max(now_us - event_us, 0.0) / 1e6)

    @staticmethod
    def _answers(batch: Batch, scores: Any) -> list[dict[str, Any]]:
        return [
            {
                "account_id": account_id,
                "score": scores.score[i],
                "model_version": scores.fallback_version[i] or scores.version[i],
                "arm": "champion" if scores.fallback_version[i] else scores.arm[i],
                "found": batch.known[i],
                "cache_hit": scores.cache_hit[i],
                "feature_event_time": _iso_us(batch.event_us[i]),
            }
            for i, account_id in enumerate(batch.account_ids)
        ]


def _service(request: Request) -> Service:
    return request.app.state.service


async def _validation_error(request: Request, error: RequestValidationError) -> Response:
    route = _FEATURES if request.url.path.endswith("/features") else _LOOKUP
    return _bad_request(route, error.errors())


def _bad_request(route: str, errors: Any) -> Response:
    """422 for a body of the wrong shape, 400 for one that is not JSON at all."""
    problems = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in errors
    ]
    status = 400 if any(p["type"] == "json_invalid" for p in problems) else 422
    metrics.REQUESTS.labels(route, str(status)).inc()
    metrics.ERRORS.labels("", "", "bad_request").inc()
    message = "the body is not valid JSON" if status == 400 else "the body does not fit the schema"
    return _json(status, {"detail": message, "errors": problems[:20]})


async def _internal_error(request: Request, error: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    metrics.ERRORS.labels("", "", "internal").inc()
    return _json(500, {"detail": f"internal error: {type(error).__name__}"})


def create_app(
    settings: ServeSettings | None = None,
    deployments: Any = None,
    reader: Any = None,
    ready_timeout_s: float = 120.0,
) -> FastAPI:
    """The serving app of one worker.

    Args:
        settings: Serve settings; default `ServeSettings.from_env` (what ``keel serve`` set).
        deployments: A started `keel.serving.deployments.Deployments`; default one on the
            settings' registry, started with the app and stopped with it.
        reader: A `keel.serving.features.ServingFeatureReader`; default one on the settings'
            Feast config.
        ready_timeout_s: How long start-up waits for the first model before accepting traffic
            anyway (requests then get 503 until one is loaded).
    """
    settings = settings or ServeSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from keel.serving.deployments import Deployments
        from keel.serving.features import open_reader

        owned = deployments is None
        active = deployments or Deployments(
            settings.registry_config(),
            poll_seconds=settings.poll_seconds,
            load_model=settings.model_loader(),
        )
        if owned:
            active.start(wait_s=ready_timeout_s)
        store_reader = reader or open_reader(
            settings.resolved_feast_config(), settings.feast_overrides, settings.feature_service
        )
        app.state.deployments = active
        app.state.reader = store_reader
        app.state.keys = KeyStore(settings.resolved_keys_file()) if settings.auth else None
        app.state.service = Service(settings, active, store_reader)
        # Feast, MLflow and pandas leave millions of long-lived objects; a full collection
        # would walk them all in the middle of a request. Frozen, they are never scanned.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            app.state.service.close()
            if owned:
                active.stop()
            metrics.mark_worker_exited(os.getpid())

    app = FastAPI(
        title="Keel serving",
        version="1",
        description="Default-risk scores from the registry's deployed models and Feast features.",
        lifespan=lifespan,
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> Response:
        """200 once a model is loaded and the online store answers; else 503 with reasons."""
        service = _service(request)
        problems = []
        snapshot = service.deployments.current
        if snapshot is None:
            problems.append(f"no model loaded: {getattr(service.deployments, 'last_error', '')}")
        try:
            service.reader.ping()
        except FeatureStoreUnavailable as error:
            problems.append(f"online store unreachable: {error}")
        body = {
            "ready": not problems,
            "models": snapshot.versions() if snapshot else {},
            "canary_share": snapshot.canary_share if snapshot else 0.0,
            "problems": problems,
        }
        return _json(503 if problems else 200, body)

    @app.get("/metrics", tags=["health"], include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render_metrics()
        return Response(body, media_type=content_type)

    # The busiest route reads its body and key itself: FastAPI's body and dependency handling
    # cost more than the rest of the request. The documentation shows the same schema.
    @app.post(
        "/v1/predict",
        tags=["predict"],
        response_model=PredictResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {_JSON: {"schema": PredictRequest.model_json_schema()}},
            },
            "security": [{"APIKeyHeader": []}],
        },
    )
    async def predict(request: Request) -> Response:
        """Score accounts from their newest online features."""
        started = time.perf_counter()
        service = _service(request)
        authorize(request, "predict", request.headers.get(HEADER))
        try:
            body = PredictRequest.model_validate_json(await request.body())
        except ValidationError as error:
            return _bad_request(_LOOKUP, error.errors())
        ids = body.account_ids
        try:
            rows = service.reader.read(ids)
        except FeatureStoreUnavailable as error:
            return _store_down(service, ids, error)
        batch = Batch(list(ids), rows.columns, rows.event_us, rows.known)
        policy = body.unknown or service.settings.unknown_entities
        return service.predict(batch, _LOOKUP, policy, started)

    # The same endpoint as a plain Starlette route, matched before every other: FastAPI's
    # per-request handling (dependency solving, its own context) and the match against the
    # routes in front cost more than the endpoint needs. The route above stays for /docs.
    app.router.routes.insert(
        0, Route("/v1/predict", predict, methods=["POST"], include_in_schema=False)
    )

    @app.post("/v1/predict/features", tags=["predict"], response_model=PredictResponse)
    async def predict_features(
        body: FeaturesRequest,
        request: Request,
        principal: Annotated[Principal, Depends(require_role("predict"))],
    ) -> Response:
        """Score rows of model features given in the request (no feature lookup)."""
        started = time.perf_counter()
        service = _service(request)
        snapshot = service.deployments.current
        if snapshot is None:
            return _json(503, {"detail": "no model is loaded yet; see /readyz"})
        names = snapshot.champion.feature_names
        problems = []
        for n, instance in enumerate(body.instances):
            missing = [name for name in names if name not in instance.features]
            extra = [name for name in instance.features if name not in names]
            mistyped = [
                name
                for name, value in instance.features.items()
                if value is not None
                and name in names
                and isinstance(value, str) != (name in CATEGORICAL_FEATURES)
            ]
            if missing or extra or mistyped:
                problems.append(
                    {"instance": n, "missing": missing, "unexpected": extra, "wrong_type": mistyped}
                )
        if problems:
            metrics.REQUESTS.labels(_FEATURES, "422").inc()
            return _json(
                422,
                {
                    "detail": "instances must carry exactly the model's features, numbers or null, "
                    f"text or null for {list(CATEGORICAL_FEATURES)}: {list(names)}",
                    "errors": problems[:20],
                },
            )
        columns = {name: [i.features[name] for i in body.instances] for name in names}
        batch = Batch(
            [i.account_id for i in body.instances],
            columns,
            [None] * len(body.instances),
            [True] * len(body.instances),
        )
        return service.predict(batch, _FEATURES, "null", started)

    try:
        from keel.serving.admin_routes import router as admin_router
    except ModuleNotFoundError as missing:
        if missing.name != "keel.serving.admin_routes":
            raise
    else:
        app.include_router(admin_router)
    app.include_router(ask_router)
    return app


def _store_down(service: Service, ids: list[int], error: FeatureStoreUnavailable) -> Response:
    """503 for a store that does not answer; the request's lines still reach the log."""
    request_id = uuid.uuid4().hex
    ts = datetime.now(UTC).isoformat()
    detail = f"the online feature store is unreachable: {error}"
    service.log_writer.write(
        {
            "record": PREDICTION,
            "request_id": request_id,
            "ts": ts,
            "account_id": account_id,
            "row": i,
            "arm": None,
            "model_version": None,
            "score": None,
            "latency_ms": None,
            "error": detail,
            "fallback_version": None,
            "cache_hit": False,
            "feature_event_time": None,
            "features": {},
            "route": _LOOKUP,
        }
        for i, account_id in enumerate(ids)
    )
    metrics.REQUESTS.labels(_LOOKUP, "503").inc()
    metrics.ERRORS.labels("", "", "feature_store").inc()
    return _json(503, {"detail": detail, "request_id": request_id}, {"Retry-After": "1"})
