"""A bare FastAPI app: one Redis ``HGETALL`` per account, then the LightGBM booster.

What a hand-written service would do with the same data and model, and nothing else: no
auth, no routing, no cache, no log, no metrics. It decodes Feast's stored values, computes the
on-demand ratios and encodes the categories as the model's encoder does, so that its scores
equal ``keel serve``'s. Configured by environment variables (``BENCH_BARE_*``), started by
``bench/serve.py`` as ``uvicorn bench.serve_baseline.app:app``.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import orjson
import redis
from fastapi import FastAPI, Request, Response
from feast.infra.online_stores.helpers import _mmh3
from feast.protos.feast.types.Value_pb2 import Value
from feast.type_map import feast_value_type_to_python_type

from keel.features import account_ratios
from keel.training import load_model_folder

_MODEL = load_model_folder(os.environ["BENCH_BARE_MODEL_DIR"])
_BOOSTER, _OFFSET = _MODEL.booster, _MODEL.logit_offset
_NUMERIC = _MODEL.encoder.numeric
_CATEGORIES = [
    (name, {value: code for code, value in enumerate(vocabulary, start=1)})
    for name, vocabulary in _MODEL.encoder.categories
]
_VIEW = os.environ.get("BENCH_BARE_VIEW", "account_daily_fv")
_KEY_PREFIX = bytes.fromhex(os.environ["BENCH_BARE_KEY_PREFIX"])
_PROJECT = os.environ["BENCH_BARE_PROJECT"].encode()
_host, _port = os.environ.get("BENCH_BARE_REDIS", "127.0.0.1:6379").split(":")
_REDIS = redis.Redis(host=_host, port=int(_port))
_FIELDS = {
    _mmh3(f"{_VIEW}:{name}"): name
    for name in (*_NUMERIC, *(name for name, _ in _CATEGORIES))
    if name not in ("payment_to_spend_30d", "spend_trend_7d_vs_30d", "balance_to_limit")
}

app = FastAPI()


def _features(account_id: int) -> dict:
    stored = _REDIS.hgetall(_KEY_PREFIX + struct.pack("<q", account_id) + _PROJECT)
    values = {
        _FIELDS[field]: feast_value_type_to_python_type(Value.FromString(raw))
        for field, raw in stored.items()
        if field in _FIELDS
    }
    ratios = account_ratios(
        {
            name: [values.get(name)]
            for name in ("payments_30d", "spend_30d", "spend_7d", "balance", "credit_limit")
        }
    )
    values.update({name: float(column[0]) for name, column in ratios.items()})
    return values


@app.post("/v1/predict")
async def predict(request: Request) -> Response:
    account_ids = orjson.loads(await request.body())["account_ids"]
    rows = [_features(int(account_id)) for account_id in account_ids]
    matrix = np.empty((len(rows), len(_NUMERIC) + len(_CATEGORIES)))
    for i, values in enumerate(rows):
        matrix[i, : len(_NUMERIC)] = [values.get(name) for name in _NUMERIC]
        matrix[i, len(_NUMERIC) :] = [codes.get(values.get(name), 0) for name, codes in _CATEGORIES]
    numbers = matrix[:, : len(_NUMERIC)]
    numbers[np.isinf(numbers)] = np.nan
    raw = _BOOSTER.predict(matrix, raw_score=True, num_threads=1)
    scores = 0.5 * (1.0 + np.tanh(0.5 * (raw - _OFFSET)))
    return Response(
        orjson.dumps({"account_ids": account_ids, "scores": scores.tolist()}),
        media_type="application/json",
    )
