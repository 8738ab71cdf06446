"""The serving app against real stores and a real registry: features, scores, log, auth, cache.

The app runs in-process (Starlette's TestClient) on a world from ``tests/serving_support.py``:
Feast applied and materialised on SQLite or the local Redis, two registered LightGBM models.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from keel import schema
from keel.serving.app import create_app
from keel.serving.auth import KeyStore
from keel.serving.deployments import Deployments, LoadedModel, load_registered_model
from keel.serving.features import ServingFeatureReader
from keel.serving.prediction_log import COLUMNS, read_prediction_log
from tests.serving_support import (  # noqa: F401 (fixtures)
    APPROVER,
    free_port,
    fresh_world,
    keel_home_env,
    metric_value,
    serving_world,
    serving_world_redis,
)

JSON = {"content-type": "application/json"}


@contextmanager
def client_for(world, deployments=None, **settings) -> Iterator[TestClient]:
    """A TestClient on a started app of ``world``, with KEEL_HOME at the world's home."""
    with keel_home_env(world.home):
        app = create_app(world.serve_settings(**settings), deployments=deployments)
        with TestClient(app) as client:
            yield client


def add_key(world, *roles: str, owner: str = "alice") -> dict[str, str]:
    key = KeyStore(world.serve_settings().resolved_keys_file()).add(owner, list(roles))
    return {"X-API-Key": key}


def online_features(store, ids: list[int]) -> dict[str, list]:
    service = store.get_feature_service(schema.FEATURE_SERVICE)
    rows = [{schema.ENTITY_KEY: account_id} for account_id in ids]
    return store.get_online_features(features=service, entity_rows=rows).to_dict()


