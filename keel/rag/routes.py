"""``POST /v1/ask`` for ``keel serve``: retrieval, a cited answer, the answer cache.

The same API keys (role ``predict``) and request counter as ``/v1/predict``; each question
goes to the ask log that the daily RAG report reads. The engine is built on the first
question and follows the published index from then on.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from keel.serving import metrics
from keel.serving.auth import Principal, require_role

ROUTE = "/v1/ask"
STORE_ENV = "KEEL_RAG_STORE"
ANSWERS = Counter("keel_rag_answers", "Questions answered or refused.", ["outcome"])
CACHE = Counter("keel_rag_cache_lookups", "Answer cache lookups by result.", ["result"])
TOKENS_SAVED = Counter("keel_rag_tokens_saved", "Tokens not generated thanks to the cache.")

router = APIRouter(tags=["ask"])
_engine_lock = threading.Lock()


class AskRequest(BaseModel):
    """A question about the indexed documents."""

    question: str = Field(min_length=3, max_length=2000)
    k: int = Field(default=5, ge=1, le=20, description="Chunks to retrieve.")
    mode: Literal["vector", "bm25", "hybrid"] | None = None


def default_store() -> Path:
    """The RAG folder of this data folder (``$KEEL_HOME/artefacts/rag``) or ``KEEL_RAG_STORE``."""
    from keel.settings import KeelPaths

    configured = os.environ.get(STORE_ENV)
    return Path(configured) if configured else KeelPaths.current().artefacts / "rag"


def engine_of(request: Request):  # -> keel.rag.engine.RagEngine
    """The app's engine, built on first use (WordLlama and faiss load in about a second)."""
    state = request.app.state
    with _engine_lock:
        if getattr(state, "rag_engine", None) is None:
            from keel.rag.engine import EngineSettings, RagEngine

            state.rag_engine = RagEngine(EngineSettings.from_env(str(default_store())))
        return state.rag_engine


def _answer(request: Request, body: AskRequest) -> tuple[int, dict[str, Any]]:
    from keel.rag.engine import NotPublished

    try:
        engine = engine_of(request)
        answer = engine.ask(body.question, body.k, body.mode)
    except NotPublished as error:
        return 503, {"detail": str(error)}
    ANSWERS.labels("refused" if answer["refused"] else "answered").inc()
    CACHE.labels(answer["cache"]).inc()
    if answer["cache"] != "miss":
        usage = answer["usage"]
        TOKENS_SAVED.inc(usage["prompt_tokens"] + usage["completion_tokens"])
    return 200, answer


@router.post(ROUTE)
async def ask(
    body: AskRequest,
    request: Request,
    principal: Annotated[Principal, Depends(require_role("predict"))],
) -> JSONResponse:
    """Answer a question from the published index, citing the chunks the answer came from."""
    status, payload = await run_in_threadpool(_answer, request, body)
    metrics.REQUESTS.labels(ROUTE, str(status)).inc()
    return JSONResponse(payload, status_code=status)
