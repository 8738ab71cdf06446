"""Answers from retrieved chunks: an extractive default, or an OpenAI-compatible chat model.

Guardrails apply to both: a question whose best chunk is not similar enough is refused
rather than answered from unrelated text, every answer cites the chunks it came from, and
anything that looks like a credential is removed from the answer before it leaves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from keel.rag.index import Hit

# Below this cosine between the question and its best chunk, the index has nothing on it.
DEFAULT_MIN_SIMILARITY = 0.3
REFUSAL = "I could not find this in the indexed documents."
_SECRETS = [
    re.compile(p)
    for p in (
        r"-{5}BEGIN [A-Z ]*PRIVATE KEY-{5}[\s\S]*?-{5}END [A-Z ]*PRIVATE KEY-{5}",
        r"\bAKIA[0-9A-Z]{16}\b",
        r"\b(?:ghp|gho|ghs|ghu|github_pat)_[A-Za-z0-9_]{20,}\b",
        r"\bsk-[A-Za-z0-9_-]{20,}\b",
        r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b",
        r"\bkeel_[A-Za-z0-9]+_[A-Za-z0-9_-]{20,}\b",
        r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\b",
        r"(?i)\b(?:password|passwd|secret|api[_-]?key|token)\s*[:=]\s*\S+",
        r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{16,}",
    )
]
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(*/])|\n+")


def strip_secrets(text: str) -> tuple[str, int]:
    """``text`` with credential-like strings replaced by ``[removed]``, and how many."""
    removed = 0
    for pattern in _SECRETS:
        text, count = pattern.subn("[removed]", text)
        removed += count
    return text, removed


def estimate_tokens(text: str) -> int:
    """About four characters a token, as the usual tokenisers give on English text."""
    return max(1, len(text) // 4)


@dataclass
class Answer:
    """An answer, the chunks it cites, and what it cost."""

    text: str
    citations: list[dict[str, Any]] = field(default_factory=list)
    refused: bool = False
    reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    provider: str = "extractive"
    secrets_removed: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The JSON body of an answer."""
        return {
            "answer": self.text,
            "citations": self.citations,
            "refused": self.refused,
            "reason": self.reason,
            "provider": self.provider,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            },
            "secrets_removed": self.secrets_removed,
        }


def citation(number: int, hit: Hit) -> dict[str, Any]:
    """Where a cited chunk lies: page, heading and character offsets in the rendered page."""
    chunk = hit.chunk
    return {
        "n": number,
        "chunk_id": chunk.chunk_id,
        "doc_id": chunk.doc_id,
        "title": chunk.title,
        "section": chunk.section,
        "start": chunk.start,
        "end": chunk.end,
        "similarity": round(hit.similarity, 4),
    }


class Generator(Protocol):
    """Writes an answer to ``question`` from ``hits``, citing them by number."""

    name: str

    def generate(self, question: str, hits: list[Hit]) -> Answer: ...


class ExtractiveGenerator:
    """No model: the sentences of the top chunks closest to the question, each cited."""

    name = "extractive"

    def __init__(self, embed, sentences: int = 3, chunks: int = 3) -> None:
        self._embed = embed
        self.sentences = sentences
        self.chunks = chunks

    def generate(self, question: str, hits: list[Hit]) -> Answer:
        """Pick the best sentences of the first chunks, in the order they come."""
        candidates: list[tuple[int, int, str]] = []
        for n, hit in enumerate(hits[: self.chunks], start=1):
            for position, sentence in enumerate(_SENTENCE.split(hit.chunk.text)):
                if len(sentence.split()) >= 4:
                    candidates.append((n, position, sentence.strip()))
        if not candidates:
            return Answer(REFUSAL, refused=True, reason="no usable sentence in the retrieved text")
        vectors = self._embed([question, *(s for _, _, s in candidates)])
        scores = vectors[1:] @ vectors[0]
        # Earlier chunks rank higher in retrieval; a small bonus keeps that signal.
        scores += np.array([0.05 * (self.chunks - n) for n, _, _ in candidates])
        best = sorted(np.argsort(-scores)[: self.sentences], key=lambda i: candidates[i][:2])
        used = sorted({candidates[i][0] for i in best})
        text = " ".join(f"{candidates[i][2]} [{candidates[i][0]}]" for i in best)
        context = sum(len(h.chunk.text) for h in hits[: self.chunks]) + len(question)
        return Answer(
            text,
            citations=[citation(n, hits[n - 1]) for n in used],
            prompt_tokens=context // 4,
            completion_tokens=estimate_tokens(text),
        )


class OpenAIChatGenerator:
    """An OpenAI-compatible ``POST {url}/chat/completions`` (vLLM, Ollama, a hosted API)."""

    def __init__(self, url: str, model: str, api_key: str = "", timeout_s: float = 60.0) -> None:
        if not url or not model:
            raise ValueError("the openai generator needs both a url and a model")
        self.url = url.rstrip("/")
        self.model = model
        self.name = f"openai/{model}"
        self._api_key = api_key
        self._timeout = timeout_s

    def generate(self, question: str, hits: list[Hit]) -> Answer:
        """Ask the model to answer from the numbered chunks only, citing them as [n]."""
        import httpx

        context = "\n\n".join(
            f"[{n}] {h.chunk.title} / {h.chunk.section}\n{h.chunk.text}"
            for n, h in enumerate(hits, start=1)
        )
        messages = [
            {
                "role": "system",
                "content": "Answer only from the numbered sources, citing them as [n]. If they "
                "do not contain the answer, say so.",
            },
            {"role": "user", "content": f"Sources:\n{context}\n\nQuestion: {question}"},
        ]
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        response = httpx.post(
            f"{self.url}/chat/completions",
            json={"model": self.model, "messages": messages, "temperature": 0},
            headers=headers,
            timeout=self._timeout,
        )
        response.raise_for_status()
        body = response.json()
        text = body["choices"][0]["message"]["content"]
        usage = body.get("usage") or {}
        cited = sorted({int(n) for n in re.findall(r"\[(\d+)\]", text) if 0 < int(n) <= len(hits)})
        return Answer(
            text,
            citations=[citation(n, hits[n - 1]) for n in cited or range(1, len(hits) + 1)],
            prompt_tokens=int(usage.get("prompt_tokens") or estimate_tokens(context)),
            completion_tokens=int(usage.get("completion_tokens") or estimate_tokens(text)),
            provider=self.name,
        )


def answer_with_guardrails(
    generator: Generator, question: str, hits: list[Hit], min_similarity: float
) -> Answer:
    """Refuse on weak retrieval; otherwise generate, then strip credential-like strings."""
    best = max((h.similarity for h in hits), default=0.0)
    if best < min_similarity:
        return Answer(
            REFUSAL,
            refused=True,
            reason=f"best retrieved chunk similarity {best:.2f} < {min_similarity:.2f}",
            provider=generator.name,
        )
    answer = generator.generate(question, hits)
    answer.text, answer.secrets_removed = strip_secrets(answer.text)
    if not answer.citations and not answer.refused:
        return Answer(REFUSAL, refused=True, reason="the answer cited no source")
    return answer
