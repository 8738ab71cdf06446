"""Answering questions: the published index, the answer cache, the generator, the ask log.

The engine follows the published index version: when ``published.json`` names another
version, the next question loads it and the cache empties (answers from the old index are
not served for the new one). Every question is logged (one JSON line per question, a file
per day) for the daily monitoring report.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from keel.rag.cache import DEFAULT_SEMANTIC_THRESHOLD, AnswerCache
from keel.rag.embeddings import EmbeddingConfig, embedder
from keel.rag.generation import (
    DEFAULT_MIN_SIMILARITY,
    ExtractiveGenerator,
    Generator,
    OpenAIChatGenerator,
    answer_with_guardrails,
    strip_secrets,
)
from keel.rag.index import Index
from keel.rag.pipeline import PUBLISHED

ASK_LOG_DIRNAME = "ask_log"


class NotPublished(RuntimeError):
    """No index version has passed its gate yet."""


@dataclass(frozen=True)
class EngineSettings:
    """How questions are answered; `from_env` reads the ``KEEL_RAG_*`` variables."""

    store: str
    mode: str = "hybrid"
    min_similarity: float = DEFAULT_MIN_SIMILARITY
    cache_threshold: float = DEFAULT_SEMANTIC_THRESHOLD
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    llm_url: str = ""
    llm_model: str = ""
    llm_api_key_env: str = "KEEL_RAG_LLM_API_KEY"

    @classmethod
    def from_env(cls, store: str) -> EngineSettings:
        """Settings for ``store``; the generator is a chat endpoint when its URL is set."""
        env = os.environ
        return cls(
            store=store,
            mode=env.get("KEEL_RAG_MODE", "hybrid"),
            min_similarity=float(env.get("KEEL_RAG_MIN_SIMILARITY", DEFAULT_MIN_SIMILARITY)),
            cache_threshold=float(env.get("KEEL_RAG_CACHE_THRESHOLD", DEFAULT_SEMANTIC_THRESHOLD)),
            embedding=EmbeddingConfig(
                provider=env.get("KEEL_RAG_EMBEDDINGS", "wordllama"),
                model=env.get("KEEL_RAG_EMBEDDINGS_MODEL", ""),
                url=env.get("KEEL_RAG_EMBEDDINGS_URL", ""),
            ),
            llm_url=env.get("KEEL_RAG_LLM_URL", ""),
            llm_model=env.get("KEEL_RAG_LLM_MODEL", ""),
        )


class RagEngine:
    """Answers questions from the published index of one RAG store."""

    def __init__(self, settings: EngineSettings, log_dir: Path | None = None) -> None:
        self.settings = settings
        self.store = Path(settings.store)
        self.embedder = embedder(settings.embedding)
        self.generator: Generator = (
            OpenAIChatGenerator(
                settings.llm_url,
                settings.llm_model,
                os.environ.get(settings.llm_api_key_env, ""),
            )
            if settings.llm_url
            else ExtractiveGenerator(self.embedder.embed)
        )
        self.cache = AnswerCache(threshold=settings.cache_threshold)
        self.log_dir = log_dir or self.store / ASK_LOG_DIRNAME
        self._index: Index | None = None
        self._published_stamp: tuple[float, int] | None = None
        self._lock = threading.Lock()
        self._log_lock = threading.Lock()

    def index(self) -> Index:
        """The published index, reloaded when the published version changes."""
        path = self.store / PUBLISHED
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise NotPublished(
                f"no index version is published in {self.store}: materialise the rag assets"
            ) from None
        stamp = (stat.st_mtime, stat.st_size)
        with self._lock:
            if self._index is None or stamp != self._published_stamp:
                version = json.loads(path.read_text())["version"]
                if self._index is None or self._index.version != version:
                    index = Index(self.store / "index" / version)
                    if index.manifest["lineage"]["embedding_model_hash"] != (
                        self.embedder.model_hash
                    ):
                        raise NotPublished(
                            f"index {version} was embedded with another model than "
                            f"{self.embedder.name}; rebuild it or configure that model"
                        )
                    self._index = index
                self._published_stamp = stamp
            return self._index

    def ask(self, question: str, k: int = 5, mode: str | None = None) -> dict[str, Any]:
        """Answer one question; the body ``POST /v1/ask`` returns."""
        started = time.perf_counter()
        index = self.index()
        vector = self.embedder.embed([question])[0]
        cached = self.cache.get(index.version, question, vector)
        if cached is not None:
            body, kind = dict(cached[0]), cached[1]
        else:
            hits = index.search(question, vector, k, mode or self.settings.mode)
            answer = answer_with_guardrails(
                self.generator, question, hits, self.settings.min_similarity
            )
            body, kind = answer.as_dict(), "miss"
            if not answer.refused:
                self.cache.put(index.version, question, vector, dict(body))
        body["cache"] = kind
        body["index_version"] = index.version
        body["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        self._log(question, body)
        return body

    def _log(self, question: str, body: dict[str, Any]) -> None:
        now = datetime.now(UTC)
        record = {
            "asked_at": now.isoformat(),
            "question": strip_secrets(question)[0],
            "index_version": body["index_version"],
            "refused": body["refused"],
            "cache": body["cache"],
            "latency_ms": body["latency_ms"],
            "citations": [c["chunk_id"] for c in body["citations"]],
            "tokens": body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"],
        }
        self.log_dir.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record) + "\n"
        with self._log_lock, open(self.log_dir / f"{now:%Y-%m-%d}.jsonl", "a") as handle:
            handle.write(line)


def read_ask_log(log_dir: Path, day: str) -> list[dict[str, Any]]:
    """The questions asked on ``day`` (YYYY-MM-DD); a torn last line is skipped."""
    path = log_dir / f"{day}.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
