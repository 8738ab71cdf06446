"""The serverless function: ``handler(event, context)`` with the AWS Lambda signature.

API Gateway (REST or HTTP API, proxy integration) sends the request body as a JSON string in
``event["body"]`` (base64 when ``isBase64Encoded``); a direct invocation sends the payload
itself. Either way the payload is ``{"rows": [{feature: value, ...}, ...]}`` and the answer
is an API Gateway proxy response whose body is ``{"scores": [...], "model": {...},
"variant": ..., "cold_start": {...} or null}``.

Settings come from the function's environment: ``KEEL_BUNDLE_DIR`` (default ``bundle`` next
to this package, which is where the container image puts it), ``KEEL_BUNDLE_VARIANT`` (empty:
the manifest's default), ``KEEL_BUNDLE_SHA256`` (the manifest's sha256 from the registry, to
refuse any other bundle) and ``KEEL_EDGE_THREADS`` (1).

The bundle loads on the first invocation; that invocation reports the cold start: the package
import, the load (hash checks, session) and the first prediction, in seconds.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from keel_edge import IMPORT_STARTED
from keel_edge.bundle import Bundle
from keel_edge.contract import ContractError

IMPORT_SECONDS = time.perf_counter() - IMPORT_STARTED
DEFAULT_BUNDLE_DIR = Path(__file__).resolve().parent.parent / "bundle"
MAX_ROWS = 10_000

_bundle: Bundle | None = None
_cold_start: dict[str, float] | None = None


def _response(status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {"Content-Type": "application/json"},
        "isBase64Encoded": False,
        "body": json.dumps(body),
    }


class _BadRequest(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _payload(event: Any) -> dict[str, Any]:
    if not isinstance(event, dict):
        raise _BadRequest(400, "the event must be a JSON object")
    if "body" not in event:
        return event  # direct invocation: the event is the payload
    body = event["body"]
    if body is None:
        raise _BadRequest(400, 'the request has no body; send {"rows": [...]}')
    try:
        if event.get("isBase64Encoded"):
            body = base64.b64decode(body)
        payload = json.loads(body)
    except (ValueError, TypeError) as error:
        raise _BadRequest(400, f"the body is not JSON: {error}") from error
    if not isinstance(payload, dict):
        raise _BadRequest(400, 'the body must be a JSON object {"rows": [...]}')
    return payload


def _rows(payload: dict[str, Any]) -> list[dict[str, Any]]:
    rows = payload.get("rows")
    if not isinstance(rows, list) or not rows:
        raise _BadRequest(400, 'the payload needs "rows": a non-empty list of feature objects')
    if len(rows) > MAX_ROWS:
        raise _BadRequest(413, f"{len(rows)} rows in one request; send at most {MAX_ROWS}")
    return rows


def load_from_environment() -> Bundle:
    """The bundle the function's environment names."""
    return Bundle(
        os.environ.get("KEEL_BUNDLE_DIR", "") or DEFAULT_BUNDLE_DIR,
        variant=os.environ.get("KEEL_BUNDLE_VARIANT", ""),
        threads=int(os.environ.get("KEEL_EDGE_THREADS", "1")),
        expected_manifest_sha256=os.environ.get("KEEL_BUNDLE_SHA256", ""),
    )


def handler(event: Any, context: Any) -> dict[str, Any]:
    """Score the rows of one request with the bundle (AWS Lambda entry point)."""
    global _bundle, _cold_start
    try:
        rows = _rows(_payload(event))
    except _BadRequest as error:
        return _response(error.status, {"error": str(error)})
    try:
        if _bundle is None:
            started = time.perf_counter()
            _bundle = load_from_environment()
            _cold_start = {"import_s": IMPORT_SECONDS, "load_s": time.perf_counter() - started}
        started = time.perf_counter()
        scores = _bundle.predict(rows)
        if not all(math.isfinite(score) for score in scores):
            raise ValueError("the graph returned non-finite scores")
    except ContractError as error:
        return _response(400, {"error": str(error)})
    except (RuntimeError, OSError, ValueError) as error:
        # BundleIntegrityError, onnxruntime's own failures, an unreadable manifest.
        return _response(500, {"error": f"the model bundle cannot score: {error}"})
    cold_start = None
    if _cold_start is not None:
        # Reported once, by the first invocation that scored.
        cold_start = {**_cold_start, "first_prediction_s": time.perf_counter() - started}
        cold_start["total_s"] = sum(cold_start.values())
        _cold_start = None
    bundle = _bundle
    return _response(
        200,
        {
            "scores": [float(score) for score in scores],
            "model": bundle.model,
            "variant": bundle.variant,
            "request_id": getattr(context, "aws_request_id", None),
            "cold_start": cold_start,
        },
    )