def champion_model(world) -> LoadedModel:
    config = world.registry_config()
    return LoadedModel(world.champion, "champion", load_registered_model(config, world.champion))


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_served_features_and_scores_equal_feasts_online_features(backend, request):
    world = request.getfixturevalue(
        "serving_world" if backend == "sqlite" else "serving_world_redis"
    )
    import pandas as pd

    store = world.open_store()
    ids = [*world.account_ids[::3], world.account_ids[0]]  # a duplicate, too
    expected = online_features(store, ids)
    reader = ServingFeatureReader(store, schema.FEATURE_SERVICE)
    served = reader.read(ids)
    assert served.columns == {k: v for k, v in expected.items() if k != schema.ENTITY_KEY}
    assert all(served.known) and len(set(served.event_us)) == 1
    for n in range(5):  # one entity takes the single-key path (on Redis, its own connection)
        single = reader.read([ids[n]])
        assert single.columns == {k: [v[n]] for k, v in served.columns.items()}
        assert single.event_us == [served.event_us[n]] and single.known == [True]

    headers = add_key(world, "predict")
    with client_for(world) as client:
        response = client.post("/v1/predict", json={"account_ids": ids}, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        service = client.app.state.service
    frame = pd.DataFrame({k: v for k, v in expected.items() if k != schema.ENTITY_KEY})
    scores = champion_model(world).predict(frame[list(champion_model(world).feature_names)])
    answers = body["predictions"]
    assert [a["account_id"] for a in answers] == ids
    # The column scorer gives the model's own numbers, bit for bit.
    assert [a["score"] for a in answers] == scores.tolist()
    assert {a["model_version"] for a in answers} == {world.champion}
    assert {a["arm"] for a in answers} == {"champion"}

    logged = read_prediction_log(service.settings.resolved_log_dir())
    rows = logged[logged["request_id"] == body["request_id"]].sort_values("row")
    assert list(logged.columns) == list(COLUMNS)
    assert rows["account_id"].tolist() == ids
    assert rows["score"].tolist() == scores.tolist()
    for i, features in enumerate(rows["features"]):
        assert features == {k: v[i] for k, v in expected.items() if k != schema.ENTITY_KEY}
    assert rows["latency_ms"].gt(0).all() and rows["error"].isna().all()


def test_bad_input_gets_a_clear_4xx_and_the_worker_keeps_serving(serving_world):  # noqa: F811
    world = serving_world
    headers = {**add_key(world, "predict"), **JSON}
    unknown = world.account_ids[0] + 5  # ids are multiples of ten
    cases = [
        (b'{"account_ids": [10,', 400, "not valid JSON"),
        (b'{"account_ids": ["ten"]}', 422, "valid integer"),
        (b'{"account_ids": [1.5]}', 422, "valid integer"),
        (b'{"account_ids": []}', 422, "at least 1"),
        (b'{"account_ids": [-3]}', 422, "greater than or equal"),
        (b'{"account_ids": [10], "colour": "red"}', 422, "Extra inputs"),
        (b"[10, 20]", 422, "should be an object"),
        (b'{"account_ids": [' + b",".join([b"10"] * 1001) + b"]}", 422, "at most 1000"),
    ]
    with client_for(world) as client:
        for body, status, text in cases:
            response = client.post("/v1/predict", content=body, headers=headers)
            assert response.status_code == status, (body[:40], response.text)
            assert text in response.text, response.text
        rejected = client.post("/v1/predict", json={"account_ids": [10, unknown]}, headers=headers)
        assert rejected.status_code == 404
        assert rejected.json()["unknown_account_ids"] == [unknown]
        partial = client.post(
            "/v1/predict", json={"account_ids": [10, unknown], "unknown": "null"}, headers=headers
        )
        assert partial.status_code == 200
        first, second = partial.json()["predictions"]
        assert first["found"] and first["score"] is not None
        assert not second["found"] and second["score"] is None and second["arm"] is None

        model = champion_model(world)
        features = online_features(world.open_store(), [10])
        row = {name: features[name][0] for name in model.feature_names}
        good = client.post(
            "/v1/predict/features", json={"instances": [{"features": row}]}, headers=headers
        )
        assert good.status_code == 200, good.text
        assert (
            good.json()["predictions"][0]["score"]
            == client.post("/v1/predict", json={"account_ids": [10]}, headers=headers).json()[
                "predictions"
            ][0]["score"]
        )
        missing = {k: v for k, v in row.items() if k != "balance"}
        wrong = {**row, "product": 3.0, "spend_7d": "lots"}
        for instance, field in (
            ({"features": missing}, "missing"),
            ({"features": wrong}, "wrong_type"),
        ):
            response = client.post(
                "/v1/predict/features", json={"instances": [instance]}, headers=headers
            )
            assert response.status_code == 422 and response.json()["errors"][0][field], (
                response.text
            )
        assert (
            client.post("/v1/predict", json={"account_ids": [10]}, headers=headers).status_code
            == 200
        )
        log_dir = client.app.state.service.settings.resolved_log_dir()
        docs = client.get("/openapi.json").json()
        predict_doc = docs["paths"]["/v1/predict"]["post"]
        schema_doc = predict_doc["requestBody"]["content"]["application/json"]["schema"]
        assert schema_doc["properties"]["account_ids"]["maxItems"] == 1000
        assert predict_doc["security"] == [{"APIKeyHeader": []}]
        assert "APIKeyHeader" in docs["components"]["securitySchemes"]
        assert client.get("/docs").status_code == 200
    logged = read_prediction_log(log_dir)
    rejected_rows = logged[logged["request_id"] == rejected.json()["request_id"]]
    assert len(rejected_rows) == 2 and rejected_rows["score"].isna().all()
    assert rejected_rows["error"].str.contains("no features").all()


def test_keys_are_hashed_and_roles_give_401_and_403(serving_world):  # noqa: F811
    world = serving_world
    predict, deploy = add_key(world, "predict"), add_key(world, "deploy", owner="bob")
    admin = add_key(world, "admin", owner="carol")
    keys_file = world.serve_settings().resolved_keys_file()
    assert predict["X-API-Key"].encode() not in keys_file.read_bytes()
    body = {"account_ids": [10]}
    with client_for(world) as client:
        assert client.post("/v1/predict", json=body).status_code == 401
        assert (
            client.post("/v1/predict", json=body, headers={"X-API-Key": "keel_x_y"}).status_code
            == 401
        )
        assert client.post("/v1/predict", json=body, headers=predict).status_code == 200
        assert client.post("/v1/predict", json=body, headers=deploy).status_code == 403
        assert client.post("/v1/predict", json=body, headers=admin).status_code == 200
        assert client.get("/v1/admin/release", headers=predict).status_code == 403
        assert client.get("/v1/admin/release", headers=deploy).status_code == 200
        keys = client.app.state.keys
        keys.cache_seconds = 0.0
        key_id = predict["X-API-Key"].split("_")[1]
        KeyStore(keys_file).revoke(key_id)
        assert client.post("/v1/predict", json=body, headers=predict).status_code == 401
        assert client.get("/healthz").status_code == 200  # health needs no key


def test_cache_hits_then_misses_for_a_new_model_and_newer_features(fresh_world):  # noqa: F811
    from keel.registry import ModelRegistry

    world = fresh_world
    headers = add_key(world, "predict")
    ids = world.account_ids[:20]

    def predict(client):
        answers = client.post("/v1/predict", json={"account_ids": ids}, headers=headers).json()
        return answers["predictions"]

    with client_for(world, poll_seconds=0.2) as client:
        first, second = predict(client), predict(client)
        assert not any(a["cache_hit"] for a in first) and all(a["cache_hit"] for a in second)
        assert [a["score"] for a in first] == [a["score"] for a in second]
        text = client.get("/metrics").text
        assert metric_value(text, "keel_serve_cache_hits_total") >= len(ids)
        assert metric_value(text, "keel_serve_cache_saved_seconds_total") > 0

        with ModelRegistry(world.registry_config()) as registry:
            registry.promote(world.challenger, actor=APPROVER, reason="cache test")
        deadline = time.monotonic() + 30
        while client.app.state.deployments.current.champion.version != world.challenger:
            assert time.monotonic() < deadline, "the new champion was not picked up"
            time.sleep(0.1)
        third = predict(client)
        assert not any(a["cache_hit"] for a in third)
        assert {a["model_version"] for a in third} == {world.challenger}
        assert len(client.app.state.service.cache) == len(ids)  # the old version's entries went

        world.materialise(world.days[1])
        fourth = predict(client)
        assert not any(a["cache_hit"] for a in fourth)
        assert {a["feature_event_time"] for a in fourth} != {a["feature_event_time"] for a in third}
        assert all(a["cache_hit"] for a in predict(client))


def test_canary_errors_fall_back_to_the_champion_and_the_shadow_is_logged(fresh_world):  # noqa: F811
    import pandas as pd

    from keel.serving.release import set_shadow, start_canary

    world = fresh_world
    config = world.registry_config()

    class FailsOnSmallLimits:
        """The challenger, failing whenever a row has the smallest credit limit."""

        def __init__(self, model):
            self.model, self.family = model, model.family
            self.feature_names = model.feature_names

        def predict_proba(self, frame):
            if (frame["credit_limit"] == 1_000.0).any():
                raise ValueError("simulated canary failure")
            return self.model.predict_proba(frame)

    def load(version):
        model = load_registered_model(config, version)
        return FailsOnSmallLimits(model) if version == world.challenger else model

    from keel.registry import ModelRegistry

    with ModelRegistry(config) as registry:
        start_canary(registry, world.challenger, actor=APPROVER, share=0.5)
        set_shadow(registry, world.challenger, actor=APPROVER)
    deployments = Deployments(config, poll_seconds=0.2, load_model=load).start(wait_s=60)
    headers = add_key(world, "predict")
    store = world.open_store()
    try:
        assert deployments.current.canary is not None and deployments.current.shadow is not None
        with client_for(world, deployments=deployments) as client:
            answers = {}
            for account_id in world.account_ids[:120]:
                response = client.post(
                    "/v1/predict", json={"account_ids": [account_id]}, headers=headers
                )
                assert response.status_code == 200, response.text  # the client never sees a failure
                answers[account_id] = response.json()
            log_dir = client.app.state.service.settings.resolved_log_dir()
    finally:
        deployments.stop()
    snapshot = deployments.current
    logged = read_prediction_log(log_dir).set_index("request_id")
    features = online_features(store, world.account_ids[:120])
    failing = {
        a
        for a, limit in zip(features[schema.ENTITY_KEY], features["credit_limit"], strict=True)
        if limit == 1_000.0
    }
    arms = {account_id: snapshot.arm_for(account_id) for account_id in answers}
    assert 20 < sum(arm == "canary" for arm in arms.values()) < 100
    fallbacks = 0
    for account_id, body in answers.items():
        row = logged.loc[body["request_id"]]
        answer = body["predictions"][0]
        assert row["arm"] == arms[account_id]
        if arms[account_id] == "canary" and account_id in failing:
            fallbacks += 1
            assert answer["model_version"] == world.champion and answer["arm"] == "champion"
            assert "simulated canary failure" in row["error"]
            assert row["fallback_version"] == world.champion
            assert row["model_version"] == world.challenger
        else:
            assert (
                answer["model_version"]
                == row["model_version"]
                == (world.challenger if arms[account_id] == "canary" else world.champion)
            )
            assert row["error"] is None
        assert row["shadow_version"] == world.challenger
        if account_id in failing:
            assert "simulated canary failure" in row["shadow_error"]
            assert pd.isna(row["shadow_score"])
        else:
            assert 0 < row["shadow_score"] < 1 and row["shadow_error"] is None
            if arms[account_id] == "canary":
                assert row["shadow_score"] == row["score"]
    assert fallbacks > 0


def test_shadow_scores_equal_its_models_own_with_or_without_the_served_matrix(
    serving_world,  # noqa: F811
    tmp_path,
):
    import asyncio

    import orjson
    import pandas as pd

    from keel.serving.cache import PredictionCache
    from keel.serving.deployments import Snapshot
    from keel.serving.prediction_log import PredictionLogWriter
    from keel.serving.scoring import Batch, Scorer, ShadowJob, ShadowRunner, fast_model

    world = serving_world
    config = world.registry_config()
    champion = champion_model(world)
    shadow = LoadedModel(
        world.challenger, "shadow", load_registered_model(config, world.challenger)
    )
    snapshot = Snapshot(champion=champion, shadow=shadow)
    store = world.open_store()
    reader = ServingFeatureReader(store, schema.FEATURE_SERVICE)
    scorer, writer = Scorer(PredictionCache(1_000)), PredictionLogWriter(tmp_path)
    runner = ShadowRunner(writer, max_pending=1_000)
    fast = fast_model(shadow)
    assert fast.layout == fast_model(champion).layout  # same schema and vocabularies
    built = []
    design = fast.design
    fast.design = lambda columns, rows: built.append(len(rows)) or design(columns, rows)
    ids = world.account_ids[:40]

    async def serve(requests: list[list[int]], prefix: str) -> None:
        for n, accounts in enumerate(requests):
            rows = reader.read(accounts)
            batch = Batch(list(accounts), rows.columns, rows.event_us, rows.known)
            scorer.score(snapshot, batch)
            rows_of = list(range(len(accounts)))
            assert runner.submit(ShadowJob(f"{prefix}{n}", "ts", shadow, batch, rows_of))
        runner.flush()

    # Scored by the champion just now: the shadow scores the matrix the champion built.
    asyncio.run(serve([ids[:1], ids[1:4], ids[4:40]], "a"))
    assert built == []
    # One account again, answered from the cache: the shadow builds its own matrix.
    asyncio.run(serve([ids[1:2], ids[:3]], "b"))
    assert built == [4]
    writer.close()
    lines = [orjson.loads(line) for line in writer.path.read_bytes().splitlines()]
    frame = pd.DataFrame({k: v for k, v in online_features(store, ids).items()})
    scores = shadow.predict(frame[list(shadow.feature_names)]).tolist()
    expected = dict(zip(ids, scores, strict=True))
    assert len(lines) == 44 and all(line["shadow_error"] is None for line in lines)
    assert all(line["shadow_score"] == expected[line["account_id"]] for line in lines)


def test_store_down_answers_503_and_recovers(serving_world_redis, tmp_path):  # noqa: F811
    """A private Redis server holding the world's keys is stopped under the app, then restarted."""
    import redis

    world = serving_world_redis
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()

    def start():
        process = subprocess.Popen(
            [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                client.ping()
                return process, client
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    process, private = start()
    shared = redis.Redis(host="127.0.0.1", port=6379)
    keys = list(shared.scan_iter(match=b"*" + world.project.encode(), count=1000))
    for key in keys:
        private.restore(key, 0, shared.dump(key), replace=True)
    overrides = {
        **world.feast_overrides,
        "online_store": {
            **world.feast_overrides["online_store"],
            "connection_string": f"127.0.0.1:{port}",
        },
    }
    headers = add_key(world, "predict")
    body = {"account_ids": world.account_ids[:5]}
    one = {"account_ids": world.account_ids[:1]}  # one account: the reader's own connection
    try:
        with client_for(world, feast_overrides=overrides) as client:
            assert client.post("/v1/predict", json=body, headers=headers).status_code == 200
            assert client.post("/v1/predict", json=one, headers=headers).status_code == 200
            process.terminate()
            process.wait(timeout=10)
            assert client.post("/v1/predict", json=one, headers=headers).status_code == 503
            down = client.post("/v1/predict", json=body, headers=headers)
            assert down.status_code == 503, down.text
            assert "online feature store is unreachable" in down.json()["detail"]
            assert down.headers["retry-after"] == "1"
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "online store unreachable" in ready.text
            process, private = start()
            for key in keys:
                private.restore(key, 0, shared.dump(key), replace=True)
            assert client.post("/v1/predict", json=body, headers=headers).status_code == 200
            assert client.post("/v1/predict", json=one, headers=headers).status_code == 200
            assert client.get("/readyz").status_code == 200
            text = client.get("/metrics").text
            assert (
                metric_value(text, "keel_serve_requests_total", route="lookup", status="503") >= 1
            )
            log_dir = client.app.state.service.settings.resolved_log_dir()
    finally:
        process.terminate()
        process.wait(timeout=10)
    logged = read_prediction_log(log_dir)
    assert logged.loc[logged["request_id"] == down.json()["request_id"], "error"].str.contains(
        "unreachable"
    ).sum() == len(body["account_ids"])


def test_metrics_count_requests_predictions_latency_and_feature_age(serving_world):  # noqa: F811
    world = serving_world
    headers = add_key(world, "predict")
    with client_for(world) as client:
        before = client.get("/metrics").text
        for account_id in world.account_ids[:7]:
            client.post(
                "/v1/predict", json={"account_ids": [account_id, account_id + 10]}, headers=headers
            )
        client.post("/v1/predict", json={"account_ids": "all"}, headers=headers)
        after = client.get("/metrics").text
        ready = client.get("/readyz").json()
    labels = {"arm": "champion", "version": world.champion}

    def moved(name, **extra):
        return metric_value(after, name, **extra) - metric_value(before, name, **extra)

    assert moved("keel_serve_requests_total", route="lookup", status="200") == 7
    assert moved("keel_serve_requests_total", route="lookup", status="422") == 1
    assert moved("keel_serve_predictions_total", **labels) == 14
    assert moved("keel_serve_latency_seconds_count", **labels) == 7
    assert moved("keel_serve_latency_seconds_sum", **labels) > 0
    assert moved("keel_serve_feature_age_seconds_count") == 14
    assert moved("keel_serve_errors_total", arm="", version="", kind="bad_request") == 1
    assert "keel_serve_guardrail_state" in after
    assert ready == {
        "ready": True,
        "models": {"champion": world.champion},
        "canary_share": 0.0,
        "problems": [],
    }
    assert not math.isnan(metric_value(after, "keel_serve_model_loaded", **labels))


def test_log_reader_filters_by_time_joins_shadows_and_skips_a_torn_line(tmp_path):
    from keel.serving.prediction_log import PREDICTION, SHADOW, PredictionLogWriter

    writer = PredictionLogWriter(tmp_path, rotate_bytes=300)  # a new file every line or two
    from datetime import UTC, datetime, timedelta

    start = datetime.now(UTC) - timedelta(seconds=5)  # requests arrive before their lines
    stamps = [(start + timedelta(milliseconds=10 * n)).isoformat() for n in range(5)]
    for n, ts in enumerate(stamps):
        writer.write(
            [
                {
                    "record": PREDICTION,
                    "request_id": f"r{n}",
                    "ts": ts,
                    "account_id": n,
                    "row": 0,
                    "arm": "champion",
                    "score": n / 10,
                    "features": {"spend_7d": float(n)},
                }
            ]
        )
    writer.write(
        [
            {
                "record": SHADOW,
                "request_id": "r2",
                "ts": stamps[2],
                "account_id": 2,
                "row": 0,
                "shadow_version": "2",
                "shadow_score": 0.5,
                "shadow_latency_ms": 1.0,
                "shadow_error": None,
            }
        ]
    )
    writer.close()
    assert len(list(tmp_path.glob("*.jsonl"))) >= 3
    with open(writer.path, "ab") as torn:  # a worker killed in the middle of a write
        torn.write(b'{"record": "prediction", "request_id": "r9", "ts": "2026-01')
    frame = read_prediction_log(tmp_path, since=stamps[1], until=datetime.fromisoformat(stamps[4]))
    assert frame["request_id"].tolist() == ["r1", "r2", "r3"]
    assert frame["shadow_score"].tolist()[1] == 0.5 and frame["features"].tolist()[0] == {
        "spend_7d": 1.0
    }
    assert str(frame["ts"].dt.tz) == "UTC" and list(frame.columns) == list(COLUMNS)
    assert read_prediction_log(tmp_path / "missing").empty


def test_keys_cli_prints_a_key_once_lists_and_revokes_it(keel_home):
    from click.testing import CliRunner

    from keel.cli import cli
    from keel.serving.settings import default_keys_file

    runner = CliRunner()
    added = runner.invoke(cli, ["serve", "keys", "add", "--owner", "dana", "--role", "deploy"])
    assert added.exit_code == 0, added.output
    key = added.output.strip()
    assert key.startswith("keel_") and key.encode() not in default_keys_file().read_bytes()
    principal = KeyStore(default_keys_file()).check(key)
    assert principal.owner == "dana" and principal.roles == frozenset({"deploy"})
    listed = runner.invoke(cli, ["serve", "keys", "list"]).output
    key_id = key.split("_")[1]
    assert key_id in listed and "dana" in listed and "active" in listed and key not in listed
    assert runner.invoke(cli, ["serve", "keys", "revoke", key_id]).exit_code == 0
    assert KeyStore(default_keys_file()).check(key) is None
    assert runner.invoke(cli, ["serve", "keys", "revoke", key_id]).exit_code == 1
    wrong = runner.invoke(cli, ["serve", "keys", "add", "--owner", "x", "--role", "root"])
    assert wrong.exit_code == 2 and "root" in wrong.output
