"""The OpenAI-compatible providers against a local HTTP server that speaks the same protocol."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from fastapi import FastAPI

from keel.rag.chunking import Chunk
from keel.rag.embeddings import EmbeddingConfig, EmbeddingError, embedder
from keel.rag.generation import OpenAIChatGenerator, answer_with_guardrails
from keel.rag.index import Hit


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint():
    import uvicorn

    seen: list[dict] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict) -> dict:
        seen.append(body)
        content = "A pipe is a byte stream [2]. Use token: sk-abcdefghijklmnopqrstuvwx here."
        return {
            "choices": [{"message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 321, "completion_tokens": 17},
        }

    @app.post("/v1/embeddings")
    async def embeddings(body: dict) -> dict:
        texts = body["input"]
        return {
            "data": [
                {"index": i, "embedding": [float(len(t)), 1.0, float(i)]}
                for i, t in reversed(list(enumerate(texts)))
            ]
        }

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", seen
    server.should_exit = True
    thread.join(timeout=5)


def _hit(n: int, text: str) -> Hit:
    chunk = Chunk(
        f"man7/pipe.7#{n}-{n + len(text)}", "man7/pipe.7", "pipe(7)", "NAME", n, n + 9, text
    )
    return Hit(chunk, 1.0, 0.8)


def test_chat_endpoint_answers_from_numbered_sources_and_is_guarded(endpoint):
    url, seen = endpoint
    generator = OpenAIChatGenerator(url, "tiny-model")
    hits = [_hit(0, "Pipes have two ends."), _hit(30, "Data is a byte stream.")]
    answer = answer_with_guardrails(generator, "What is a pipe?", hits, min_similarity=0.3)
    prompt = seen[-1]["messages"][-1]["content"]
    assert "[1] pipe(7) / NAME\nPipes have two ends." in prompt
    assert "[2] pipe(7) / NAME\nData is a byte stream." in prompt
    assert [c["n"] for c in answer.citations] == [2]
    assert (answer.prompt_tokens, answer.completion_tokens) == (321, 17)
    assert "sk-abc" not in answer.text and answer.secrets_removed >= 1
    assert answer.provider == "openai/tiny-model"


def test_embeddings_endpoint_vectors_come_back_in_order_and_normalised(endpoint):
    url, _ = endpoint
    model = embedder(EmbeddingConfig(provider="openai", model="tiny-embed", url=url))
    vectors = model.embed(["a", "abcd"])
    assert model.dimension == 3
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    assert vectors[1][0] > vectors[0][0]  # the longer text's first component, in input order
    with pytest.raises(EmbeddingError, match="model folder"):
        embedder(EmbeddingConfig(provider="sentence-transformers", model="/nonexistent"))
