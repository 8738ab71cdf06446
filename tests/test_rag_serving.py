"""POST /v1/ask: API keys, cited answers, refusals, the cache, the ask log, 503 at first."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from keel.rag.corpus import SLICE_DIR, load_corpus
from keel.rag.engine import ASK_LOG_DIRNAME, read_ask_log
from keel.rag.pipeline import build_version, publish
from keel.rag.routes import STORE_ENV, router
from keel.serving.auth import HEADER, KeyStore


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "rag"))
    app = FastAPI()
    app.state.keys = KeyStore(tmp_path / "keys.db")
    app.include_router(router)
    with TestClient(app) as test_client:
        test_client.keys = {
            "predict": app.state.keys.add("asker", ["predict"]),
            "deploy": app.state.keys.add("deployer", ["deploy"]),
        }
        yield test_client


def _ask(client, question: str, role: str = "predict"):
    return client.post("/v1/ask", json={"question": question}, headers={HEADER: client.keys[role]})


def test_ask_needs_a_published_index_and_a_predict_key(client, tmp_path):
    from keel.rag.embeddings import embedder

    assert client.post("/v1/ask", json={"question": "What is a pipe?"}).status_code == 401
    assert _ask(client, "What is a pipe?", "deploy").status_code == 403
    waiting = _ask(client, "What is a pipe?")
    assert waiting.status_code == 503 and "no index version is published" in waiting.text
    assert (
        client.post(
            "/v1/ask", json={"question": ""}, headers={HEADER: client.keys["predict"]}
        ).status_code
        == 422
    )

    store = tmp_path / "rag"
    manifest = build_version(store, load_corpus(SLICE_DIR), embedder())
    publish(store, {"version": manifest["version"]})
    question = "Which signals cannot be caught, blocked or ignored?"
    first = _ask(client, question)
    assert first.status_code == 200, first.text
    body = first.json()
    assert not body["refused"] and body["cache"] == "miss"
    assert body["index_version"] == manifest["version"]
    citation = body["citations"][0]
    assert citation["doc_id"] == "man7/signal.7"
    page = next(d for d in load_corpus(SLICE_DIR) if d.doc_id == citation["doc_id"])
    assert citation["end"] > citation["start"] and page.text[citation["start"] : citation["end"]]
    assert f"[{citation['n']}]" in body["answer"]
    second = _ask(client, question).json()
    assert second["cache"] == "exact" and second["answer"] == body["answer"]
    refused = _ask(client, "How do I bake sourdough bread?").json()
    assert refused["refused"] and not refused["citations"]
    leaked = _ask(client, "Is password=hunter2secret safe to put in a pipe?").json()
    assert "hunter2secret" not in str(leaked)

    from datetime import UTC, datetime

    log = read_ask_log(store / ASK_LOG_DIRNAME, datetime.now(UTC).strftime("%Y-%m-%d"))
    assert [r["cache"] for r in log] == ["miss", "exact", "miss", "miss"]
    assert [r["refused"] for r in log][:3] == [False, False, True]
    assert "hunter2secret" not in str(log) and "[removed]" in log[-1]["question"]
    assert REGISTRY.get_sample_value("keel_rag_cache_lookups_total", {"result": "exact"}) >= 1


def test_keel_serve_has_the_ask_route(keel_home):
    from keel.serving.app import create_app

    paths = create_app().openapi()["paths"]
    assert "post" in paths["/v1/ask"] and "/v1/predict" in paths
